"""adapterkern.routing: token groups are made only by token_groups, bound to their index, and safe
whatever the kernels are handed; out-of-range indices have a defined outcome under torch.compile."""
import pytest
import torch

import adapterkern
from adapterkern.backends import is_available
from adapterkern.routing import TokenGroups
from conftest import DEVICE, rel_err

BACKENDS = [
    pytest.param(b, id=b, marks=pytest.mark.skipif(not is_available(b, DEVICE), reason=f"backend {b!r} not available on {DEVICE}"))
    for b in ("torch", "triton")
]
N, D, R = 3, 16, 4


def _stack(dtype=torch.float32):
    return (
        torch.randn(N, R, D, device=DEVICE, dtype=dtype) * D**-0.5, torch.randn(N, R, device=DEVICE, dtype=dtype),
        torch.randn(N, D, R, device=DEVICE, dtype=dtype) * R**-0.5, torch.randn(N, D, device=DEVICE, dtype=dtype),
    )


def _expected(x, index, w_down, b_down, w_up, b_up):
    """Token by token in float64, written here: relu adapter, scaling 1, residual x; index -1 or out of range: x."""
    rows = []
    for t, i in enumerate(index.tolist()):
        xt = x[t].double()
        if 0 <= i < N:
            h = torch.relu(w_down[i].double() @ xt + b_down[i].double())
            xt = xt + w_up[i].double() @ h + b_up[i].double()
        rows.append(xt)
    return torch.stack(rows)


