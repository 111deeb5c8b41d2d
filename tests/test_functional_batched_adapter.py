"""adapterkern.bottleneck_adapter_batched (each token through its own adapter, one launch) against a
float64 per-token reference: forward and every gradient, every dtype, N in {1, 2, 5, 8}, ragged groups."""
import pytest
import torch

import adapterkern
from adapterkern.backends import is_available
from conftest import DEVICE, check_against_reference, reference_activation, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = [
    pytest.param(b, id=b, marks=pytest.mark.skipif(not is_available(b, DEVICE), reason=f"backend {b!r} not available on {DEVICE}"))
    for b in ("torch", "triton")
]


def make_case(n, shape, r, dtype, *, scaling="channel", residual=False, index="mixed"):
    d = shape[-1]
    tokens = shape[:-1]

    def rand(*s, scale=1.0):
        return (torch.randn(*s, device=DEVICE) * scale).to(dtype).requires_grad_()

    s_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if index == "mixed":  # every adapter but one has tokens, some tokens have none
        idx = torch.randint(-1, n, tokens, device=DEVICE)
        if n > 1:
            idx[idx == n - 1] = 0  # the last adapter gets no token
    elif index == "one":
        idx = torch.full(tokens, n - 1, device=DEVICE)
    elif index == "none":
        idx = torch.full(tokens, -1, device=DEVICE)
    elif index == "sequence":
        idx = torch.randint(-1, n, tokens[:1], device=DEVICE)
    else:
        raise AssertionError(index)
    return {
        "x": rand(*shape),
        "index": idx,
        "w_down": rand(n, r, d, scale=d**-0.5),
        "b_down": rand(n, r, scale=0.5),
        "w_up": rand(n, d, r, scale=r**-0.5),
        "b_up": rand(n, d, scale=0.5),
        "scaling": {
            "channel": lambda: (torch.rand(n, d, device=DEVICE, dtype=s_dtype) + 0.5).requires_grad_(),
            "adapter": lambda: (torch.rand(n, device=DEVICE, dtype=s_dtype) + 0.5).requires_grad_(),
            "float": lambda: 0.75,
        }[scaling](),
        "residual": rand(*shape) if residual else None,
    }


