"""adapterkern.multi_adapter (N adapters on one input, one launch) against a loop over the float64
single-adapter reference: forward and every gradient, every dtype, N in {1, 2, 5, 8}."""
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
NAMES = ("x", "w_down", "b_down", "w_up", "b_up", "scaling", "residual", "weights")


def make_case(n, shape, r, dtype, *, scaling="channel", residual=False, weights=None, bias=True):
    d = shape[-1]

    def rand(*s, scale=1.0):
        return (torch.randn(*s, device=DEVICE) * scale).to(dtype).requires_grad_()

    s_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    case = {
        "x": rand(*shape),
        "w_down": rand(n, r, d, scale=d**-0.5),
        "b_down": rand(n, r, scale=0.5) if bias else None,
        "w_up": rand(n, d, r, scale=r**-0.5),
        "b_up": rand(n, d, scale=0.5) if bias else None,
        "scaling": {
            "channel": lambda: (torch.rand(n, d, device=DEVICE, dtype=s_dtype) + 0.5).requires_grad_(),
            "adapter": lambda: (torch.rand(n, device=DEVICE, dtype=s_dtype) + 0.5).requires_grad_(),
            "float": lambda: 0.75,
        }[scaling](),
        "residual": rand(*shape) if residual else None,
        "weights": None,
    }
    if weights == "global":
        case["weights"] = torch.softmax(torch.randn(n, device=DEVICE, dtype=s_dtype), 0).requires_grad_()
    elif weights == "token":
        case["weights"] = torch.softmax(torch.randn(*shape[:-1], n, device=DEVICE, dtype=s_dtype), -1).requires_grad_()
    return case


