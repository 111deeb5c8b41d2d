"""Prefix tuning (adapterkern.nn.prefix) and prefix attention (adapterkern.integrations.prefix_attention)
on tiny random-weight Hugging Face models (no downloads).

The reference is an attention function written here from the definition: float64 softmax over
``cat([prefix_k, k])`` with a mask built from the *2D padding mask* of the inputs and causality
(queries are the last q positions of the keys), every prefix column visible, and prefix keys/values
computed from the raw parameters (the whole library-layout MLP output ``(l, L*2*H*hd)``, sliced by
layer). It never looks at the mask transformers builds, at adapterkern's mask extension or at
PrefixTuning.key_value. The same model runs once with ``"adapterkern_prefix"`` attention and once
with this reference as its attention implementation.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers not installed (it is in the test extra)")

from adapterkern.integrations.prefix_attention import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    active_prefix,
    attention_places,
    disable_prefix_attention,
    enable_prefix_attention,
    extend_with_prefix,
    prefix_attention_enabled,
)
from adapterkern.integrations.transformers import AdapterSlot  # noqa: E402
from adapterkern.nn.prefix import PrefixEncoder, PrefixTuning  # noqa: E402

from conftest import rel_err  # noqa: E402

FAMILIES = ["bert", "roberta", "gpt2", "llama"]
CAUSAL = {"gpt2", "llama"}
V = 97
L = 5  # prefix length in these tests
REF = "adapterkern_test_reference"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(family):
    tf = transformers
    if family == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=V)
        model = tf.BertForSequenceClassification(cfg)
    elif family == "roberta":
        cfg = tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=V,
                               pad_token_id=1, max_position_embeddings=40)
        model = tf.RobertaModel(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=V, n_positions=40)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "llama":  # GQA: 4 query heads, 2 key/value heads
        cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=48, vocab_size=V, max_position_embeddings=40)
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise AssertionError(family)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = 0
    return model.eval()


def output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def attach(model, form="own", prefix_length=L, bottleneck=16):
    """A random-weight PrefixTuning in every attention module (slot name "p", active).
    form: "own" (one MLP per layer), "shared" (one MLP for all layers) or "collapsed"."""
    places = attention_places(model)
    shared = None
    if form == "shared":
        p0 = places[0]
        shared = PrefixTuning.shared(len(places), p0.num_kv_heads, p0.head_dim, prefix_length, bottleneck, hidden_size=p0.hidden_size)
    for i, place in enumerate(places):
        if shared is not None:
            prefix = shared[i]
        else:
            prefix = PrefixTuning(place.num_kv_heads, place.head_dim, prefix_length, bottleneck, reparametrize=form == "own",
                                  hidden_size=place.hidden_size)
        slot = AdapterSlot("prefix", place.hidden_size, place.layer)
        slot["p"] = prefix
        slot.active = "p"
        place.module.add_module("bottleneck_adapters", slot)
    return [place.module.bottleneck_adapters["p"] for place in places]


# ------------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------------

class _RefState:
    padding = None  # the (B, T0) 0/1 padding mask of the inputs (T0 <= key length: later positions are real tokens)


def ref_prefix(prefix):
    """(k, v), each (H, l, hd) float64, from the raw parameters by the library's formula."""
    if not prefix.reparametrized:
        return prefix.prefix_key.double(), prefix.prefix_value.double()
    enc = prefix.encoder
    emb = enc.wte.weight.double()
    w1, b1 = enc.control_trans[0].weight.double(), enc.control_trans[0].bias.double()
    w2, b2 = enc.control_trans[2].weight.double(), enc.control_trans[2].bias.double()
    kv = torch.tanh(emb @ w1.T + b1) @ w2.T + b2  # (l, L * 2 * H * hd)
    kv = kv.view(enc.prefix_length, enc.num_layers, 2, enc.num_kv_heads, enc.head_dim)[:, prefix.layer]
    return kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Explicit float64 attention over cat([prefix, keys]); ignores ``attention_mask`` (builds its own)."""
    assert dropout == 0.0
    q, k, v = query.double(), key.double(), value.double()
    batch, heads, q_len, hd = q.shape
    kv_len = k.shape[2]
    prefix = active_prefix(module)
    # padding of the keys: the inputs' mask, then real tokens (generated ones)
    pad = torch.ones(batch, kv_len, dtype=torch.bool)
    if _RefState.padding is not None:
        t0 = min(_RefState.padding.shape[1], kv_len)
        pad[:, :t0] = _RefState.padding[:, :t0].bool()
    allowed = pad[:, None, :].expand(batch, q_len, kv_len)
    if getattr(module, "is_causal", False):
        q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]  # queries are the last q_len positions
        allowed = allowed & (torch.arange(kv_len)[None, :] <= q_pos)
    if prefix is not None:
        pk, pv = ref_prefix(prefix)
        n = pk.shape[1]
        k = torch.cat([pk.expand(batch, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.expand(batch, -1, -1, -1), v], dim=2)
        allowed = torch.cat([torch.ones(batch, q_len, n, dtype=torch.bool), allowed], dim=2)
    rep = heads // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = scaling if scaling is not None else hd**-0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def _register_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(REF, reference_attention)
    AttentionMaskInterface.register(REF, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def set_impl(model, name):
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            config._attn_implementation_internal = name


def run_both(model, fn):
    """fn(model) under adapterkern's prefix attention, then under the reference."""
    _register_reference()
    enable_prefix_attention(model)
    ours = fn(model)
    saved = model.config._attn_implementation
    set_impl(model, REF)
    try:
        ref = fn(model)
    finally:
        set_impl(model, saved)
    return ours, ref


