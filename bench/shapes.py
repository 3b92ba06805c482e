"""Shape presets (docs/contract.md §6): (C, H, W) per preset; the batch comes from --batch."""
from __future__ import annotations

import re

PRESETS: dict[str, list[tuple[int, int, int]]] = {
    # the inputs of the attention block after each ResNet-50 stage's bottleneck
    "resnet50": [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)],
    # SE inputs of EfficientNet-B0 (expanded width, after the depthwise conv)
    "efficientnet": [(32, 112, 112), (144, 56, 56), (240, 28, 28), (480, 14, 14), (672, 14, 14), (1152, 7, 7)],
    # SE inputs of MobileNetV3-Large
    "mobilenet": [(72, 28, 28), (120, 28, 28), (480, 14, 14), (672, 14, 14), (960, 7, 7)],
    # widths and sizes that no vector width divides: tails and masks
    "odd": [(17, 31, 31), (100, 13, 13), (257, 15, 15), (1001, 9, 9)],
    # for smoke tests and --quick
    "tiny": [(32, 8, 8)],
    "small": [(256, 28, 28)],
}


def parse_shapes(specs: list[str], batches: list[int]) -> list[tuple[int, int, int, int]]:
    """`specs` are preset names or `CxHxW` / `NxCxHxW` (an explicit N ignores --batch)."""
    out: list[tuple[int, int, int, int]] = []
    for spec in specs:
        if spec in PRESETS:
            out += [(b, *chw) for b in batches for chw in PRESETS[spec]]
            continue
        dims = [int(d) for d in re.split(r"[x,]", spec)] if re.fullmatch(r"\d+([x,]\d+){2,3}", spec) else None
        if dims is None:
            raise ValueError(f"--shapes: {spec!r} is neither a preset {sorted(PRESETS)} nor CxHxW / NxCxHxW")
        out += [tuple(dims)] if len(dims) == 4 else [(b, *dims) for b in batches]
    return list(dict.fromkeys(out))  # unique, in order


def shape_str(shape) -> str:
    return "x".join(str(d) for d in shape)
