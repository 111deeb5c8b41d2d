"""adapterkern.nn.AdapterFusion and fuse_adapters against an independent float64 re-implementation of
the ``adapters`` library's BertFusion formula (written here, per adapter, with explicit key and value
tensors: the module's own evaluation reassociates the projections, this one does not): every config
branch, the temperature schedule, dropout on the scores, the regularisation term, the gradients of
every fusion parameter and (through fuse_adapters, torch and triton backends) of every adapter weight.
The comparison with the library itself is tests/test_integrations_adapterhub_fusion.py."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapterkern.backends import is_available
from adapterkern.nn import AdapterFusion, BottleneckAdapter, freeze_for_fusion_training, fuse_adapters, fusion_regularization_loss
from adapterkern.nn.fusion import FUSION_CONFIGS
from conftest import DEVICE, reference_adapter, rel_err

BACKENDS = [
    pytest.param(b, id=b, marks=pytest.mark.skipif(not is_available(b, DEVICE), reason=f"backend {b!r} not available on {DEVICE}"))
    for b in ("torch", "triton")
]
# Floors of the error bounds (relative to the tensor's scale). float32: what any float32 evaluation
# gets; bfloat16: see test_bf16. Gradients pass through about three times as many roundings (the
# fusion's backward, then the adapters' fused backward), hence GRAD_FLOOR times the floor.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}
GRAD_FLOOR = 3


pytestmark = pytest.mark.usefixtures("one_thread")
D = 16


def config(base="dynamic", **overrides):
    return {**FUSION_CONFIGS[base], **overrides}


# ------------------------------------------------------------------------------------------------
# The library's formula (modeling.py BertFusion.forward, fed as compose_fuse feeds it), in ``dtype``.
# ------------------------------------------------------------------------------------------------
def reference_fusion(p, cfg, z, U, h, T, mask=None, dtype=torch.float64, keep=None):
    """p: {"query.weight": ..., ...} tensors; z, h (..., d); U (N, ..., d); mask: dropout's (..., N)
    multiplier (0 or 1/(1-p)) or None. Returns (out, probs (..., N)); ``keep`` (a dict) gets q and
    the scores."""
    c = lambda t: t.to(dtype)  # noqa: E731
    z, U, h = c(z), c(U), c(h)
    S = U + h if cfg["residual_before"] else U  # key is value in compose_fuse: the in-place add reaches both
    q = z @ c(p["query.weight"]).t() + c(p["query.bias"]) if cfg["query"] else z
    K = S @ c(p["key.weight"]).t() + c(p["key.bias"]) if cfg["key"] else S
    V = S @ c(p["value.weight"]).t() if cfg["value"] and cfg["value_before_softmax"] else S
    scores = torch.stack([(q * K[n]).sum(-1) for n in range(U.shape[0])], dim=-1)  # (..., N)
    if keep is not None:
        keep.update(q=q, scores=scores)
    if mask is not None:
        scores = scores * c(mask)
    a = torch.softmax(scores / T, dim=-1)
    out = sum(a[..., n : n + 1] * V[n] for n in range(U.shape[0]))
    if cfg["value"] and not cfg["value_before_softmax"]:
        out = out @ c(p["value.weight"]).t()
    if not cfg["residual_before"]:
        out = out + h
    return out, a


def randomise_(fusion, scale=0.25):
    """Weights far from their init (value no longer ~identity, scores O(1)), so every term matters."""
    with torch.no_grad():
        for name, p in fusion.named_parameters():
            p.add_(torch.randn_like(p) * (scale if "weight" in name else 0.5))


def leaf64(fusion):
    return {k: v.detach().double().requires_grad_() for k, v in fusion.named_parameters()}


def inputs(n, shape=(2, 3, D), dtype=torch.float32):
    mk = lambda *s: torch.randn(*s, device=DEVICE).to(dtype).requires_grad_()  # noqa: E731
    return mk(*shape), mk(n, *shape), mk(*shape)


def check_fusion(fusion, cfg, n, dtype=torch.float32, T=None, mask=None, seed=None):
    """Forward and every gradient (fusion parameters, query, stack, residual) against the float64
    reference; the bound is the larger of TOL and twice the error of the same formula evaluated in
    ``dtype`` (what plain PyTorch gets: it matters where a gradient is a cancelling sum)."""
    z, U, h = inputs(n, dtype=dtype)
    T = fusion.T if T is None else T
    if seed is not None:
        torch.manual_seed(seed)  # the dropout mask's draw
    out = fusion(z, U, h)
    names = [k for k, _ in fusion.named_parameters()] + ["query", "adapter_outputs", "residual"]
    runs, keep = {}, {}
    for math_dtype in (torch.float64, dtype):
        p = {k: v.detach().to(math_dtype).requires_grad_() for k, v in fusion.named_parameters()}
        zuh = [t.detach().to(math_dtype).requires_grad_() for t in (z, U, h)]
        y, _ = reference_fusion(p, cfg, *zuh, T, mask, dtype=math_dtype, keep=keep if math_dtype == torch.float64 else None)
        runs[math_dtype] = (y, [*p.values(), *zuh])
    ref, plain = runs[torch.float64][0], runs[dtype][0]
    assert out.shape == z.shape and out.dtype == dtype
    bound = max(TOL[dtype], 2 * rel_err(plain, ref))
    assert rel_err(out, ref) <= bound, ("out", rel_err(out, ref), bound)
    dy = torch.randn_like(ref)
    grads = {}
    for key, (y, leaves) in [("got", (out, [*fusion.parameters(), z, U, h])), *[(k, v) for k, v in runs.items()]]:
        grads[key] = torch.autograd.grad(y, leaves, dy.to(y.dtype), allow_unused=True, retain_graph=True)
    # d/d b_k = sum_tokens q * sum_n dscores_n: 0 without dropout (softmax ignores a per-token
    # constant) but for rounding, so its error is measured against sum_tokens |q| * sum_n |dscores_n|
    (dscores,) = torch.autograd.grad(ref, keep["scores"], dy)
    bias_scale = (keep["q"].abs() * dscores.abs().sum(-1, keepdim=True)).reshape(-1, D).sum(0).detach()
    for name, g, w, g_plain in zip(names, grads["got"], grads[torch.float64], grads[dtype]):
        if w is None:  # only the library's unused ``dense``
            assert name.startswith("dense") and g is None, name
            continue
        assert g is not None, name
        scale = bias_scale if name == "key.bias" else None
        bound = max(GRAD_FLOOR * TOL[dtype], 2 * rel_err(g_plain, w, scale))
        assert rel_err(g, w, scale) <= bound, (name, rel_err(g, w, scale), bound)
    return out


CONFIGS = {
    "dynamic": config("dynamic"),
    "static": config("static"),
    "dynamic-residual_before": config("dynamic", residual_before=True),
    "static-residual_before": config("static", residual_before=True),
    "dynamic-value_after_softmax": config("dynamic", value_before_softmax=False),
    "dynamic-residual_before-value_after": config("dynamic", residual_before=True, value_before_softmax=False),
    "value-not-initialized": config("dynamic", value_initialized=False),
    "no-query": config("dynamic", query=False),
    "no-key": config("dynamic", key=False),
    "value-only": config("dynamic", query=False, key=False),
    "nothing (dense)": config("static", query=False, key=False, residual_before=True),
}


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_config_branches(cfg):
    fusion = AdapterFusion(D, config=cfg, device=DEVICE)
    randomise_(fusion)
    check_fusion(fusion, cfg, 3)


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("base", ["dynamic", "static"])
def test_number_of_adapters(n, base):
    fusion = AdapterFusion(D, n, config=base, device=DEVICE)
    randomise_(fusion)
    check_fusion(fusion, config(base), n)


def test_fresh_dynamic_is_near_plain_average_plus_residual():
    """At init, W_v ~ I and scores ~ 0 (std-0.02 projections): out ~ h + mean_n u_n."""
    fusion = AdapterFusion(D, config="dynamic")
    z, U, h = (t.detach() for t in inputs(4))
    assert rel_err(fusion(z, U, h), h + U.mean(0)) < 0.05


def test_init_and_state_dict_names():
    torch.manual_seed(0)
    dyn = AdapterFusion(256, config="dynamic")
    assert list(dyn.state_dict()) == ["query.weight", "query.bias", "key.weight", "key.bias", "value.weight"]
    for lin in (dyn.query, dyn.key):
        assert abs(lin.weight.std().item() - 0.02) < 1e-3 and torch.count_nonzero(lin.bias) == 0
    expected = torch.full((256, 256), 1e-6).fill_diagonal_(1.0)
    assert dyn.value.bias is None and torch.equal(dyn.value.weight, expected)
    assert dyn.T == 1.0 and dyn.reduction == 1.0 / 1000.0 and dyn.dropout.p == 0.0
    static = AdapterFusion(256, config="static")
    assert list(static.state_dict()) == ["query.weight", "query.bias", "key.weight", "key.bias"]
    raw = AdapterFusion(256, config=config("dynamic", value_initialized=False))
    assert abs(raw.value.weight.std().item() - 0.02) < 1e-3
    dense = AdapterFusion(8, config=config("static", query=False, key=False))
    assert list(dense.state_dict()) == ["dense.weight", "dense.bias"]
    # dropout_prob: the config's, else the model's attention_probs_dropout_prob (the library's `or`)
    assert AdapterFusion(8, config=config("dynamic", dropout_prob=0.2), attention_probs_dropout_prob=0.1).dropout.p == 0.2
    assert AdapterFusion(8, attention_probs_dropout_prob=0.1).dropout.p == 0.1
    hot = AdapterFusion(8, config=config("dynamic", temperature=True))
    assert hot.T == 50.0 and hot.reduction == 0.05


def test_temperature_schedule():
    """T = 50 at the first call, then max(T - 0.05, 1) after every call: in train mode, in eval mode
    and under no_grad alike (the library's modeling.py:437 has no training check)."""
    cfg = config("dynamic", temperature=True)
    fusion = AdapterFusion(D, config=cfg)
    randomise_(fusion, scale=1.0)  # scores large enough for T to matter
    expected = 50.0
    for mode in ("train", "train", "eval", "eval", "no_grad"):
        fusion.train(mode == "train")
        assert fusion.T == expected
        if mode == "no_grad":
            z, U, h = (t.detach() for t in inputs(3))
            with torch.no_grad():
                out = fusion(z, U, h)
            assert rel_err(out, reference_fusion(leaf64(fusion), cfg, z, U, h, expected)[0]) <= TOL[torch.float32]
        else:
            check_fusion(fusion, cfg, 3, T=expected)
        expected = max(expected - 50.0 / 1000.0, 1.0)
    assert fusion.T == pytest.approx(50.0 - 5 * 0.05) and fusion.T == expected  # the same float steps
    fusion.T = 1.02
    z, U, h = (t.detach() for t in inputs(2))
    fusion(z, U, h)
    assert fusion.T == 1.0
    fusion(z, U, h)
    assert fusion.T == 1.0
    cold = AdapterFusion(D)
    cold(z, U, h)
    assert cold.T == 1.0  # temperature=False: 1.0, and max(1 - 0.001, 1) keeps it there


def test_temperature_changes_the_output():
    cfg = config("dynamic", temperature=True)
    fusion = AdapterFusion(D, config=cfg)
    randomise_(fusion, scale=1.0)
    z, U, h = (t.detach() for t in inputs(3))
    _, a_hot = fusion(z, U, h, output_attentions=True)
    fusion.T = 1.0
    _, a_cold = fusion(z, U, h, output_attentions=True)
    entropy = lambda a: -(a * a.clamp_min(1e-30).log()).sum(-1).mean()  # noqa: E731
    assert entropy(a_hot) > entropy(a_cold) + 0.1  # T = 50 flattens the attention over the adapters


@pytest.mark.parametrize("base", ["dynamic", "static"])
def test_dropout_on_scores(base):
    """Train mode: dropout (p = 0.3) multiplies the scores, before the softmax; the same seed draws the
    same mask as F.dropout on a (..., N) tensor. Eval mode: no dropout."""
    cfg = config(base, dropout_prob=0.3, residual_before=True)
    fusion = AdapterFusion(D, config=cfg).train()
    randomise_(fusion)
    torch.manual_seed(123)
    mask = F.dropout(torch.ones(2, 3, 4), 0.3, training=True)
    assert (mask == 0).any() and (mask != 0).any()
    check_fusion(fusion, cfg, 4, mask=mask, seed=123)
    fusion.eval()
    check_fusion(fusion, cfg, 4)


def test_output_attentions():
    fusion = AdapterFusion(D, config="static")
    randomise_(fusion)
    z, U, h = inputs(5)
    out, probs = fusion(z, U, h, output_attentions=True)
    _, a_ref = reference_fusion(leaf64(fusion), config("static"), z, U, h, 1.0)
    assert probs.shape == (2, 3, 5) and not probs.requires_grad
    assert rel_err(probs, a_ref) < 1e-5 and rel_err(probs.sum(-1), torch.ones(2, 3)) < 1e-6


def test_regularization_loss():
    dyn, static = AdapterFusion(D, config="dynamic"), AdapterFusion(D, config="static")
    assert dyn.regularization_loss().item() == pytest.approx(0.01 * (D * D - D) * 1e-12, rel=1e-3)  # at init: the 1e-6 off-diagonal
    randomise_(dyn)
    w = dyn.value.weight.detach().double()
    loss = dyn.regularization_loss()
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx((0.01 * (torch.eye(D, dtype=torch.float64) - w).pow(2).sum()).item(), rel=1e-6)
    (g,) = torch.autograd.grad(loss, dyn.value.weight)
    assert rel_err(g, 0.02 * (w - torch.eye(D, dtype=torch.float64))) < 1e-6
    assert static.regularization_loss() is None
    other = AdapterFusion(D, config="dynamic")
    randomise_(other)
    model = nn.ModuleDict({"a": dyn, "b": static, "c": other})
    total = fusion_regularization_loss(model)
    assert total.item() == pytest.approx(loss.item() + other.regularization_loss().item(), rel=1e-6)
    other.value.weight.requires_grad_(False)  # the library skips frozen value matrices
    assert other.regularization_loss() is None
    assert fusion_regularization_loss([model]).item() == pytest.approx(loss.item(), rel=1e-6)
    assert fusion_regularization_loss(static) is None


# ------------------------------------------------------------------------------------------------
# fuse_adapters: multi_adapter (add_residual=False) + the fusion, gradients into the adapters.
# ------------------------------------------------------------------------------------------------
def make_adapters(n, r=4, activation="gelu", scalings=None, dtype=torch.float32, bias=True):
    adapters = []
    for i in range(n):
        s = (scalings or [1.0, "learned", "channel", 0.5, "learned"])[i % 5]
        a = BottleneckAdapter(D, r if isinstance(r, int) else r[i], activation=activation if isinstance(activation, str) else activation[i],
                              scaling=s, bias=bias, device=DEVICE, dtype=dtype)
        with torch.no_grad():
            a.adapter_down.weight.normal_(0, D**-0.5)
            a.adapter_up.weight.normal_(0, a.bottleneck_size**-0.5)
            for b in (a.adapter_down.bias, a.adapter_up.bias):
                if b is not None:
                    b.normal_(0, 0.3)
            if isinstance(a.scaling, nn.Parameter):
                a.scaling.uniform_(0.5, 1.5)
        adapters.append(a)
    return adapters


def reference_stack(adapters, x, math_dtype=torch.float64):
    """Each adapter's scaling * up(act(down(x))) by conftest's reference formula on a zero residual,
    in ``math_dtype``, differentiable w.r.t. the returned copies of the adapters' parameters."""
    params = {}
    outs = []
    for i, a in enumerate(adapters):
        leaf = lambda t: None if t is None else params.setdefault((i, id(t)), t.detach().to(math_dtype).requires_grad_())  # noqa: E731
        s = leaf(a.scaling) if isinstance(a.scaling, torch.Tensor) else a.scaling
        outs.append(reference_adapter(
            x, leaf(a.adapter_down.weight), leaf(a.adapter_down.bias), leaf(a.adapter_up.weight), leaf(a.adapter_up.bias),
            a.activation, s, residual=torch.zeros_like(x),
        ))
    return torch.stack(outs), params


def check_fuse(adapters, fusion, backend, dtype=torch.float32, parallel=True):
    """fuse_adapters' output and the gradients of x, the residual, every fusion parameter and every
    adapter parameter against the float64 reference (adapters, then the library's fusion formula);
    bound: the larger of TOL and twice the error of the same reference evaluated in ``dtype``."""
    x = torch.randn(2, 3, D, device=DEVICE).to(dtype).requires_grad_()
    h = torch.randn(2, 3, D, device=DEVICE).to(dtype).requires_grad_() if parallel else None
    out = fuse_adapters(x, adapters, fusion, residual=h, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype and not out.isnan().any()
    names = ["x"] + ([] if h is None else ["residual"]) + [k for k, _ in fusion.named_parameters()]
    names += [f"adapters[{i}].{k}" for i, a in enumerate(adapters) for k, _ in a.named_parameters()]
    runs = {}
    for math_dtype in (torch.float64, dtype):
        xr = x.detach().to(math_dtype).requires_grad_()
        hr = xr if h is None else h.detach().to(math_dtype).requires_grad_()
        stack, a_leaves = reference_stack(adapters, xr, math_dtype)
        f_leaves = {k: v.detach().to(math_dtype).requires_grad_() for k, v in fusion.named_parameters()}
        keep = {}
        y, _ = reference_fusion(f_leaves, fusion.config, xr, stack, hr, 1.0, dtype=math_dtype, keep=keep)
        leaves = [xr] + ([] if h is None else [hr]) + list(f_leaves.values())
        leaves += [a_leaves[(i, id(t))] for i, a in enumerate(adapters) for t in a.parameters()]
        runs[math_dtype] = (y, leaves, keep, stack)
    ref, plain = runs[torch.float64][0], runs[dtype][0]
    bound = max(TOL[dtype], 2 * rel_err(plain, ref))
    assert rel_err(out, ref) <= bound, ("out", rel_err(out, ref), bound)
    dy = torch.randn_like(ref)
    mine = [x] + ([] if h is None else [h]) + list(fusion.parameters()) + [t for a in adapters for t in a.parameters()]
    got = torch.autograd.grad(out, mine, dy.to(dtype))
    _, ref_leaves, keep, stack64 = runs[torch.float64]
    *want, dscores, dstack = torch.autograd.grad(ref, ref_leaves + [keep["scores"], stack64], dy)
    plain_grads = torch.autograd.grad(plain, runs[dtype][1], dy.to(dtype))
    # Condition scales of the gradients that are cancelling sums: d/d b_k (see check_fusion), and a
    # learned scaling's, sum over tokens (and channels for a scalar) of dstack * up: sum |terms|.
    scales = {"key.bias": (keep["q"].abs() * dscores.abs().sum(-1, keepdim=True)).reshape(-1, D).sum(0)}
    for i, a in enumerate(adapters):
        if isinstance(a.scaling, torch.Tensor):
            terms = (dstack[i] * stack64[i] / a.scaling.detach().double()).abs().reshape(-1, D)
            scales[f"adapters[{i}].scaling"] = terms.sum() if a.scaling.numel() == 1 else terms.sum(0)
    for name, g, w, gp in zip(names, got, want, plain_grads):
        scale = scales.get(name)
        bound = max(GRAD_FLOOR * TOL[dtype], 2 * rel_err(gp, w, scale))
        assert rel_err(g, w, scale) <= bound, (name, rel_err(g, w, scale), bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 5])
def test_fuse_adapters(backend, n, poison_empty):
    fusion = AdapterFusion(D, n, config="dynamic", device=DEVICE)
    randomise_(fusion)
    check_fuse(make_adapters(n), fusion, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_adapters_static_sequential_no_bias(backend, poison_empty):
    fusion = AdapterFusion(D, config=config("static", residual_before=True), device=DEVICE)
    randomise_(fusion)
    check_fuse(make_adapters(3, scalings=[0.5, 2.0, 1.0], bias=False), fusion, backend, parallel=False)


def test_fuse_adapters_heterogeneous_loop(poison_empty):
    """Different r and activations: one fused single-adapter call each (the documented fallback)."""
    fusion = AdapterFusion(D, config="dynamic", device=DEVICE)
    randomise_(fusion)
    check_fuse(make_adapters(3, r=[4, 6, 4], activation=["relu", "silu", "relu"]), fusion, "torch")


def test_fuse_adapters_uses_one_multi_adapter_call(monkeypatch):
    import adapterkern.nn.fusion as fusion_mod

    calls = []
    real = fusion_mod.multi_adapter
    monkeypatch.setattr(fusion_mod, "multi_adapter", lambda *a, **k: calls.append(k) or real(*a, **k))
    adapters = make_adapters(3)
    fuse_adapters(torch.randn(5, D), adapters, AdapterFusion(D), backend="torch")
    assert len(calls) == 1 and calls[0]["add_residual"] is False and calls[0]["scaling"].shape == (3, D)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(backend):
    """bfloat16 (unit roundoff u = 2^-8 = 3.9e-3). The bound is the larger of 1.6e-2 (~4u: the
    adapters' stack and the fusion's q, W_k^T q, weighted sum and W_v each round once to bf16) and
    twice what the library's formula gets when evaluated in bf16 itself (the reference run in bf16):
    a gradient that is a cancelling sum (through the softmax's Jacobian) loses more than 4u in any
    bf16 evaluation, and must not lose more than twice that here. Gradients: 3x the floor (~12u;
    the largest error seen over 40 seeds x 2 backends was 3.9e-2, ~10u)."""
    torch.manual_seed(3)
    fusion = AdapterFusion(D, 3, config="dynamic", device=DEVICE)
    randomise_(fusion, scale=0.15)
    fusion = fusion.to(torch.bfloat16)
    check_fuse(make_adapters(3, scalings=["learned", 1.0, "learned"], dtype=torch.bfloat16), fusion, backend, dtype=torch.bfloat16)


def test_freeze_for_fusion_training():
    adapters = make_adapters(2)
    fusion = AdapterFusion(D)
    for p in fusion.parameters():
        p.requires_grad_(False)
    trainable = freeze_for_fusion_training(adapters, fusion)
    assert all(not p.requires_grad for a in adapters for p in a.parameters())
    assert all(p.requires_grad for p in fusion.parameters())
    assert {id(p) for p in trainable} == {id(p) for p in fusion.parameters()}
    out = fuse_adapters(torch.randn(4, D), nn.ModuleList(adapters), fusion, backend="torch")
    out.sum().backward()
    assert all(p.grad is None for a in adapters for p in a.parameters())
    assert all(p.grad is not None for p in fusion.parameters())
    both = freeze_for_fusion_training(adapters, [fusion], unfreeze_adapters=True)
    assert len(both) == len(list(fusion.parameters())) + sum(len(list(a.parameters())) for a in adapters)


# ------------------------------------------------------------------------------------------------
# Bad input: the error names the argument.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(U=torch.randn(2, 5, D)), ValueError, "adapter_outputs: expected N = 3"),
        (dict(U=torch.randn(3, 4, D)), ValueError, "adapter_outputs: expected shape"),
        (dict(U=torch.randn(5, D)), ValueError, "adapter_outputs: expected shape"),
        (dict(U=torch.randn(3, 5, D, dtype=torch.float64)), TypeError, "adapter_outputs: expected dtype"),
        (dict(U=[1.0]), TypeError, "adapter_outputs: expected a torch.Tensor"),
        (dict(h=torch.randn(5, D + 1)), ValueError, "residual: expected query's shape"),
        (dict(h=torch.randn(5, D).bfloat16()), TypeError, "residual: expected dtype"),
        (dict(z=torch.randn(5, D - 1), U=torch.randn(3, 5, D - 1), h=torch.randn(5, D - 1)), ValueError, "query: expected shape"),
        (dict(z=torch.randn(5, D).half()), TypeError, "query: expected dtype"),
        (dict(z=None), TypeError, "query: expected a torch.Tensor"),
    ],
)
def test_bad_forward_input(change, exc, match):
    kw = dict(z=torch.randn(5, D), U=torch.randn(3, 5, D), h=torch.randn(5, D))
    kw.update(change)
    with pytest.raises(exc, match=match):
        AdapterFusion(D, 3)(kw["z"], kw["U"], kw["h"])