def padded_batch(family, batch=3, seq=9):
    """Token ids and a padding mask: row 0 full, row 1 padded by seq // 3, row 2 by 2 * seq // 3 (left
    padding for decoders, right padding for encoders)."""
    ids = torch.randint(2, V, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, n in ((1, seq // 3), (2, 2 * seq // 3)):
        if family in CAUSAL:
            mask[row, :n] = 0
        else:
            mask[row, seq - n:] = 0
    return ids, mask


def prefix_params(prefixes):
    seen, out = set(), []
    for p in prefixes:
        for name, t in p.named_parameters():
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


# ------------------------------------------------------------------------------------------------
# Full models against the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["own", "shared", "collapsed"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "padded"])
def test_model_matches_reference(family, form, padded):
    model = tiny_model(family)
    prefixes = attach(model, form)
    ids, mask = padded_batch(family)
    if not padded:
        mask = torch.ones_like(mask)
    _RefState.padding = mask
    cot = None
    params = prefix_params(prefixes)

    def fn(m):
        nonlocal cot
        for p in params:
            p.grad = None
        out = output(m(input_ids=ids, attention_mask=mask if padded else None))
        if cot is None:
            cot = torch.randn_like(out)
        (out * cot).sum().backward()
        return out.detach(), [p.grad.clone() for p in params]

    (out, grads), (ref, ref_grads) = run_both(model, fn)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-4, rel_err(g, rg)
    # the prefix matters: without it the outputs differ
    for p in attention_places(model):
        p.module.bottleneck_adapters.active = None
    plain = output(model(input_ids=ids, attention_mask=mask if padded else None))
    assert rel_err(plain, ref) > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "padded"])
def test_generation_with_kv_cache_matches_reference(family, padded):
    """Greedy decoding with a KV cache: prefill (q == kv) and decode steps (q == 1, keys from the cache),
    with and without padding (the mask-less paths of SDPA vs explicit masks)."""
    model = tiny_model(family)
    attach(model, "shared")
    ids, mask = padded_batch(family, batch=3, seq=6)
    if not padded:
        mask = torch.ones_like(mask)
    _RefState.padding = mask
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)

    def gen(m):
        with torch.no_grad():
            out = m.generate(ids, **kwargs)
        return out.sequences, torch.stack(out.scores)

    (seq, scores), (ref_seq, ref_scores) = run_both(model, gen)
    assert torch.equal(seq, ref_seq)
    assert rel_err(scores, ref_scores) < 1e-5, rel_err(scores, ref_scores)
    # the cached decode equals one full forward pass over the generated sequence (no cache)
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], seq.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)  # as generate() numbers them
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    n = scores.shape[0]
    full = logits[:, ids.shape[1] - 1 : ids.shape[1] - 1 + n].transpose(0, 1)
    assert rel_err(scores, full) < 1e-5


def test_static_cache_generation_matches_dynamic():
    """A static cache hands SDPA keys longer than the prompt with no mask at prefill (the crop path)."""
    model = tiny_model("llama")
    attach(model, "own")
    enable_prefix_attention(model)
    ids = torch.randint(2, V, (1, 6))
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        dyn = model.generate(ids, **kwargs)
        stat = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(dyn.sequences, stat.sequences)
    assert rel_err(torch.stack(stat.scores), torch.stack(dyn.scores)) < 1e-5