def per_token_reference(c, activation, math_dtype=torch.float64, add_residual=True):
    """Token by token, weights gathered per token; in ``math_dtype`` (float64: the reference)."""
    cast = {k: (v.to(math_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in c.items()}
    x = cast["x"]
    d = x.shape[-1]
    idx = c["index"]
    if idx.shape != x.shape[:-1]:
        idx = idx.reshape((-1,) + (1,) * (x.dim() - 2)).expand(x.shape[:-1])
    idx = idx.reshape(-1)
    x2 = x.reshape(-1, d)
    res = x2 if cast["residual"] is None else cast["residual"].reshape(-1, d)
    if not add_residual:
        res = torch.zeros_like(x2)
    safe = idx.clamp_min(0)
    h = torch.einsum("td,trd->tr", x2, cast["w_down"][safe]) + cast["b_down"][safe]
    u = torch.einsum("tr,tdr->td", reference_activation(activation)(h), cast["w_up"][safe]) + cast["b_up"][safe]
    s = cast["scaling"]
    u = u * (s[safe].reshape(len(safe), -1) if isinstance(s, torch.Tensor) else s)
    y = torch.where((idx >= 0)[:, None], res + u, res)
    return y.reshape(x.shape)


def check(case, backend, activation="gelu", groups=None, add_residual=True):
    dtype = case["x"].dtype
    y = adapterkern.bottleneck_adapter_batched(
        case["x"], case["index"], case["w_down"], case["b_down"], case["w_up"], case["b_up"], activation=activation,
        scaling=case["scaling"], residual=case["residual"], add_residual=add_residual, groups=groups, backend=backend,
    )
    ref = per_token_reference(case, activation, add_residual=add_residual)
    rounded = per_token_reference(case, activation, math_dtype=torch.promote_types(dtype, torch.float32), add_residual=add_residual)
    assert y.dtype == dtype
    check_against_reference(y, ref, rounded, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_mixed_batch(backend, dtype, n, poison_empty):
    check(make_case(n, (2, 11, 32), 12, dtype), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [dict(index="one"), dict(index="none"), dict(index="sequence"), dict(residual=True), dict(scaling="adapter"), dict(scaling="float")],
    ids=["all-on-one-adapter", "no-adapter-at-all", "per-sequence", "residual", "adapter-scaling", "float-scaling"],
)
def test_groups(backend, kwargs, poison_empty):
    check(make_case(5, (4, 9, 24), 20, torch.float32, **kwargs), backend, activation="silu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_residual(backend, dtype, poison_empty):
    """add_residual=False: each row is its adapter's contribution, 0 where no adapter (what fusion mixes)."""
    case = make_case(4, (3, 10, 24), 8, dtype, scaling="adapter")
    assert (case["index"] == -1).any()
    check(case, backend, add_residual=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_precomputed_groups_are_reused(backend):
    case = make_case(3, (40, 16), 4, torch.float32)
    groups = adapterkern.token_groups(case["index"], 3)
    assert groups.counts.sum().item() == 40 and groups.counts.dtype == torch.int32
    check(case, backend, groups=groups)
    with pytest.raises(ValueError, match="groups"):
        check(case, backend, groups=adapterkern.token_groups(case["index"][:20], 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    c = make_case(3, (11, 8), 3, torch.float64, scaling="adapter")
    names = ["x", "w_down", "b_down", "w_up", "b_up", "scaling"]

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        return adapterkern.bottleneck_adapter_batched(
            kw["x"], c["index"], kw["w_down"], kw["b_down"], kw["w_up"], kw["b_up"], activation="tanh", scaling=kw["scaling"], backend=backend
        )

    assert torch.autograd.gradcheck(fn, [c[k] for k in names], fast_mode=True)  # random directions: the interpreter is slow


@pytest.mark.skipif(not is_available("triton", DEVICE), reason="triton backend not available")
def test_opcheck_and_compile():
    c = make_case(3, (21, 32), 8, torch.float32, scaling="adapter")
    g = adapterkern.token_groups(c["index"], 3)
    args = [c["x"], *g, c["w_down"], c["b_down"], c["w_up"], c["b_up"], c["scaling"].reshape(3, 1), 1.0, None, True, 1, True, "triton"]
    torch.library.opcheck(torch.ops.adapterkern.batched_adapter_fwd.default, args)
    with torch.no_grad():
        _, preact = torch.ops.adapterkern.batched_adapter_fwd(*args)
    detached = [t.detach() for t in (c["x"], c["w_down"], c["b_down"], c["w_up"], c["b_up"])]
    bwd = [torch.randn(21, 32), detached[0], *g, preact, *detached[1:], c["scaling"].detach().reshape(3, 1), 1.0, True, 1, "triton", [True] * 6]
    torch.library.opcheck(torch.ops.adapterkern.batched_adapter_bwd.default, bwd)

    def f(x, idx, wd, bd, wu, bu, s, groups):
        return adapterkern.bottleneck_adapter_batched(x, idx, wd, bd, wu, bu, scaling=s, groups=groups, backend="triton")

    inputs = [c[k] for k in ("x", "index", "w_down", "b_down", "w_up", "b_up", "scaling")] + [g]
    assert rel_err(torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs), f(*inputs)) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_new_routing():
    c = make_case(4, (64, 64), 16, torch.float16)
    x, idx = c["x"].detach(), c["index"]
    weights = [c[k].detach() for k in ("w_down", "b_down", "w_up", "b_up")]
    groups = adapterkern.token_groups(idx, 4)
    static_idx = idx.clone()
    fn = lambda: adapterkern.bottleneck_adapter_batched(x, static_idx, *weights, groups=groups, backend="triton")  # noqa: E731
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    static_idx.copy_(torch.randint(-1, 4, idx.shape, device=DEVICE))
    groups.update_(static_idx)  # regrouped into the buffers the graph reads
    graph.replay()
    c2 = dict(c, index=static_idx)
    assert rel_err(out, per_token_reference(c2, "relu")) < 2e-3


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(index=torch.tensor([0, 1, 2, 0, 0, 1, 3])), ValueError, r"adapter_index: values must lie in \[-1, 2\]"),
        (dict(index=torch.tensor([0, 1, -2, 0, 0, 1, 0])), ValueError, "adapter_index: values"),
        (dict(index=torch.zeros(6, dtype=torch.long)), ValueError, "adapter_index: expected shape"),
        (dict(index=torch.zeros(7)), TypeError, "adapter_index: expected an integer"),
        (dict(index=[0] * 7), TypeError, "adapter_index"),
        (dict(w_down=torch.randn(3, 4, 15)), ValueError, "w_down"),
        (dict(groups=(1, 2, 3)), TypeError, "groups"),
        (dict(add_residual=False, residual=torch.randn(7, 16)), ValueError, "residual"),
        (dict(add_residual=1), TypeError, "add_residual"),
    ],
)
def test_bad_input(change, exc, match):
    kw = dict(index=torch.tensor([0, 1, 2, 0, -1, 1, 0]), w_down=torch.randn(3, 4, 16), b_down=torch.randn(3, 4), w_up=torch.randn(3, 16, 4), b_up=torch.randn(3, 16))
    kw.update(change)
    x = torch.randn(7, 16)
    idx, wd, bd, wu, bu = (kw.pop(k) for k in ("index", "w_down", "b_down", "w_up", "b_up"))
    with pytest.raises(exc, match=match):
        adapterkern.bottleneck_adapter_batched(x, idx, wd, bd, wu, bu, **kw)