def test_token_groups_cannot_be_made_by_hand():
    index = torch.tensor([0, 1, -1])
    with pytest.raises(TypeError, match="token_groups"):
        TokenGroups(torch.arange(3), torch.tensor([1, 1, 1, 0]), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="token_groups"):
        TokenGroups._create(object(), index, 3)
    groups = adapterkern.token_groups(index, 3)
    assert groups.index is index and groups.num_adapters == 3 and list(groups.counts.tolist()) == [1, 1, 1, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_of_another_index_are_refused(backend):
    """The same shape and adapters, another routing: the op must not route by the stale groups."""
    x = torch.randn(6, D, device=DEVICE)
    index_a = torch.tensor([0, 0, 1, 1, 2, 2], device=DEVICE)
    index_b = torch.tensor([2, 1, 0, -1, 0, 1], device=DEVICE)
    stack = _stack()
    with pytest.raises(ValueError, match="groups: made from another adapter_index"):
        adapterkern.bottleneck_adapter_batched(x, index_b, *stack, groups=adapterkern.token_groups(index_a, N), backend=backend)
    with pytest.raises(ValueError, match="groups: made from another"):  # an equal copy is not the same index either
        adapterkern.bottleneck_adapter_batched(x, index_a.clone(), *stack, groups=adapterkern.token_groups(index_a, N), backend=backend)
    with pytest.raises(ValueError, match="groups: made for 6 tokens and 3 adapters, not 6 and 2"):
        adapterkern.bottleneck_adapter_batched(
            x, index_a, *(t[:2] for t in stack), groups=adapterkern.token_groups(index_a, N), backend=backend
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_modified_in_place_are_refused_and_update_regroups(backend):
    x = torch.randn(6, D, device=DEVICE)
    index = torch.tensor([0, 0, 1, 1, 2, 2], device=DEVICE)
    stack = _stack()
    groups = adapterkern.token_groups(index, N)
    index[0] = 2  # the routing changed under the groups
    with pytest.raises(ValueError, match="modified in place"):
        adapterkern.bottleneck_adapter_batched(x, index, *stack, groups=groups, backend=backend)
    groups.update_(index)
    y = adapterkern.bottleneck_adapter_batched(x, index, *stack, groups=groups, backend=backend)
    assert rel_err(y, _expected(x, index, *stack)) < 1e-5
    groups.perm.zero_()  # every row would read token 0, the others never written
    with pytest.raises(ValueError, match="modified in place"):
        adapterkern.bottleneck_adapter_batched(x, index, *stack, groups=groups, backend=backend)
    with pytest.raises(ValueError, match="adapter_index: expected a tensor of shape"):
        groups.update_(index[:3])


@pytest.mark.skipif(not is_available("triton", DEVICE), reason="triton backend not available")
@pytest.mark.parametrize(
    "forge",
    [
        lambda p, c, s: (torch.full_like(p, 10**9), c, s),  # token ids far outside the tensors
        lambda p, c, s: (torch.full_like(p, -5), c, s),
        lambda p, c, s: (p, torch.full_like(c, 10**9), s),  # groups larger than T
        lambda p, c, s: (p, c, torch.full_like(s, 2**30)),  # starts past the end of perm
        lambda p, c, s: (p, -c, -s),
    ],
    ids=["perm-huge", "perm-negative", "counts-huge", "starts-huge", "negative"],
)
def test_kernels_stay_in_bounds_whatever_the_groups(forge):
    """The raw op is handed inconsistent groups (what the public API can no longer build): the kernels
    clamp them, so nothing is read or written outside the tensors (the interpreter would crash) and
    the backward's loops end."""
    x = torch.randn(8, D, device=DEVICE, requires_grad=True)
    w_down, b_down, w_up, b_up = (t.requires_grad_() for t in _stack())
    groups = adapterkern.token_groups(torch.tensor([0, 1, 2, -1, 0, 1, 2, -1], device=DEVICE), N)
    perm, counts, starts = forge(*groups)
    y, preact = torch.ops.adapterkern.batched_adapter_fwd(
        x, perm, counts, starts, w_down, b_down, w_up, b_up, None, 1.0, None, True, 0, True, "triton"
    )
    assert y.shape == x.shape and preact.shape == (8, R)
    grads = torch.ops.adapterkern.batched_adapter_bwd(
        torch.randn_like(y), x.detach(), perm, counts, starts, preact, w_down.detach(), b_down.detach(),
        w_up.detach(), b_up.detach(), None, 1.0, True, 0, "triton", [True, True, True, True, True, False],
    )
    assert grads[1].shape == w_down.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_index_under_compile_goes_to_no_adapter_and_is_counted(backend):
    """torch.compile cannot check values on the host: 5 and -7 with N = 3 route their tokens to no
    adapter (y = x there), and groups.out_of_range says how many; eager refuses them."""
    torch._dynamo.reset()
    x = torch.randn(8, D, device=DEVICE)
    stack = _stack()
    index = torch.tensor([0, 5, 1, -7, 2, -1, 1, 0], device=DEVICE)

    def routed(x, index):
        groups = adapterkern.token_groups(index, N)
        y = adapterkern.bottleneck_adapter_batched(x, index, *stack, groups=groups, backend=backend)
        return y, groups.out_of_range

    y, out_of_range = torch.compile(routed, fullgraph=True, backend="aot_eager")(x, index)
    assert int(out_of_range) == 2
    assert rel_err(y, _expected(x, index, *stack)) < 1e-5
    assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3])
    with pytest.raises(ValueError, match=r"adapter_index: values must lie in \[-1, 2\]"):
        routed(x, index)
    valid = index.clamp(-1, N - 1)
    y_compiled, zero = torch.compile(routed, fullgraph=True, backend="aot_eager")(x, valid)
    assert int(zero) == 0 and rel_err(y_compiled, routed(x, valid)[0]) < 1e-6


def test_groups_made_under_inference_mode_work():
    """Inference tensors keep no version counter: groups made and used under inference_mode still run."""
    x = torch.randn(6, D, device=DEVICE)
    index = torch.tensor([0, 0, 1, 1, 2, -1], device=DEVICE)
    stack = _stack()
    with torch.inference_mode():
        groups = adapterkern.token_groups(index, N)
        y = adapterkern.bottleneck_adapter_batched(x, index, *stack, groups=groups, backend="torch")
    assert rel_err(y, _expected(x, index, *stack)) < 1e-5
