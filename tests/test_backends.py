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
