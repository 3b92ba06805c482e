"""Where the Triton kernels run in this process: a GPU, or CPU under the interpreter."""
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if torch.cuda.is_available() and not INTERPRET:
    DEVICES = ["cuda"]
elif INTERPRET:
    DEVICES = ["cpu"]
else:
    DEVICES = []


def dtypes(device: str):
    """The dtypes the kernels take there (the interpreter has no bfloat16)."""
    out = [torch.float32, torch.float16]
    return out if device == "cpu" else out + [torch.bfloat16]
