"""adapterkern.bottleneck_adapter on every backend against the float64 reference: forward and every gradient."""
import pytest
import torch

import adapterkern
from adapterkern.backends import implements, is_available
from conftest import ACTIVATIONS, DEVICE, REF_ALIASES, reference_adapter, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Max error relative to the tensor's scale, per dtype (inputs rounded to dtype, fp32 accumulation,
# the bottleneck activations rounded to dtype before the up-projection as PyTorch does): the floor of
# the bound in check().
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _backend_param(name):
    reason = f"backend {name!r} is not available on {DEVICE}"
    if name == "cuda":
        reason = "the CUDA backend needs a CUDA device and the built extension"
    return pytest.param(name, marks=pytest.mark.skipif(not is_available(name, DEVICE), reason=reason), id=name)


BACKENDS = [_backend_param(name) for name in ("torch", "triton", "cuda")]
KERNEL_BACKENDS = [_backend_param(name) for name in ("triton", "cuda")]


def make_case(
    shape, r, dtype, *, bias=(True, True), scaling=0.75, residual=False, grad=("x", "w_down", "b_down", "w_up", "b_up", "scaling", "residual")
):
    """Fresh random inputs (never zeros) at scales where every term of y matters."""
    d = shape[-1]
    dev = DEVICE

    def rand(*s, scale=1.0, name=None):
        t = (torch.randn(*s, device=dev, dtype=torch.float32) * scale).to(dtype)
        return t.requires_grad_(name in grad)

    case = {
        "x": rand(*shape, name="x"),
        "w_down": rand(r, d, scale=d**-0.5, name="w_down"),
        "b_down": rand(r, scale=0.5, name="b_down") if bias[0] else None,
        "w_up": rand(d, r, scale=r**-0.5, name="w_up"),
        "b_up": rand(d, scale=0.5, name="b_up") if bias[1] else None,
        "scaling": scaling,
        "residual": rand(*shape, name="residual") if residual else None,
    }
    # Learned scaling parameters stay float32 (as in a mixed-precision model), float64 for gradcheck.
    s_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if scaling == "scalar":
        case["scaling"] = (torch.rand(1, device=dev, dtype=s_dtype) + 0.5).requires_grad_("scaling" in grad)
    elif scaling == "channel":
        case["scaling"] = (torch.rand(d, device=dev, dtype=s_dtype) + 0.5).requires_grad_("scaling" in grad)
    return case


NAMES = ("x", "w_down", "b_down", "w_up", "b_up", "scaling", "residual")


def _with_grads(y, inputs, dy):
    """(y, {name: grad of y w.r.t. inputs[name], or None where it does not require grad})."""
    leaves = [inputs[n] for n in NAMES]
    wants = [isinstance(t, torch.Tensor) and t.requires_grad for t in leaves]
    grads = [None] * len(NAMES)
    if any(wants):
        got = iter(torch.autograd.grad(y, [t for t, w in zip(leaves, wants) if w], None if dy is None else dy.to(y.dtype)))
        grads = [next(got) if w else None for w in wants]
    return y, dict(zip(NAMES, grads))


def run(case, backend, activation="relu", dy=None):
    """y and the grads of every input that requires grad (None for the others)."""
    y = adapterkern.bottleneck_adapter(
        case["x"], case["w_down"], case["b_down"], case["w_up"], case["b_up"],
        activation=activation, scaling=case["scaling"], residual=case["residual"], backend=backend,
    )
    return _with_grads(y, case, dy)


def reference(case, activation="relu", dy=None):
    """The float64 reference on float64 copies of the same inputs.

    Also returns, for the bias gradients (sums over tokens that may cancel), their condition scale
    sum_T |per-token term|: the biases enter the reference expanded to one copy per token.
    """
    f64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    y, grads = run_reference(f64, activation, dy)
    scales = {}
    num_tokens = case["x"].reshape(-1, case["x"].shape[-1]).shape[0]
    bias_names = [n for n in ("b_down", "b_up") if grads.get(n) is not None]
    if bias_names and num_tokens > 0:
        per_token = dict(f64)
        for n in bias_names:
            per_token[n] = f64[n].detach().expand(num_tokens, -1).clone().requires_grad_()
        terms = torch.autograd.grad(
            reference_adapter(*(per_token[n] for n in ("x", "w_down", "b_down", "w_up", "b_up")), activation,
                              per_token["scaling"], per_token["residual"]),
            [per_token[n] for n in bias_names], None if dy is None else dy.double(), allow_unused=True,
        )
        scales = {n: t.abs().sum(0) for n, t in zip(bias_names, terms)}
    return y, grads, scales


