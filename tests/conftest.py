"""Test-session set-up: one torch thread, no hub access, Triton's interpreter when there is no GPU.

The environment variables must be set before ``linvision`` (and any Triton kernel module) is
imported, which is why they are set at the top of this file.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "LINVISION_HOME" not in os.environ:
    # Tests (and the processes they start) never read or write the user's cache of tuned Triton configs
    # (linvision.attn.ops.autotune keeps it under $LINVISION_HOME).
    import atexit
    import shutil
    import tempfile
    os.environ["LINVISION_HOME"] = tempfile.mkdtemp(prefix="linvision_test_home_")
    atexit.register(shutil.rmtree, os.environ["LINVISION_HOME"], ignore_errors=True)

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Kernels read this when @triton.jit decorates them; must precede their import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
