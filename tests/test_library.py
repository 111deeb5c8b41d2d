"""torch.library registration: opcheck, torch.compile(fullgraph=True) without graph breaks."""
import pytest
import torch

import adapterkern
from adapterkern.activations import get_activation
from adapterkern.backends import is_available
from conftest import DEVICE, reference_adapter, rel_err

KERNEL_BACKENDS = [
    pytest.param(b, id=b, marks=pytest.mark.skipif(not is_available(b, DEVICE), reason=f"backend {b!r} not available on {DEVICE}"))
    for b in ("triton", "cuda")
]


def _args(backend, dtype=torch.float32, residual=False, channel=True):
    T, d, r = 19, 32, 5
    x = torch.randn(T, d, device=DEVICE, dtype=dtype, requires_grad=True)
    w_down = (torch.randn(r, d, device=DEVICE, dtype=dtype) * d**-0.5).requires_grad_()
    b_down = torch.randn(r, device=DEVICE, dtype=dtype, requires_grad=True)
    w_up = (torch.randn(d, r, device=DEVICE, dtype=dtype) * r**-0.5).requires_grad_()
    b_up = torch.randn(d, device=DEVICE, dtype=dtype, requires_grad=True)
    scale = (torch.rand(d if channel else 1, device=DEVICE, dtype=dtype) + 0.5).requires_grad_()
    res = torch.randn(T, d, device=DEVICE, dtype=dtype, requires_grad=True) if residual else None
    return (x, w_down, b_down, w_up, b_up, scale, 1.0, res, get_activation("gelu").kernel_id, True, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck_forward(backend, residual):
    torch.library.opcheck(torch.ops.adapterkern.bottleneck_adapter_fwd.default, _args(backend, residual=residual))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_backward(backend):
    x, w_down, b_down, w_up, b_up, scale, _, _, act, _, _ = _args(backend)
    with torch.no_grad():
        _, preact = torch.ops.adapterkern.bottleneck_adapter_fwd(x, w_down, b_down, w_up, b_up, scale, 1.0, None, act, True, backend)
    dy = torch.randn_like(x)
    args = (dy, x.detach(), preact, w_down.detach(), b_down.detach(), w_up.detach(), b_up.detach(), scale.detach(), 1.0, True, act, backend, [True] * 6)
    torch.library.opcheck(torch.ops.adapterkern.bottleneck_adapter_bwd.default, args)


class _TinyModel(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.lin = torch.nn.Linear(32, 32)
        self.adapter = adapterkern.nn.BottleneckAdapter(32, 8, activation="gelu_new", scaling="channel", backend=backend)

    def forward(self, x):
        return self.adapter(torch.relu(self.lin(x)))


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    model = _TinyModel(backend).to(DEVICE)
    x = torch.randn(2, 7, 32, device=DEVICE, requires_grad=True)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.sum(), [x, *model.parameters()])
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), [x, *model.parameters()])
    assert rel_err(out, eager_out) < 1e-5
    for g, ge in zip(grads, eager_grads):
        assert rel_err(g, ge) < 1e-4


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiled_op_matches_reference(backend):
    torch._dynamo.reset()
    x, w_down, b_down, w_up, b_up, scale, *_ = _args(backend)

    @torch.compile(fullgraph=True)
    def f(x):
        return adapterkern.bottleneck_adapter(x, w_down, b_down, w_up, b_up, activation="gelu", scaling=scale, backend=backend)

    with torch.no_grad():
        y = f(x)
        ref = reference_adapter(*(t.double() for t in (x, w_down, b_down, w_up, b_up)), "gelu", scale.double())
    assert rel_err(y, ref) < 2e-5


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_capture(backend):
    x, w_down, b_down, w_up, b_up, scale, *_ = _args(backend, dtype=torch.bfloat16)
    x = x.detach()
    call = lambda: adapterkern.bottleneck_adapter(x, w_down, b_down, w_up, b_up, scaling=scale, backend=backend)  # noqa: E731
    with torch.no_grad():
        expected = call()  # also warms up (autotuning must not run during capture)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(out, call()) and not torch.equal(out, expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_needs_the_forwards_preact(backend):
    """The backward ops index dy and preact by the forward's shapes: a wrong one is a ValueError naming it,
    and a backward through a forward that saved no pre-activation is an error, not a recomputation."""
    x, w_down, b_down, w_up, b_up, scale, _, _, act, _, _ = _args(backend)
    detached = [t.detach() for t in (x, w_down, b_down, w_up, b_up, scale)]
    with torch.no_grad():
        _, preact = torch.ops.adapterkern.bottleneck_adapter_fwd(*detached[:6], 1.0, None, act, True, backend)
    dy = torch.randn_like(detached[0])
    for wrong_dy, wrong_preact, name in ((dy[:-1], preact, "dy"), (dy, preact[:, :-1], "preact"), (dy, preact.new_empty(0), "preact")):
        with pytest.raises(ValueError, match=rf"{name}: expected shape"):
            torch.ops.adapterkern.bottleneck_adapter_bwd(
                wrong_dy, detached[0], wrong_preact, *detached[1:6], 1.0, True, act, backend, [True] * 6
            )
    y, _ = torch.ops.adapterkern.bottleneck_adapter_fwd(x, w_down, b_down, w_up, b_up, scale, 1.0, None, act, False, backend)
    with pytest.raises(RuntimeError, match="save_preact=False"):
        y.sum().backward()
