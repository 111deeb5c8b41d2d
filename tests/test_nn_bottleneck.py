"""BottleneckAdapter: init schemes, scaling modes, from_linear, and agreement with the eager adapter."""
import pytest
import torch
from torch import nn

import adapterkern
from adapterkern.backends import is_available
from adapterkern.nn import BottleneckAdapter
from adapterkern.nn.bottleneck import stack_weights
from conftest import DEVICE, rel_err

BACKENDS = [
    pytest.param(b, id=b, marks=pytest.mark.skipif(not is_available(b, DEVICE), reason=f"backend {b!r} not available on {DEVICE}"))
    for b in ("torch", "triton", "cuda")
]


def eager(adapter, x, residual=None):
    """The adapter as users write it: Linear -> act -> Linear, * scaling, + residual."""
    act = adapterkern.get_activation(adapter.activation).fn
    up = adapter.adapter_up(act(adapter.adapter_down(x))) * adapter.scaling
    return up + (x if residual is None else residual)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling", [1.0, 0.5, "learned", "channel"])
@pytest.mark.parametrize("parallel", [False, True])
def test_module_matches_eager(backend, scaling, parallel):
    adapter = BottleneckAdapter(64, 16, activation="silu", scaling=scaling, init="bert", backend=backend).to(DEVICE)
    if isinstance(adapter.scaling, nn.Parameter):
        with torch.no_grad():
            adapter.scaling.uniform_(0.5, 1.5)
    x = torch.randn(2, 9, 64, device=DEVICE, requires_grad=True)
    residual = torch.randn(2, 9, 64, device=DEVICE) if parallel else None
    y = adapter(x, residual)
    y_ref = eager(adapter, x, residual)
    assert rel_err(y, y_ref) < 1e-5
    params = [x, *adapter.parameters()]
    grads = torch.autograd.grad(y.square().sum(), params)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), params)
    for g, gr in zip(grads, grads_ref):
        assert rel_err(g, gr) < 1e-4


def test_init_schemes():
    torch.manual_seed(0)
    bert = BottleneckAdapter(768, 64, init="bert")
    assert abs(bert.adapter_down.weight.std().item() - 0.02) < 2e-3
    assert torch.count_nonzero(bert.adapter_up.bias) == 0
    houlsby = BottleneckAdapter(768, 64, init="houlsby")
    assert houlsby.adapter_up.weight.abs().max() <= 2e-2 and houlsby.adapter_up.weight.std() > 5e-3
    mam = BottleneckAdapter(768, 64, init="mam_adapter")
    assert torch.count_nonzero(mam.adapter_up.weight) == 0 and torch.count_nonzero(mam.adapter_down.weight) > 0
    x = torch.randn(3, 768)
    assert torch.equal(mam(x), x)  # a fresh mam_adapter adapter is exactly the identity
    with pytest.raises(ValueError, match="init.*'xavier'"):
        BottleneckAdapter(8, 2, init="xavier")


def test_from_linear_shares_parameters():
    down, up = nn.Linear(32, 8), nn.Linear(8, 32)
    adapter = BottleneckAdapter.from_linear(down, up, activation="gelu", scaling=2.0)
    assert adapter.adapter_down.weight is down.weight and adapter.adapter_up.bias is up.bias
    x = torch.randn(5, 32)
    expected = x + 2.0 * up(torch.nn.functional.gelu(down(x)))
    assert rel_err(adapter(x), expected) < 1e-6
    with pytest.raises(ValueError, match="Linear\\(d, r\\)"):
        BottleneckAdapter.from_linear(nn.Linear(32, 8), nn.Linear(8, 31))
    with pytest.raises(TypeError, match="nn.Linear"):
        BottleneckAdapter.from_linear(nn.Linear(32, 8), nn.Conv1d(8, 32, 1))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="bottleneck_size"):
        BottleneckAdapter(8, 0)
    with pytest.raises(ValueError, match="scaling"):
        BottleneckAdapter(8, 2, scaling="global")
    with pytest.raises(ValueError, match="activation"):
        BottleneckAdapter(8, 2, activation="nope")
    with pytest.raises(ValueError, match="backend"):
        BottleneckAdapter(8, 2, backend="nope")


def test_state_dict_and_repr():
    adapter = BottleneckAdapter(16, 4, scaling="channel", bias=False)
    assert set(adapter.state_dict()) == {"adapter_down.weight", "adapter_up.weight", "scaling"}
    assert "bottleneck_size=4" in repr(adapter)


def _linears(n, d, r, dtype, bias=True):
    downs = [nn.Linear(d, r, bias=bias, dtype=dtype) for _ in range(n)]
    ups = [nn.Linear(r, d, bias=bias, dtype=dtype) for _ in range(n)]
    return downs, ups


def test_stack_weights_stacks_the_modules_parameters():
    downs, ups = _linears(3, 8, 2, torch.float32)
    w_down, b_down, w_up, b_up, scaling = stack_weights(downs, ups, [0.5, 0.5, 0.5])
    assert w_down.shape == (3, 2, 8) and b_down.shape == (3, 2) and w_up.shape == (3, 8, 2) and b_up.shape == (3, 8)
    assert torch.equal(w_down[1], downs[1].weight) and torch.equal(b_up[2], ups[2].bias)
    assert scaling == 0.5 and isinstance(scaling, float)
    w_down.sum().backward()  # stacked from the parameters themselves: gradients reach them
    assert downs[0].weight.grad is not None
    _, b_down, _, b_up, _ = stack_weights(*_linears(2, 8, 2, torch.float32, bias=False), [1.0, 1.0])
    assert b_down is None and b_up is None


def test_stack_weights_one_scaling_dtype_rule():
    """Python floats that differ become float32 whatever the weights' dtype (a bf16 tensor would round
    1 + 2^-8 to 1); tensor scalings are promoted with float32; per-channel ones give (N, d)."""
    downs, ups = _linears(2, 8, 2, torch.bfloat16)
    *_, scaling = stack_weights(downs, ups, [1.0 + 2.0**-8, 2.0])
    assert scaling.dtype == torch.float32 and scaling.tolist() == [1.0 + 2.0**-8, 2.0]
    learned = torch.tensor([0.75], dtype=torch.bfloat16)
    *_, scaling = stack_weights(downs, ups, [learned, 1.0 + 2.0**-8])
    assert scaling.dtype == torch.float32 and scaling.tolist() == [0.75, 1.0 + 2.0**-8]
    channel = torch.full((8,), 0.25, dtype=torch.float64)
    *_, scaling = stack_weights(downs, ups, [channel, 3.0])
    assert scaling.dtype == torch.float64 and scaling.shape == (2, 8)
    assert scaling[0].tolist() == [0.25] * 8 and scaling[1].tolist() == [3.0] * 8


@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scaling_is_refused(scaling):
    with pytest.raises(ValueError, match="scaling: expected a finite float"):
        BottleneckAdapter(16, 4, scaling=scaling)
