import importlib
import logging

import pytest
import torch

import kiln
from kiln import backend
from kiln.backend import BackendError


def test_default_by_device():
    assert backend.select("linear_act", torch.device("cpu"), torch.float32,
                          kiln.ops.BACKEND_DTYPES["linear_act"]) == "cpu"
    assert backend.default_for(torch.device("cuda")) == "triton"


def test_use_is_a_setter_and_a_context_manager():
    backend.use("reference")
    assert backend.requested("linear_act") == "reference"
    with backend.use("cpu"):
        assert backend.requested("linear_act") == "cpu"
    assert backend.requested("linear_act") == "reference"


def test_per_op_choice_wins_over_global():
    with backend.use("reference"), backend.use("cpu", ops=["linear_act"]):
        assert backend.requested("linear_act") == "cpu"
        assert backend.requested("layer_norm") == "reference"
    assert backend.requested("linear_act") is None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("KILN_BACKEND", "reference")
    assert backend.requested("linear_act") == "reference"
    with backend.use("cpu"):
        assert backend.requested("linear_act") == "cpu"
    monkeypatch.setenv("KILN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="KILN_BACKEND='gpu'.*triton, cuda, cpu, reference"):
        backend.requested("linear_act")


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown kiln backend 'numba'"):
        backend.use("numba")


def test_the_chosen_backend_really_runs(monkeypatch):
    calls = []
    real = backend.kernels
    monkeypatch.setattr(backend, "kernels", lambda name, *args: calls.append(name) or real(name, *args))
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    for name in ("cpu", "reference"):
        with backend.use(name):
            kiln.ops.linear_act(x, w)
    assert calls == ["cpu", "reference"]


def test_cuda_backend_on_cpu_tensors_is_an_error():
    with backend.use("cuda"), pytest.raises(BackendError, match="cuda.*runs on CUDA tensors, not cpu"):
        kiln.ops.linear_act(torch.randn(3, 4), torch.randn(2, 4))


def test_cpu_backend_with_unsupported_dtype_is_an_error():
    x, w = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(2, 4, dtype=torch.bfloat16)
    with backend.use("cpu"), pytest.raises(BackendError, match="supports dtypes float32, float64, not bfloat16"):
        kiln.ops.linear_act(x, w)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backend.use("triton"), pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        kiln.ops.linear_act(torch.randn(3, 4), torch.randn(2, 4))


def test_default_steps_aside_to_reference_for_uncovered_dtype_and_says_so(caplog):
    backend._logged_defaults.clear()
    x, w = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(2, 4, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        out = kiln.ops.linear_act(x, w)
        kiln.ops.linear_act(x, w)
    expected = torch.relu(x.double() @ w.double().t())
    assert (out.double() - expected).abs().max() < 0.1
    messages = [r.getMessage() for r in caplog.records if "reference backend" in r.getMessage()]
    assert len(messages) == 1 and "bfloat16" in messages[0]


def test_cuda_extension_without_a_gpu_raises_instead_of_crashing():
    try:
        ext = backend.cuda_extension()
    except BackendError:
        pytest.skip("kiln._cuda is not built on this machine (no nvcc at install time)")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the gpu tests run the extension")
    assert ext.device_count() == 0
    assert ext.archs().split() and all(a.isdigit() for a in ext.archs().split())
    # Keywords, so a new argument in the binding fails here by name instead of by position.
    args = dict(x=8, w=8, b=0, out=8, preact=0, M=2, N=2, K=2, activation=1,
                p=0.0, seed=0, offset=0, threshold=0, stream=0)
    with pytest.raises(RuntimeError, match="linear_act_forward: CUDA error"):
        ext.linear_act_forward(dtype=0, **args)
    with pytest.raises(ValueError):
        ext.linear_act_forward(dtype=7, **args)  # no dtype has code 7


def test_a_misspelt_op_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'lienar_act'.*linear_act.*cross_entropy"):
        kiln.backend.use("cpu", ops=["lienar_act"])
    with pytest.raises(TypeError, match=r"ops=\['linear_act'\]"):
        kiln.backend.use("cpu", ops="linear_act")


def test_an_unknown_backend_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'cpux'.*triton, cuda, cpu, reference"):
        kiln.backend.use("cpux")


def test_selector_follows_every_change_of_the_choice(monkeypatch):
    """backend.selector keeps its answers, yet sees use(), a per-op choice and KILN_BACKEND at once."""
    ops_module = importlib.import_module("kiln.ops.linear_act")
    implementation_of = backend.selector("linear_act", kiln.ops.BACKEND_DTYPES["linear_act"],
                                         ops_module._KERNEL_MODULES, ops_module._REFERENCE, ops_module._CUDA)
    x = torch.randn(3, 4)
    monkeypatch.delenv("KILN_BACKEND", raising=False)
    cpu = implementation_of(x)
    assert cpu is not ops_module._REFERENCE and implementation_of(x) is cpu
    with backend.use("reference"):
        assert implementation_of(x) is ops_module._REFERENCE
    assert implementation_of(x) is cpu
    with backend.use("reference", ops=["linear_act"]):
        assert implementation_of(x) is ops_module._REFERENCE
    monkeypatch.setenv("KILN_BACKEND", "reference")
    assert implementation_of(x) is ops_module._REFERENCE
    with backend.use("cpu"):
        assert implementation_of(x) is cpu
    monkeypatch.setenv("KILN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="KILN_BACKEND='gpu'"):
        implementation_of(x)
    monkeypatch.delenv("KILN_BACKEND")
    with backend.use("cuda"), pytest.raises(BackendError, match="runs on CUDA tensors"):
        implementation_of(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backend.use("triton"), pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        implementation_of(x)


def test_selector_says_each_time_the_default_steps_aside(caplog):
    """A default that steps aside to reference is never kept: select logs it (once per process)."""
    ops_module = importlib.import_module("kiln.ops.linear_act")
    implementation_of = backend.selector("linear_act", kiln.ops.BACKEND_DTYPES["linear_act"],
                                         ops_module._KERNEL_MODULES, ops_module._REFERENCE, ops_module._CUDA)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    for _ in range(2):
        backend._logged_defaults.clear()
        with caplog.at_level(logging.WARNING, logger="kiln"):
            assert implementation_of(x) is ops_module._REFERENCE
    messages = [r.getMessage() for r in caplog.records if "reference backend" in r.getMessage()]
    assert len(messages) == 2


def test_environment_is_read_as_os_environ_reads_it(monkeypatch):
    monkeypatch.setenv("KILN_BACKEND", "reference")
    assert backend._getenv("KILN_BACKEND") == "reference" == backend.requested("linear_act")
    monkeypatch.delenv("KILN_BACKEND")
    assert backend._getenv("KILN_BACKEND") is None and backend.requested("linear_act") is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.triton_interpreted()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.triton_interpreted()