def loop_reference(c, activation, add_residual, math_dtype=torch.float64):
    """The formula, one adapter at a time, in ``math_dtype`` (float64: the reference; float32, its
    results rounded to the inputs' dtype: the rounding error that sets the bound)."""
    cast = {k: (v.to(math_dtype) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    act = reference_activation(activation)
    x = cast["x"]
    res = x if cast["residual"] is None else cast["residual"]
    outs = []
    for i in range(cast["w_down"].shape[0]):
        h = x @ cast["w_down"][i].t()
        if cast["b_down"] is not None:
            h = h + cast["b_down"][i]
        u = act(h) @ cast["w_up"][i].t()
        if cast["b_up"] is not None:
            u = u + cast["b_up"][i]
        s = cast["scaling"]
        u = u * (s[i] if isinstance(s, torch.Tensor) else s)
        outs.append(u)
    stack = torch.stack(outs)
    if cast["weights"] is None:
        return stack + res if add_residual else stack
    w = cast["weights"]
    mixed = (stack * (w.reshape(-1, *[1] * x.dim()) if w.dim() == 1 else w.movedim(-1, 0).unsqueeze(-1))).sum(0)
    return mixed + res if add_residual else mixed


def check(case, backend, activation="gelu", add_residual=True):
    dtype = case["x"].dtype
    y = adapterkern.multi_adapter(
        case["x"], case["w_down"], case["b_down"], case["w_up"], case["b_up"], activation=activation,
        scaling=case["scaling"], residual=case["residual"], add_residual=add_residual, weights=case["weights"], backend=backend,
    )
    ref = loop_reference(case, activation, add_residual)
    rounded = loop_reference(case, activation, add_residual, math_dtype=torch.promote_types(dtype, torch.float32))
    assert y.dtype == dtype
    check_against_reference(y, ref, rounded, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_stack(backend, dtype, n, poison_empty):
    check(make_case(n, (2, 9, 32), 12, dtype), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs, add_residual",
    [
        (dict(scaling="adapter"), True),
        (dict(scaling="float", bias=False), True),
        (dict(residual=True), True),
        (dict(scaling="adapter"), False),
        (dict(weights="global"), True),
        (dict(weights="global", scaling="float", bias=False, residual=True), True),
        (dict(weights="global", scaling="adapter"), False),
        (dict(weights="token", scaling="adapter"), True),
        (dict(weights="token"), False),
    ],
    ids=["adapter-scaling", "float-no-bias", "residual", "no-residual", "weights", "weights-float-no-bias-residual",
         "weights-no-res", "token-weights", "token-weights-no-res"],
)
def test_variants(backend, kwargs, add_residual, poison_empty):
    check(make_case(3, (37, 24), 20, torch.float32, **kwargs), backend, activation="silu", add_residual=add_residual)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_static_mix_half(backend, dtype, poison_empty):
    check(make_case(4, (2, 9, 32), 12, dtype, weights="global"), backend)


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not is_available("triton", DEVICE), reason=f"backend 'triton' not available on {DEVICE}")
@pytest.mark.parametrize(
    "n, r, folded",
    [(4, 8, True), (8, 64, True), (27, 19, False), (3, 200, False)],
    ids=["rank-32-folded", "rank-512-folded", "rank-513-stacked", "rank-600-stacked"],
)
def test_static_mix_folds_into_one_adapter(n, r, folded):
    """Weights of shape (N,) run as one adapter of rank N*r (one kernel call writing only the mixed result)
    while N*r <= 512 (the widest R_PAD the kernels are tuned for); above it, as the (N, T, d) stack and a
    reduction. Same numbers either way."""
    case = make_case(n, (5, 16), r, torch.float32, weights="global")
    with _RecordOps() as rec:
        y = adapterkern.multi_adapter(case["x"], case["w_down"], case["b_down"], case["w_up"], case["b_up"],
                                      scaling=case["scaling"], weights=case["weights"], backend="triton")
    fwd = [shapes for op, shapes in rec.calls if op.startswith("adapterkern.multi_adapter_fwd")]
    assert len(fwd) == 1
    assert fwd[0][1] == ((1, n * r, 16) if folded else (n, r, 16))  # w_down as the op sees it
    ref = loop_reference(case, "relu", True)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", [None, "global"], ids=["stack", "static-mix"])
def test_gradcheck(backend, weights):
    case = make_case(2, (5, 8), 3, torch.float64, scaling="adapter", weights=weights)
    names = [k for k in NAMES if isinstance(case[k], torch.Tensor)]

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        return adapterkern.multi_adapter(
            kw["x"], kw["w_down"], kw["b_down"], kw["w_up"], kw["b_up"], activation="gelu_new", scaling=kw["scaling"],
            weights=kw.get("weights"), backend=backend,
        )

    assert torch.autograd.gradcheck(fn, [case[k] for k in names], fast_mode=True)  # random directions: the interpreter is slow


def test_stack_of_one_is_the_single_adapter():
    case = make_case(1, (9, 16), 4, torch.float32, scaling="adapter")
    y = adapterkern.multi_adapter(case["x"], case["w_down"], case["b_down"], case["w_up"], case["b_up"], scaling=case["scaling"], backend="torch")
    single = adapterkern.bottleneck_adapter(
        case["x"], case["w_down"][0], case["b_down"][0], case["w_up"][0], case["b_up"][0], scaling=case["scaling"], backend="torch"
    )
    assert rel_err(y[0], single) < 1e-6


@pytest.mark.skipif(not is_available("triton", DEVICE), reason="triton backend not available")
def test_opcheck():
    c = make_case(3, (21, 32), 8, torch.float32, scaling="adapter")
    args = [c["x"], c["w_down"], c["b_down"], c["w_up"], c["b_up"], c["scaling"].reshape(3, 1), 1.0, None, True, 1, True, "triton"]
    torch.library.opcheck(torch.ops.adapterkern.multi_adapter_fwd.default, args)
    with torch.no_grad():
        _, preact = torch.ops.adapterkern.multi_adapter_fwd(*args)
    dy = torch.randn(3, 21, 32)
    detached = [t.detach() for t in (c["x"], c["w_down"], c["b_down"], c["w_up"], c["b_up"])]
    bwd_args = [dy, detached[0], preact, *detached[1:], c["scaling"].detach().reshape(3, 1), 1.0, True, 1, "triton", [True] * 6]
    torch.library.opcheck(torch.ops.adapterkern.multi_adapter_bwd.default, bwd_args)


@pytest.mark.skipif(not is_available("triton", DEVICE), reason="triton backend not available")
def test_compile_fullgraph():
    c = make_case(2, (16, 32), 8, torch.float32, scaling="adapter")

    def f(x, wd, bd, wu, bu, s):
        return adapterkern.multi_adapter(x, wd, bd, wu, bu, activation="relu", scaling=s, backend="triton").sum(0)

    args = [c[k] for k in ("x", "w_down", "b_down", "w_up", "b_up", "scaling")]
    expected = f(*args)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    assert rel_err(got, expected) < 1e-6


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(w_down=torch.randn(8, 16)), ValueError, "w_down: expected a 3-D"),
        (dict(w_up=torch.randn(2, 16, 5)), ValueError, "w_up: expected shape"),
        (dict(b_down=torch.randn(3, 4)), ValueError, "b_down"),
        (dict(scaling=torch.rand(3)), ValueError, "scaling"),
        (dict(scaling="x"), TypeError, "scaling"),
        (dict(weights=torch.rand(7, 3)), ValueError, "weights"),
        (dict(weights=[0.5, 0.5]), TypeError, "weights"),
        (dict(w_up=torch.randn(2, 16, 4, dtype=torch.float64)), TypeError, "w_up: expected dtype"),
        (dict(add_residual=False, residual=torch.randn(7, 16)), ValueError, "residual"),
        (dict(backend="cuda"), (ValueError, RuntimeError), "cuda"),
    ],
)
def test_bad_input(change, exc, match):
    kw = dict(x=torch.randn(7, 16), w_down=torch.randn(2, 4, 16), b_down=torch.randn(2, 4), w_up=torch.randn(2, 16, 4), b_up=torch.randn(2, 16))
    kw.update(change)
    x, wd, bd, wu, bu = (kw.pop(k) for k in ("x", "w_down", "b_down", "w_up", "b_up"))
    with pytest.raises(exc, match=match):
        adapterkern.multi_adapter(x, wd, bd, wu, bu, **kw)
