"""adapterkern.adapter_add_norm (issue 15): a sequential adapter fused with the residual add and the
LayerNorm / RMSNorm, on the torch and Triton backends, against a float64 reference written here from
the formula; argument checks; the registered op (opcheck, torch.compile); the inference-only backward."""
import pytest
import torch

import adapterkern
from adapterkern.backends import ENV_VAR, is_available, resolve_backend
from conftest import DEVICE, reference_activation, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Floors of the bound (see check): one rounding of the adapter's bottleneck activations to the dtype
# (both backends, as PyTorch does) and of y before the norm (torch backend) on top of the output's own.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
NORMS = ["layernorm", "rmsnorm"]


def _backend(name):
    return pytest.param(name, id=name, marks=pytest.mark.skipif(not is_available(name, DEVICE), reason=f"backend {name!r} not available on {DEVICE}"))


BACKENDS = [_backend("torch"), _backend("triton")]
TRITON = [_backend("triton")]


def reference(z, residual, w_down, b_down, w_up, b_up, norm_weight, norm_bias, activation, scaling, eps, norm):
    """The formula in the inputs' own dtype (called on float64 or float32 copies)."""
    h = z @ w_down.t()
    if b_down is not None:
        h = h + b_down
    u = reference_activation(activation)(h) @ w_up.t()
    if b_up is not None:
        u = u + b_up
    y = z + scaling * u + residual
    if norm == "layernorm":
        mean = y.sum(-1, keepdim=True) / y.shape[-1]
        var = ((y - mean) * (y - mean)).sum(-1, keepdim=True) / y.shape[-1]
        out = (y - mean) / torch.sqrt(var + eps)
    else:
        out = y / torch.sqrt((y * y).sum(-1, keepdim=True) / y.shape[-1] + eps)
    if norm_weight is not None:
        out = out * norm_weight
    if norm_bias is not None:
        out = out + norm_bias
    return out


ARGS = ("z", "residual", "w_down", "b_down", "w_up", "b_up", "norm_weight", "norm_bias")


def make_case(shape, r, dtype, *, norm="layernorm", bias=(True, True), scaling=0.75, affine=True, noncontig=False, offset=0.0):
    """Random inputs at scales where every term matters; ``noncontig``: z strided over d, residual permuted."""
    d = shape[-1]

    def rand(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, device=DEVICE) * scale + shift).to(dtype)

    if noncontig:
        z = rand(*shape[:-1], 2 * d)[..., ::2]
        residual = rand(*reversed(shape), shift=offset).permute(*reversed(range(len(shape))))
        assert not z.is_contiguous() and not residual.is_contiguous()
    else:
        z, residual = rand(*shape), rand(*shape, shift=offset)
    case = dict(
        z=z, residual=residual,
        w_down=rand(r, d, scale=d**-0.5), b_down=rand(r, scale=0.5) if bias[0] else None,
        w_up=rand(d, r, scale=r**-0.5), b_up=rand(d, scale=0.5) if bias[1] else None,
        norm_weight=rand(d, scale=0.5, shift=1.0) if affine else None,
        norm_bias=rand(d, scale=0.2) if affine and norm == "layernorm" else None,
    )
    s_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # learned scalings stay float32
    if scaling == "scalar":
        scaling = torch.rand(1, device=DEVICE, dtype=s_dtype) + 0.5
    elif scaling == "channel":
        scaling = torch.rand(d, device=DEVICE, dtype=s_dtype) + 0.5
    return case, scaling


def run(case, scaling, backend, activation="relu", norm="layernorm", eps=1e-5):
    return adapterkern.adapter_add_norm(*(case[n] for n in ARGS), activation=activation, scaling=scaling, eps=eps,
                                        norm=norm, backend=backend)


