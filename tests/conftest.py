"""Shared fixtures. Without CUDA, the Triton kernels run under the interpreter
(TRITON_INTERPRET=1 must be set before Triton compiles anything, hence here)."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poison_compiled_outputs(monkeypatch):
    """The compiled CPU layer op (lipkern::sn_linear) fills its outputs with NaN first."""
    monkeypatch.setenv("LIPKERN_POISON_OUTPUTS", "1")


@pytest.fixture(autouse=True)
def _poison_triton_outputs(monkeypatch):
    """Every Triton launch in the tests starts from NaN-filled outputs."""
    try:
        from lipkern.triton_kernels import power_iter as k
    except ImportError:
        return
    monkeypatch.setattr(k, "POISON_OUTPUTS", True)
