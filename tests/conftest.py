"""Shared test setup.

Without CUDA the Triton kernels run in Triton's interpreter, which reads TRITON_INTERPRET when a
kernel is decorated, i.e. at import: it is set here, before any test imports eomt_fast.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a preallocated output with NaN (or an extreme value for integer/bool tensors) so that an
    element a kernel forgets to write fails the comparison."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(torch.iinfo(t.dtype).max)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each torch.compile(fullgraph=True) of a custom op adds a cache entry to one shared Dynamo wrapper
    whose recompile limit is 8; without a reset, the 9th compiling test in a session fails."""
    yield
    torch._dynamo.reset()