def check(out, case, scaling, activation, norm, eps):
    """out against the float64 reference, within max(TOL[dtype], 2x the error of float32 maths on the
    same inputs rounded to the dtype): the error the dtype's own rounding of the result makes."""
    z = case["z"]
    assert out.shape == z.shape and out.dtype == z.dtype and out.is_contiguous()
    assert not torch.isnan(out).any(), "unwritten (poisoned) or NaN elements"

    def at(dtype):
        args = [None if t is None else t.to(dtype) for t in (case[n] for n in ARGS)]
        s = scaling.to(dtype) if isinstance(scaling, torch.Tensor) else scaling
        return reference(*args, activation, s, eps, norm)

    ref = at(torch.float64)
    rounded = at(torch.promote_types(z.dtype, torch.float32)).to(z.dtype)
    bound = max(TOL[z.dtype], 2 * rel_err(rounded, ref))
    err = rel_err(out, ref)
    assert err <= bound, (err, bound)
    return err


CASES = {
    # id: (shape, r, activation, bias (down, up), scaling, affine, noncontig)
    "T1-d100-r8": ((1, 100), 8, "relu", (True, True), 1.0, True, False),
    "ragged-T37-d100-r1-nobias-scalar": ((37, 100), 1, "gelu", (False, False), "scalar", True, False),
    "batch-2x5-d64-r64-channel": ((2, 5, 64), 64, "silu", (True, False), "channel", True, False),
    "T19-d768-r8-noncontig": ((19, 768), 8, "gelu", (False, True), 0.5, True, True),
    "3x11-d100-noaffine-noncontig-channel": ((3, 11, 100), 8, "relu", (True, True), "channel", False, True),
}


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("case_id", list(CASES))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, norm, case_id):
    shape, r, activation, bias, scaling, affine, noncontig = CASES[case_id]
    case, scaling = make_case(shape, r, dtype, norm=norm, bias=bias, scaling=scaling, affine=affine, noncontig=noncontig)
    out = run(case, scaling, backend, activation, norm, eps=1e-5)
    check(out, case, scaling, activation, norm, 1e-5)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64(backend, norm):
    case, scaling = make_case((13, 48), 4, torch.float64, norm=norm, scaling="channel")
    check(run(case, scaling, backend, "gelu", norm, eps=1e-12), case, scaling, "gelu", norm, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_common_offset_does_not_cancel(backend):
    """y with mean ~100 and unit spread: var = E[y^2] - E[y]^2 in float32 would lose ~3 digits; the
    statistics must stay as good as float32 maths on the deviations (the bound of check)."""
    case, scaling = make_case((24, 768), 8, torch.float32, scaling=0.5, offset=100.0)
    err = check(run(case, scaling, backend, eps=1e-12), case, scaling, "relu", "layernorm", 1e-12)
    assert err < 2e-5


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)], ids=str)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend, norm, shape):
    case, scaling = make_case(shape, 8, torch.float32, norm=norm)
    out = run(case, scaling, backend, norm=norm)
    assert out.shape == shape and out.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_block(backend):
    """BertOutput with an adapter: LayerNorm(adapter(dense(h)) + input_tensor), nn.LayerNorm's parameters."""
    d, r = 64, 16
    dense, ln = torch.nn.Linear(4 * d, d).to(DEVICE), torch.nn.LayerNorm(d, eps=1e-12).to(DEVICE)
    torch.nn.init.normal_(ln.weight, 1.0, 0.3)
    torch.nn.init.normal_(ln.bias, 0.0, 0.3)
    down, up = torch.nn.Linear(d, r).to(DEVICE), torch.nn.Linear(r, d).to(DEVICE)
    h, inp = torch.randn(2, 9, 4 * d, device=DEVICE), torch.randn(2, 9, d, device=DEVICE)
    with torch.no_grad():
        z = dense(h)
        expected = ln(z + up(torch.relu(down(z))) + inp)
        out = adapterkern.adapter_add_norm(z, inp, down.weight, down.bias, up.weight, up.bias, ln.weight, ln.bias,
                                           eps=ln.eps, backend=backend)
    assert rel_err(out, expected) < 2e-5


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------
def _bad(**changes):
    return changes