# ------------------------------------------------------------------------------------------------
# Collapse, no prefix, enable / disable
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["own", "shared"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_collapse_keeps_outputs_and_drops_the_mlp(family, form):
    model = tiny_model(family)
    prefixes = attach(model, form)
    enable_prefix_attention(model)
    ids, mask = padded_batch(family)
    with torch.no_grad():
        before = output(model(input_ids=ids, attention_mask=mask))
    saved = [p.collapsed_state_dict() for p in prefixes]
    for p, state in zip(prefixes, saved):
        assert p.reparametrized
        assert p.collapse() is p
        assert all(torch.equal(p.state_dict()[key], state[key]) for key in ("prefix_key", "prefix_value"))
        assert not p.reparametrized
        assert set(p.state_dict()) == {"prefix_key", "prefix_value"}
        assert p.prefix_key.shape == (p.num_kv_heads, L, p.head_dim) and p.prefix_key.requires_grad
        p.collapse()  # no-op
    assert not any(".p.encoder." in n for n, _ in model.named_parameters())
    assert not any(isinstance(m, PrefixEncoder) for m in model.modules())
    with torch.no_grad():
        after = output(model(input_ids=ids, attention_mask=mask))
    assert torch.equal(before, after)
    # a collapsed module loads into a fresh collapsed one
    fresh = PrefixTuning(prefixes[0].num_kv_heads, prefixes[0].head_dim, L, reparametrize=False)
    fresh.load_state_dict(prefixes[0].state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.key_value(), prefixes[0].key_value()))


def test_collapse_of_a_frozen_prefix_stays_frozen():
    p = PrefixTuning(2, 4, 3, 8)
    p.requires_grad_(False)
    p.collapse()
    assert not p.prefix_key.requires_grad and not p.prefix_value.requires_grad


@pytest.mark.parametrize("family", FAMILIES)
def test_no_active_prefix_is_plain_sdpa(family):
    model = tiny_model(family)
    plain = copy.deepcopy(model)
    attach(model, "own")
    ids, mask = padded_batch(family)
    if family in CAUSAL:  # no fully masked rows (left padding leaves padded queries nothing to see without a prefix)
        mask = torch.ones_like(mask)
        mask[1, -2:] = 0
    with torch.no_grad():
        want = output(plain(input_ids=ids, attention_mask=mask))
        want_nomask = output(plain(input_ids=ids))
        enable_prefix_attention(model)
        assert prefix_attention_enabled(model) and model.config._attn_implementation == ATTN_IMPLEMENTATION
        for place in attention_places(model):
            place.module.bottleneck_adapters.active = None
        assert torch.equal(output(model(input_ids=ids, attention_mask=mask)), want)
        assert torch.equal(output(model(input_ids=ids)), want_nomask)
        for place in attention_places(model):  # dropped (AdapterDrop) counts as inactive too
            place.module.bottleneck_adapters.active = "p"
            place.module.bottleneck_adapters.dropped = True
        assert torch.equal(output(model(input_ids=ids, attention_mask=mask)), want)
        for place in attention_places(model):  # no slot at all
            del place.module._modules["bottleneck_adapters"]
        assert torch.equal(output(model(input_ids=ids, attention_mask=mask)), want)


def test_enable_disable_restores_the_implementation():
    model = tiny_model("gpt2")
    model.set_attn_implementation("eager")
    attach(model, "own")
    enable_prefix_attention(model)
    enable_prefix_attention(model)  # idempotent: remembers "eager", not itself
    assert all(c._attn_implementation == ATTN_IMPLEMENTATION for c in [model.config, model.transformer.config])
    disable_prefix_attention(model)
    assert model.config._attn_implementation == "eager" and not prefix_attention_enabled(model)
    disable_prefix_attention(model)  # no-op
    assert model.config._attn_implementation == "eager"


def test_deepcopy_and_training_step():
    model = tiny_model("llama")
    prefixes = attach(model, "shared")
    enable_prefix_attention(model)
    twin = copy.deepcopy(model)
    assert prefix_attention_enabled(twin) and twin.config._attn_implementation == ATTN_IMPLEMENTATION
    ids = torch.randint(2, V, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)
    # only the prefixes train; one SGD step changes the outputs, the backbone stays as it was
    for p in model.parameters():
        p.requires_grad_(False)
    params = prefix_params(prefixes)
    for p in params:
        p.requires_grad_(True)
    assert len(params) == 5  # one shared encoder: wte, 2 x (weight, bias)
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)
    assert all(torch.equal(a, b) for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()) if ".p.encoder." not in n)


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------

