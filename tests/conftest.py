import os
import random
import tempfile

import pytest
import torch

from tests.mutation.plugin import ENV_VAR as MUTANT_VAR


def pytest_configure(config):
    # torch.compile's on-disk caches key on the traced graph, not on the custom ops' fake
    # implementations: a cache written by an earlier build could replay that build's output shapes.
    # Each test session compiles into a cache of its own.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="attnfused-inductor-"))

    # the mutation check (tests/test_mutation.py): wrong kernels, selected by the variable
    if os.environ.get(MUTANT_VAR):
        from tests.mutation import plugin

        config.pluginmanager.register(plugin, "attnfused-mutation")


@pytest.fixture(autouse=True)
def _fresh_seed():
    """A fresh seed per test and per run; pytest shows it with a failure's captured output."""
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})")
    yield


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
