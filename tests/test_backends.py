"""Backend registry and dispatch: auto, the environment override, unknown and unavailable backends."""
import pytest
import torch

import adapterkern
from adapterkern.backends import ENV_VAR, available_backends, resolve_backend
from conftest import INTERPRET


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    if INTERPRET:
        monkeypatch.setenv(ENV_VAR, "triton")
        assert resolve_backend("auto", torch.device("cpu")) == "triton"
    # an explicit backend wins over the environment
    assert resolve_backend("torch", torch.device("cpu")) == "torch"


def test_env_var_unknown_name(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=rf"{ENV_VAR}.*'fast'.*auto, torch, triton, cuda"):
        resolve_backend("auto", torch.device("cpu"))


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match=r"'nope'.*auto, torch, triton, cuda"):
        resolve_backend("nope", torch.device("cpu"))
    with pytest.raises(TypeError, match="backend"):
        resolve_backend(None, torch.device("cpu"))


def test_cuda_backend_on_cpu_says_how_to_build():
    with pytest.raises(RuntimeError, match=r"backend='cuda'.*cpu.*(build|ADAPTERKERN_FORCE_CUDA|CUDA)"):
        resolve_backend("cuda", torch.device("cpu"))


def test_available_backends_cpu():
    names = available_backends("cpu")
    assert names[-1] == "torch"
    assert ("triton" in names) == INTERPRET


def test_public_names():
    for name in ("bottleneck_adapter", "available_backends", "nn", "ACTIVATION_NAMES", "__version__"):
        assert hasattr(adapterkern, name)


# ------------------------------------------------------------------------------------------------
# Op-aware choice: the table of which backend implements which op
# ------------------------------------------------------------------------------------------------
from adapterkern import backends  # noqa: E402
from adapterkern.backends import BATCHED, IMPLEMENTS, MULTI, OPS, SINGLE, implements  # noqa: E402
from conftest import reference_adapter, rel_err  # noqa: E402


def test_the_table():
    assert IMPLEMENTS["torch"] == set(OPS) and IMPLEMENTS["triton"] == set(OPS)
    assert IMPLEMENTS["cuda"] == {SINGLE}
    assert implements("auto", MULTI) and implements("triton", BATCHED)
    assert implements("cuda", SINGLE) and not implements("cuda", MULTI) and not implements("cuda", BATCHED)
    with pytest.raises(ValueError, match="op"):
        resolve_backend("auto", torch.device("cpu"), "fused_everything")


@pytest.fixture
def cuda_extension_but_no_triton(monkeypatch):
    """A machine whose ``auto`` choice is the CUDA extension (Triton missing), simulated on CPU tensors:
    cuda is "available" on the CPU and first in auto's preference there."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "is_available", lambda name, device: name in ("cuda", "torch"))
    monkeypatch.setitem(backends.AUTO_PREFERENCE, "cpu", ("triton", "cuda", "torch"))


def test_auto_picks_per_op(cuda_extension_but_no_triton):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, SINGLE) == "cuda"
    assert resolve_backend("auto", cpu, MULTI) == "torch"
    assert resolve_backend("auto", cpu, BATCHED) == "torch"
    with pytest.raises(ValueError, match=r"backend: 'cuda' has no multi_adapter kernel.*'torch', 'triton'"):
        resolve_backend("cuda", cpu, MULTI)


def test_env_default_without_the_op_falls_back_to_auto(cuda_extension_but_no_triton, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    assert resolve_backend("auto", torch.device("cpu"), SINGLE) == "cuda"
    assert resolve_backend("auto", torch.device("cpu"), BATCHED) == "torch"


def test_stack_ops_fall_back_to_torch_where_auto_lacks_them(cuda_extension_but_no_triton, monkeypatch):
    """multi_adapter and bottleneck_adapter_batched with backend='auto' run (on the torch backend)
    instead of raising, and give the maths of N separate adapters."""
    calls = []
    for op in ("multi_adapter", "batched_adapter"):
        real = getattr(backends.reference, op)
        monkeypatch.setattr(backends.reference, op, lambda *a, _real=real, _op=op, **k: calls.append(_op) or _real(*a, **k))
    n, t, d, r = 3, 10, 16, 4
    x = torch.randn(t, d, dtype=torch.float64)
    w_down, b_down = torch.randn(n, r, d, dtype=torch.float64), torch.randn(n, r, dtype=torch.float64)
    w_up, b_up = torch.randn(n, d, r, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    scaling = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    refs = torch.stack([reference_adapter(x, w_down[i], b_down[i], w_up[i], b_up[i], "relu", scaling[i]) for i in range(n)])

    stacked = adapterkern.multi_adapter(x, w_down, b_down, w_up, b_up, scaling=scaling)
    assert rel_err(stacked, refs) < 1e-12
    index = torch.tensor([2, 0, -1, 1, 1, 0, 2, -1, 0, 1])
    routed = adapterkern.bottleneck_adapter_batched(x, index, w_down, b_down, w_up, b_up, scaling=scaling)
    expected = torch.stack([x[i] if k < 0 else refs[k, i] for i, k in enumerate(index.tolist())])
    assert rel_err(routed, expected) < 1e-12
    assert calls == ["multi_adapter", "batched_adapter"]