def test_attention_places():
    names = {
        "bert": ["bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"],
        "roberta": ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"],
        "gpt2": ["transformer.h.0.attn", "transformer.h.1.attn"],
        "llama": ["model.layers.0.self_attn", "model.layers.1.self_attn"],
    }
    shapes = {"bert": (2, 16), "roberta": (4, 8), "gpt2": (2, 16), "llama": (2, 8)}
    for family in FAMILIES:
        places = attention_places(tiny_model(family))
        assert [p.name for p in places] == names[family]
        assert [p.layer for p in places] == [0, 1]
        assert {(p.num_kv_heads, p.head_dim, p.hidden_size) for p in places} == {shapes[family] + (32,)}


def test_prefix_shapes_and_shared_slices():
    enc_prefixes = PrefixTuning.shared(3, 2, 4, 6, 8, hidden_size=10)
    enc = enc_prefixes[0].encoder
    assert all(p.encoder is enc for p in enc_prefixes)
    full = enc()  # (L, 2, H, l, hd)
    assert full.shape == (3, 2, 2, 6, 4)
    for i, p in enumerate(enc_prefixes):
        k, v = p()
        assert k.shape == v.shape == (2, 6, 4)
        assert rel_err(k, full[i, 0]) < 1e-6 and rel_err(v, full[i, 1]) < 1e-6
        rk, rv = ref_prefix(p)
        assert rel_err(k, rk) < 1e-6 and rel_err(v, rv) < 1e-6
    # parameter names follow the adapters library's PrefixTuning
    assert set(enc.state_dict()) == {"wte.weight", "control_trans.0.weight", "control_trans.0.bias",
                                     "control_trans.2.weight", "control_trans.2.bias"}
    assert enc.control_trans[2].weight.shape == (3 * 2 * 2 * 4, 8)


def test_prefix_dropout_only_in_training():
    p = PrefixTuning(2, 4, 6, 8, dropout=0.5)
    k0, _ = p.eval()()
    k1, _ = p.train()()
    assert not torch.equal(k0, k1) and ((k1 == 0) | torch.isclose(k1, 2 * k0)).all()


def _qkv(batch=2, hq=4, hkv=2, q=3, kv=5, hd=8, dtype=torch.float32):
    return (torch.randn(batch, hq, q, hd, dtype=dtype), torch.randn(batch, hkv, kv, hd, dtype=dtype),
            torch.randn(batch, hkv, kv, hd, dtype=dtype))


def test_extend_with_prefix_masks():
    q, k, v = _qkv()
    pk, pv = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    # bool mask: True columns prepended
    mask = torch.rand(2, 1, 3, 5) > 0.3
    k2, v2, m2 = extend_with_prefix(q, k, v, mask, pk, pv, is_causal=True)
    assert k2.shape == (2, 2, 9, 8) and torch.equal(k2[:, :, :4], pk.expand(2, -1, -1, -1)) and torch.equal(v2[:, :, 4:], v)
    assert m2.dtype == torch.bool and m2[..., :4].all() and torch.equal(m2[..., 4:], mask)
    # additive float mask: zeros prepended; a mask longer than the keys is cut first
    fmask = torch.randn(2, 1, 3, 7)
    _, _, m3 = extend_with_prefix(q, k, v, fmask, pk, pv, is_causal=False)
    assert m3.shape == (2, 1, 3, 9) and (m3[..., :4] == 0).all() and torch.equal(m3[..., 4:], fmask[..., :5])
    # no mask, causal, q == kv: prefix visible, lower-triangular real part
    q, k, v = _qkv(q=4, kv=4)
    _, _, m4 = extend_with_prefix(q, k, v, None, pk, pv, is_causal=True)
    want = torch.cat([torch.ones(4, 4, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool).tril()], dim=1)
    assert torch.equal(m4, want[None, None])
    # no mask, not causal, or a single query: no mask needed
    assert extend_with_prefix(q, k, v, None, pk, pv, is_causal=False)[2] is None
    q1, k1, v1 = _qkv(q=1, kv=6)
    assert extend_with_prefix(q1, k1, v1, None, pk, pv, is_causal=True)[2] is None
    # no mask, causal, kv > q (empty static cache at prefill): keys cut to q, as SDPA does
    q, k, v = _qkv(q=3, kv=8)
    k5, v5, m5 = extend_with_prefix(q, k, v, None, pk, pv, is_causal=True)
    assert k5.shape == (2, 2, 7, 8) and torch.equal(k5[:, :, 4:], k[:, :, :3]) and m5.shape == (1, 1, 3, 7)
    # batched prefixes (B, H, l, hd) and dtype follows the keys
    qh, kh, vh = _qkv(dtype=torch.float64)
    k6, _, _ = extend_with_prefix(qh, kh, vh, None, torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), is_causal=False)
    assert k6.dtype == torch.float64 and k6.shape == (2, 2, 9, 8)


