import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU.
# It must be set before triton is first imported (kiln imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # ...and triton read now: its own @jit helpers (tl.sum, tl.max) take the interpreter setting
    # at import, so a first import inside a test that sets TRITON_INTERPRET=0 (tests/test_backend.py)
    # would leave every later interpreted kernel calling compiled helpers
    try:
        import triton  # noqa: F401
    except ImportError:
        pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_leaked_backend_choice():
    """Every test starts from the device default, whatever the previous one chose."""
    import kiln

    kiln.backend.use(None)
    yield
    kiln.backend.use(None)


@pytest.fixture
def poison_empty(monkeypatch):
    """New float tensors start as NaN, so an element a kernel fails to write shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        if t.is_floating_point() and t.numel() and t.device.type != "meta":
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))