def run_reference(inputs, activation, dy):
    """reference_adapter on ``inputs`` in their own dtype, and its autograd gradients."""
    y = reference_adapter(
        inputs["x"], inputs["w_down"], inputs["b_down"], inputs["w_up"], inputs["b_up"], activation, inputs["scaling"], inputs["residual"]
    )
    return _with_grads(y, inputs, dy)


def rounded_reference(case, activation, dy):
    """The formula in float32 (float64 for float64) on the same inputs, y and grads rounded to their dtypes."""
    math = torch.promote_types(case["x"].dtype, torch.float32)
    wide = {k: (v.to(math) if isinstance(v, torch.Tensor) and v.dtype != math else v) for k, v in case.items()}
    y, grads = run_reference(wide, activation, None if dy is None else dy.to(math))
    return y.to(case["x"].dtype), {k: None if g is None else g.to(case[k].dtype) for k, g in grads.items()}


def check(case, backend, activation="relu", dy=None):
    """Compare y and every gradient with the float64 reference.

    Bound per tensor: max(TOL[dtype], 2 x the error of float32 maths on the same inputs with its
    results rounded to the dtype), the dtype's own rounding; relative errors are taken against the
    condition scale of reductions whose result cancels (a bias gradient summed over T can be much
    smaller than its terms).
    """
    dtype = case["x"].dtype
    requires = any(isinstance(v, torch.Tensor) and v.requires_grad for v in case.values())
    if dy is None and requires:
        dy = torch.randn(case["x"].shape, device=DEVICE).to(dtype)
    y, grads = run(case, backend, activation, dy)
    y_ref, grads_ref, scales = reference(case, activation, dy)
    y_base, grads_base = rounded_reference(case, activation, dy)
    assert y.shape == case["x"].shape and y.dtype == dtype
    assert torch.isfinite(y).all(), "output has non-finite values (unwritten elements?)"
    outs = {"y": (y, y_ref, y_base), **{n: (grads[n], grads_ref[n], grads_base[n]) for n in grads_ref}}
    for name, (out, ref, base) in outs.items():
        if ref is None:
            assert out is None, f"d{name} should be None"
            continue
        assert out is not None, f"d{name} missing"
        like = y if name == "y" else case[name]
        assert out.shape == like.shape and out.dtype == like.dtype, f"d{name}: {out.shape} {out.dtype}"
        assert torch.isfinite(out).all(), f"{name}: non-finite values"
        err, base_err = rel_err(out, ref, scales.get(name)), rel_err(base, ref, scales.get(name))
        bound = max(TOL[dtype], 2.0 * base_err)
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g} (float32 maths rounded to {dtype}: {base_err:.3g})"
    return y, grads