def test_extend_with_prefix_matches_explicit_sdpa():
    """SDPA on the extended tensors == explicit softmax over the concatenation (GQA expanded by hand)."""
    q, k, v = _qkv(q=5, kv=5)
    pk, pv = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    k2, v2, m2 = extend_with_prefix(q, k, v, None, pk, pv, is_causal=True)
    got = F.scaled_dot_product_attention(q, k2.repeat_interleave(2, 1), v2.repeat_interleave(2, 1), attn_mask=m2)
    kk = torch.cat([pk.expand(2, -1, -1, -1), k], 2).repeat_interleave(2, 1).double()
    vv = torch.cat([pv.expand(2, -1, -1, -1), v], 2).repeat_interleave(2, 1).double()
    s = q.double() @ kk.transpose(-1, -2) / 8**0.5
    allowed = torch.cat([torch.ones(5, 3, dtype=torch.bool), torch.ones(5, 5, dtype=torch.bool).tril()], 1)
    want = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vv
    assert rel_err(got, want) < 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        PrefixTuning(0, 8)
    with pytest.raises(TypeError, match="head_dim"):
        PrefixTuning(2, 8.0)
    with pytest.raises(TypeError, match="prefix_length"):
        PrefixTuning(2, 8, True)
    with pytest.raises(TypeError, match="reparametrize"):
        PrefixTuning(2, 8, reparametrize="yes")
    with pytest.raises(ValueError, match="dropout"):
        PrefixTuning(2, 8, dropout=1.0)
    with pytest.raises(ValueError, match="activation"):
        PrefixTuning(2, 8, non_linearity="nope")
    enc = PrefixEncoder(2, 2, 8, 30, 800)
    with pytest.raises(ValueError, match="head_dim"):
        PrefixTuning(2, 4, encoder=enc)
    with pytest.raises(ValueError, match="layer"):
        PrefixTuning(2, 8, encoder=enc, layer=2)
    with pytest.raises(ValueError, match="reparametrize=False"):
        PrefixTuning(2, 8, reparametrize=False, encoder=enc)
    with pytest.raises(TypeError, match="PrefixEncoder"):
        PrefixTuning(2, 8, encoder=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layer"):
        enc.key_value(5)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="do not fit"):
        extend_with_prefix(q, k, v, None, torch.randn(4, 3, 8), torch.randn(4, 3, 8), is_causal=True)
    with pytest.raises(ValueError, match="key length"):
        extend_with_prefix(q, k, v, torch.ones(2, 1, 3, 4, dtype=torch.bool), torch.randn(2, 3, 8), torch.randn(2, 3, 8), True)
    with pytest.raises(TypeError, match="bool or floating"):
        extend_with_prefix(q, k, v, torch.ones(2, 1, 3, 5, dtype=torch.long), torch.randn(2, 3, 8), torch.randn(2, 3, 8), True)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        attention_places("bert")
    with pytest.raises(ValueError, match="no .config"):
        attention_places(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="cannot find"):
        enable_prefix_attention(transformers.T5Model(transformers.T5Config(d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2, vocab_size=V)))
    # a prefix with the wrong head count fails loudly in the forward
    model = tiny_model("llama")
    places = attention_places(model)
    for place in places:
        slot = AdapterSlot("prefix", 32, place.layer)
        slot["p"] = PrefixTuning(4, 8, L, 8)  # 4 heads, the model has 2 key/value heads
        slot.active = "p"
        place.module.add_module("bottleneck_adapters", slot)
    enable_prefix_attention(model)
    with pytest.raises(ValueError, match="do not fit"):
        model(input_ids=torch.randint(2, V, (1, 4)))