BAD = {
    "z-not-tensor": (_bad(z="z"), TypeError, "z:"),
    "z-int": (_bad(z=torch.ones(4, 16, dtype=torch.int64)), TypeError, "z:"),
    "residual-none": (_bad(residual=None), TypeError, "residual:"),
    "residual-shape": (_bad(residual=torch.randn(4, 15)), ValueError, "residual:"),
    "residual-dtype": (_bad(residual=torch.randn(4, 16, dtype=torch.float64)), TypeError, "residual:"),
    "w_down-1d": (_bad(w_down=torch.randn(16)), ValueError, "w_down:"),
    "w_down-cols": (_bad(w_down=torch.randn(3, 15)), ValueError, "w_down:"),
    "w_up-shape": (_bad(w_up=torch.randn(16, 4)), ValueError, "w_up:"),
    "b_down-shape": (_bad(b_down=torch.randn(4)), ValueError, "b_down:"),
    "b_up-dtype": (_bad(b_up=torch.randn(16, dtype=torch.float16)), TypeError, "b_up:"),
    "norm_weight-shape": (_bad(norm_weight=torch.randn(15)), ValueError, "norm_weight:"),
    "norm_weight-dtype": (_bad(norm_weight=torch.randn(16, dtype=torch.bfloat16)), TypeError, "norm_weight:"),
    "norm_bias-shape": (_bad(norm_bias=torch.randn(16, 1)), ValueError, "norm_bias:"),
    "norm_bias-with-rmsnorm": (_bad(norm="rmsnorm"), ValueError, "norm_bias:.*rmsnorm"),
    "eps-zero": (_bad(eps=0.0), ValueError, "eps:"),
    "eps-negative": (_bad(eps=-1e-5), ValueError, "eps:"),
    "eps-nan": (_bad(eps=float("nan")), ValueError, "eps:"),
    "eps-str": (_bad(eps="1e-5"), TypeError, "eps:"),
    "eps-bool": (_bad(eps=True), TypeError, "eps:"),
    "norm-unknown": (_bad(norm="batchnorm"), ValueError, "norm:.*layernorm, rmsnorm"),
    "norm-not-str": (_bad(norm=None), TypeError, "norm:"),
    "scaling-shape": (_bad(scaling=torch.ones(3)), ValueError, "scaling:"),
    "scaling-bool": (_bad(scaling=True), TypeError, "scaling:"),
    "activation": (_bad(activation="swishy"), ValueError, "activation:"),
    "backend-cuda": (_bad(backend="cuda"), ValueError, "backend:.*adapter_add_norm"),
    "backend-unknown": (_bad(backend="fast"), ValueError, "backend:"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_arguments_name_the_argument(bad):
    changes, error, match = BAD[bad]
    args = dict(z=torch.randn(4, 16), residual=torch.randn(4, 16), w_down=torch.randn(3, 16), b_down=torch.randn(3),
                w_up=torch.randn(16, 3), b_up=torch.randn(16), norm_weight=torch.randn(16), norm_bias=torch.randn(16))
    kwargs = dict(activation="relu", scaling=1.0, eps=1e-5, norm="layernorm", backend="torch")
    for k, v in changes.items():
        (args if k in args else kwargs)[k] = v
    with pytest.raises(error, match=match):
        adapterkern.adapter_add_norm(*(args[n] for n in ARGS), **kwargs)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", torch.device("cpu"), "adapter_add_norm") == "torch"
    assert adapterkern.backends.implements("triton", "adapter_add_norm")
    assert not adapterkern.backends.implements("cuda", "adapter_add_norm")


# ------------------------------------------------------------------------------------------------
# Autocast, gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_like_the_other_ops(backend):
    case, scaling = make_case((6, 32), 4, torch.float32, scaling="channel")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = run(case, scaling, backend)
    cast = {k: None if v is None else v.to(torch.bfloat16) for k, v in case.items()}
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, run(cast, scaling, backend))


def test_torch_backend_is_differentiable():
    case, scaling = make_case((5, 12), 3, torch.float64, scaling="channel")
    inputs = [t.requires_grad_() for t in (*(case[n] for n in ARGS), scaling)]
    for norm in NORMS:
        f = lambda *a, norm=norm: adapterkern.adapter_add_norm(  # noqa: E731
            *a[:7], a[7] if norm == "layernorm" else None, activation="gelu", scaling=a[8], eps=1e-6, norm=norm, backend="torch")
        assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_forward_runs_with_grad_but_backward_raises(backend):
    """Forgetting torch.no_grad() costs nothing; a backward through the kernel is a clear error."""
    case, scaling = make_case((5, 32), 4, torch.float32)
    case["w_down"].requires_grad_()
    out = run(case, scaling, backend)
    assert out.requires_grad
    check(out.detach(), {k: None if v is None else v.detach() for k, v in case.items()}, scaling, "relu", "layernorm", 1e-5)
    with pytest.raises(RuntimeError, match="inference-only.*bottleneck_adapter"):
        out.sum().backward()


# ------------------------------------------------------------------------------------------------
# The registered op
# ------------------------------------------------------------------------------------------------
def _op_args(backend, rms=False):
    case, scale = make_case((7, 32), 5, torch.float32, norm="rmsnorm" if rms else "layernorm", scaling="channel",
                            bias=(not rms, not rms), noncontig=True)
    act = adapterkern.get_activation("gelu").kernel_id
    return (case["z"], case["residual"], case["w_down"], case["b_down"], case["w_up"], case["b_up"], scale, 1.0,
            case["norm_weight"], case["norm_bias"], act, 1e-5, rms, backend)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("backend", TRITON)
def test_opcheck(backend, rms):
    torch.library.opcheck(torch.ops.adapterkern.adapter_add_norm_fwd.default, _op_args(backend, rms))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    case, scaling = make_case((2, 7, 48), 8, torch.float32, scaling="channel")

    def f(z, residual):
        return adapterkern.adapter_add_norm(z, residual, *(case[n] for n in ARGS[2:]), activation="silu", scaling=scaling,
                                            eps=1e-12, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # raises on any graph break
    with torch.no_grad():
        assert rel_err(compiled(case["z"], case["residual"]), f(case["z"], case["residual"])) < 1e-6
    # Weights that require grad (grad mode on): still one graph; the Triton op's backward is traced
    # through the raising op, the torch backend's gradients match eager autograd.
    w = case["w_up"].requires_grad_()
    out = compiled(case["z"], case["residual"])
    if backend == "triton":
        with pytest.raises(RuntimeError, match="inference-only"):
            out.sum().backward()
    else:
        (g,) = torch.autograd.grad(out.square().sum(), [w])
        (g_eager,) = torch.autograd.grad(f(case["z"], case["residual"]).square().sum(), [w])
        assert rel_err(g, g_eager) < 1e-5


def test_reference_formula_matches_torch_norms():
    """The test's own reference against torch's norms (so the reference is not wrong in both places)."""
    y = torch.randn(6, 40, dtype=torch.float64) + 3
    w, b = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    zero = torch.zeros(40, 1, dtype=torch.float64)
    for norm, expected in (("layernorm", torch.nn.functional.layer_norm(y, (40,), w, b, 1e-5)),
                           ("rmsnorm", torch.nn.functional.rms_norm(y, (40,), w, 1e-5))):
        got = reference(y, torch.zeros_like(y), zero.t(), None, zero, None, w, b if norm == "layernorm" else None,
                        "relu", 1.0, 1e-5, norm)
        assert rel_err(got, expected) < 1e-12