# (T, d, r): every pair of T x r, d x r and most of T x d covered, plus T = 0.
SHAPES = [
    (0, 16, 8),
    (1, 16, 1), (1, 100, 8), (1, 768, 48), (1, 16, 64),
    (3, 100, 1), (3, 768, 8), (3, 16, 48), (3, 100, 64),
    (37, 768, 1), (37, 16, 8), (37, 100, 48), (37, 768, 64),
    (257, 16, 1), (257, 100, 8), (257, 300, 48), (257, 16, 64),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d,r", SHAPES)
def test_shapes(backend, dtype, T, d, r, poison_empty):
    check(make_case((T, d), r, dtype), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(backend, dtype, activation, poison_empty):
    # channel scaling requiring grad: exercises dscale through every activation too.
    check(make_case((37, 100), 8, dtype, scaling="channel"), backend, activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alias", sorted(REF_ALIASES))
def test_activation_aliases(backend, alias, poison_empty):
    check(make_case((5, 16), 4, torch.float32), backend, alias)


def _noncontiguous(case):
    """x, residual as (B, S, d) permuted views; w_down and w_up as transposed views."""
    out = dict(case)
    for name in ("x", "residual"):
        t = case[name]
        if t is not None:
            out[name] = t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(t.requires_grad)
    for name in ("w_down", "w_up"):
        t = case[name]
        out[name] = t.detach().t().contiguous().t().requires_grad_(t.requires_grad)
    assert not out["x"].is_contiguous() and not out["w_down"].is_contiguous()
    return out


VARIANTS = {
    "3d": dict(shape=(3, 13, 100)),
    "no_biases": dict(bias=(False, False)),
    "no_down_bias": dict(bias=(False, True)),
    "no_up_bias": dict(bias=(True, False)),
    "scaling_one": dict(scaling=1.0),
    "scaling_negative": dict(scaling=-2.5),
    "scaling_scalar_tensor": dict(scaling="scalar"),
    "scaling_channel": dict(scaling="channel"),
    "residual": dict(residual=True),
    "residual_channel": dict(residual=True, scaling="channel", bias=(False, True)),
    "noncontiguous": dict(shape=(4, 11, 100), residual=True, transform=_noncontiguous),
    "frozen_adapter": dict(grad=("x",)),  # a frozen adapter inside a trained model
    "frozen_input": dict(grad=("w_down", "b_down", "w_up", "b_up")),  # first layer: x needs no grad
    "frozen_input_residual": dict(residual=True, grad=("w_up", "residual")),
    "inference": dict(grad=()),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants(backend, dtype, variant, poison_empty):
    spec = dict(VARIANTS[variant])
    shape = spec.pop("shape", (37, 100))
    transform = spec.pop("transform", None)
    case = make_case(shape, 48, dtype, **spec)
    if transform is not None:
        case = transform(case)
    check(case, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_noncontiguous_grad_output(backend, poison_empty):
    case = make_case((37, 100), 8, torch.float32)
    dy = torch.randn(100, 37, device=DEVICE).t()  # (37, 100) with strides (1, 37)
    check(case, backend, dy=dy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_under_no_grad(backend, poison_empty):
    case = make_case((37, 100), 8, torch.bfloat16, grad=())
    with torch.no_grad():
        y, _ = run(case, backend)
    y_ref, _, _ = reference(case)
    assert not y.requires_grad
    assert rel_err(y, y_ref) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_nan_stays_in_its_row(backend, activation, poison_empty):
    case = make_case((37, 100), 8, torch.float32, grad=())
    case["x"][5, 17] = float("nan")
    case["x"][9, 0] = float("inf")
    y, _ = run(case, backend, activation)
    bad = ~torch.isfinite(y)
    assert bad[5].all() and bad[9].any()
    assert torch.isfinite(y[[i for i in range(37) if i not in (5, 9)]]).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_weight_gradients_are_deterministic(backend):
    case = make_case((257, 100), 48, torch.bfloat16, scaling="channel")
    dy = torch.randn(257, 100, device=DEVICE).to(torch.bfloat16)
    _, first = run(case, backend, "gelu", dy)
    _, second = run(case, backend, "gelu", dy)
    for name, g in first.items():
        if g is not None:
            assert torch.equal(g, second[name]), f"d{name} differs between two identical backward passes"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    case = make_case((1, 4, 8), 3, torch.float64, scaling="channel", residual=True)  # every Jacobian entry: keep it small
    def fn(*tensors):
        kw = dict(zip(NAMES, tensors))
        return adapterkern.bottleneck_adapter(
            kw["x"], kw["w_down"], kw["b_down"], kw["w_up"], kw["b_up"],
            activation="gelu", scaling=kw["scaling"], residual=kw["residual"], backend=backend,
        )

    assert torch.autograd.gradcheck(fn, tuple(case[n] for n in NAMES), eps=1e-6, atol=1e-5)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU with >8 GiB free: the CPU interpreter would take hours on 2^31 elements")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_int64_offsets(backend):
    # T * d > 2^31: token offsets must be 64-bit.
    T, d, r = 2**31 // 1024 + 64, 1024, 16
    case = make_case((T, d), r, torch.bfloat16, grad=())
    y, _ = run(case, backend)
    tail = slice(T - 64, T)
    ref = reference_adapter(*(case[n][tail].double() if n in ("x",) else (case[n].double() if case[n] is not None else None) for n in ("x", "w_down", "b_down", "w_up", "b_up")), "relu", case["scaling"])
    assert rel_err(y[tail], ref) <= TOL[torch.bfloat16]


# ------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError / TypeError naming the argument, expected and actual.
# ------------------------------------------------------------------------------------------------


def _good(T=4, d=16, r=4, dtype=torch.float32):
    return dict(
        x=torch.randn(T, d, device=DEVICE, dtype=dtype),
        w_down=torch.randn(r, d, device=DEVICE, dtype=dtype),
        b_down=torch.randn(r, device=DEVICE, dtype=dtype),
        w_up=torch.randn(d, r, device=DEVICE, dtype=dtype),
        b_up=torch.randn(d, device=DEVICE, dtype=dtype),
    )


BAD_INPUTS = {
    "d_mismatch_w_down": (lambda a: a.update(w_down=torch.randn(4, 15)), ValueError, r"w_down.*\(4, 16\)"),
    "r_mismatch_w_up": (lambda a: a.update(w_up=torch.randn(16, 5)), ValueError, r"w_up.*\(16, 4\).*\(16, 5\)"),
    "w_up_transposed": (lambda a: a.update(w_up=torch.randn(4, 16)), ValueError, r"w_up"),
    "w_down_rank": (lambda a: a.update(w_down=torch.randn(4, 16, 1)), ValueError, r"w_down.*2-D"),
    "w_up_rank": (lambda a: a.update(w_up=torch.randn(16 * 4)), ValueError, r"w_up.*2-D"),
    "b_down_shape": (lambda a: a.update(b_down=torch.randn(5)), ValueError, r"b_down.*\(4,\)"),
    "b_up_shape": (lambda a: a.update(b_up=torch.randn(4)), ValueError, r"b_up.*\(16,\)"),
    "dtype_mixed": (lambda a: a.update(w_up=torch.randn(16, 4, dtype=torch.float16)), TypeError, r"w_up.*float32.*float16"),
    "x_int": (lambda a: a.update(x=torch.ones(4, 16, dtype=torch.int64)), TypeError, r"x: expected dtype"),
    "x_not_tensor": (lambda a: a.update(x=[[1.0] * 16]), TypeError, r"x: expected a torch.Tensor"),
    "x_scalar": (lambda a: a.update(x=torch.tensor(1.0)), ValueError, r"x: expected shape"),
    "device_mixed": (lambda a: a.update(b_up=torch.randn(16, device="meta")), ValueError, r"b_up: expected device"),
    "residual_shape": (lambda a: a.update(residual=torch.randn(4, 15)), ValueError, r"residual.*\(4, 16\).*\(4, 15\)"),
    "residual_dtype": (lambda a: a.update(residual=torch.randn(4, 16, dtype=torch.float64)), TypeError, r"residual.*float64"),
    "unknown_activation": (lambda a: a.update(activation="gelu_x"), ValueError, r"activation.*'gelu_x'.*relu"),
    "activation_not_str": (lambda a: a.update(activation=3), TypeError, r"activation"),
    "scaling_shape": (lambda a: a.update(scaling=torch.ones(3)), ValueError, r"scaling.*\(1,\) or \(16,\)"),
    "scaling_bool": (lambda a: a.update(scaling=True), TypeError, r"scaling"),
    "scaling_str": (lambda a: a.update(scaling="learned"), TypeError, r"scaling"),
    "scaling_int_tensor": (lambda a: a.update(scaling=torch.ones(1, dtype=torch.int32)), TypeError, r"scaling.*floating"),
    "unknown_backend": (lambda a: a.update(backend="cudnn"), ValueError, r"backend.*'cudnn'.*torch, triton, cuda"),
}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the bad tensors are built on the CPU")
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_clear_error(case):
    mutate, exc, pattern = BAD_INPUTS[case]
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=pattern):
        adapterkern.bottleneck_adapter(
            args.pop("x"), args.pop("w_down"), args.pop("b_down"), args.pop("w_up"), args.pop("b_up"), **args
        )


def _three_ops(x, w_down, b_down, w_up, b_up, backend):
    """The ops ``backend`` implements on one adapter (stacks of one), as (name, output)."""
    stack = [t.unsqueeze(0) if t is not None else None for t in (w_down, b_down, w_up, b_up)]
    index = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    calls = {
        "bottleneck_adapter": lambda: adapterkern.bottleneck_adapter(x, w_down, b_down, w_up, b_up, backend=backend),
        "multi_adapter": lambda: adapterkern.multi_adapter(x, *stack, backend=backend)[0],
        "bottleneck_adapter_batched": lambda: adapterkern.bottleneck_adapter_batched(x, index, *stack, backend=backend),
    }
    return [(name, call()) for name, call in calls.items() if implements(backend, name)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_like_linear_on_every_backend(backend):
    """Under autocast the ops run as nn.Linear does there: float32 inputs and parameters are cast to the
    autocast dtype and the result is in it, the same on every backend, with the numbers of the op on the
    cast inputs; bf16 activations with float32 adapter parameters (a mixed-precision model) are accepted."""
    x = torch.randn(2, 5, 16, device=DEVICE)
    w_down, b_down = torch.randn(4, 16, device=DEVICE) * 0.25, torch.randn(4, device=DEVICE)
    w_up, b_up = torch.randn(16, 4, device=DEVICE) * 0.5, torch.randn(16, device=DEVICE)
    low = torch.bfloat16
    expected = reference_adapter(*(t.to(low).double() for t in (x, w_down, b_down, w_up, b_up)))
    with torch.autocast(DEVICE.type, dtype=low):
        for name, y in _three_ops(x, w_down, b_down, w_up, b_up, backend) + _three_ops(x.to(low), w_down, b_down, w_up, b_up, backend):
            assert y.dtype == low, name
            assert rel_err(y, expected) < TOL[low], name
    for name, y in _three_ops(x, w_down, b_down, w_up, b_up, backend):  # autocast off: x's dtype
        assert y.dtype == torch.float32, name
    with pytest.raises(TypeError, match="w_down: expected dtype torch.bfloat16"):
        adapterkern.bottleneck_adapter(x.to(low), w_down, b_down, w_up, b_up, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", ["b_down", "b_up"])
def test_bias_of_another_dtype_is_a_type_error_naming_it(backend, bias):
    x = torch.randn(5, 16, device=DEVICE)
    params = {"w_down": torch.randn(4, 16, device=DEVICE), "b_down": torch.randn(4, device=DEVICE),
              "w_up": torch.randn(16, 4, device=DEVICE), "b_up": torch.randn(16, device=DEVICE)}
    params[bias] = params[bias].double()
    with pytest.raises(TypeError, match=rf"{bias}: expected dtype torch.float32"):
        adapterkern.bottleneck_adapter(x, *(params[k] for k in ("w_down", "b_down", "w_up", "b_up")), backend=backend)
    stack = [params[k].unsqueeze(0) for k in ("w_down", "b_down", "w_up", "b_up")]
    with pytest.raises(TypeError, match=rf"{bias}: expected dtype torch.float32"):
        adapterkern.multi_adapter(x, *stack, backend="torch" if backend == "cuda" else backend)
    with pytest.raises(TypeError, match=rf"{bias}: expected dtype torch.float32"):
        adapterkern.bottleneck_adapter_batched(
            x, torch.zeros(5, dtype=torch.long, device=DEVICE), *stack, backend="torch" if backend == "cuda" else backend
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_biases(backend):
    """Biases that are strided views (every other element of a longer vector) give the maths of their values."""
    x = torch.randn(7, 16, device=DEVICE, requires_grad=True)
    w_down, w_up = torch.randn(4, 16, device=DEVICE) * 0.25, torch.randn(16, 4, device=DEVICE) * 0.5
    b_down_full, b_up_full = torch.randn(8, device=DEVICE), torch.randn(32, device=DEVICE)
    b_down, b_up = b_down_full[::2], b_up_full[::2]
    y = adapterkern.bottleneck_adapter(x, w_down, b_down, w_up, b_up, activation="gelu", backend=backend)
    ref = reference_adapter(x.double(), w_down.double(), b_down.double(), w_up.double(), b_up.double(), "gelu")
    assert rel_err(y, ref) < TOL[torch.float32]
    stack = [t.unsqueeze(0) for t in (w_down, b_down, w_up, b_up)]
    multi_backend = "torch" if not implements(backend, "multi_adapter") else backend
    y_stack = adapterkern.multi_adapter(x, *stack, activation="gelu", backend=multi_backend)[0]
    assert rel_err(y_stack, ref) < TOL[torch.float32]
    (g,) = torch.autograd.grad(y.sum(), [x])
    (g_ref,) = torch.autograd.grad(ref.sum(), [x])
    assert rel_err(g, g_ref) < TOL[torch.float32]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("r", [300, 512])
def test_wide_bottleneck_float32_backward(backend, r):
    """r in (256, 512]: R_PAD 512, where the fp32 backward's multi-stage Triton configs need more shared
    memory than a GPU has (only the single-stage ones launch there); forward and every gradient."""
    check(make_case((20, 32), r, torch.float32, scaling="channel"), backend, activation="gelu")