def test_bad_construction_and_fuse_input():
    with pytest.raises(ValueError, match="config: unknown fusion config 'fancy'"):
        AdapterFusion(D, config="fancy")
    with pytest.raises(ValueError, match="config: unknown fusion config field.*temprature"):
        AdapterFusion(D, config={"temprature": True})
    with pytest.raises(ValueError, match="config: dropout_prob"):
        AdapterFusion(D, config={"dropout_prob": 1.5})
    with pytest.raises(TypeError, match="config"):
        AdapterFusion(D, config=3)
    with pytest.raises(ValueError, match="hidden_size"):
        AdapterFusion(0)
    with pytest.raises(ValueError, match="num_adapters"):
        AdapterFusion(D, 0)
    x, fusion = torch.randn(4, D), AdapterFusion(D)
    with pytest.raises(ValueError, match="adapters: expected at least one"):
        fuse_adapters(x, [], fusion)
    with pytest.raises(TypeError, match=r"adapters\[1\]: expected an adapterkern.nn.BottleneckAdapter"):
        fuse_adapters(x, [make_adapters(1)[0], nn.Linear(D, D)], fusion)
    with pytest.raises(ValueError, match=r"adapters\[0\]: hidden size 8"):
        fuse_adapters(x, [BottleneckAdapter(8, 2)], fusion)
    with pytest.raises(TypeError, match="fusion: expected"):
        fuse_adapters(x, make_adapters(2), nn.Linear(D, D))
    with pytest.raises(TypeError, match="adapters: expected a sequence"):
        fuse_adapters(x, make_adapters(1)[0], fusion)
    with pytest.raises(TypeError, match="w_down: expected dtype"):  # multi_adapter names it
        fuse_adapters(x.double(), make_adapters(2), fusion, backend="torch")
