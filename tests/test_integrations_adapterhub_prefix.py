"""adapterkern's prefix tuning against the AdapterHub ``adapters`` library's, weights imported with
``prefix_from_adapterhub`` (tiny random-weight models, no downloads).

Run by ``make test-adapterhub`` (its own venv: the library pins transformers~=4.57); elsewhere the
module skips, unless ADAPTERKERN_REQUIRE_ADAPTERS=1. What is compared:

* prefix tensors: the library's pool output (per layer, ``(batch, H, l, hd)`` keys and values) against
  ``PrefixTuning.key_value()`` (reparametrised and collapsed), for PrefixTuningConfig(prefix_length=30,
  bottleneck_size=800) and MAMConfig on BERT, GPT-2 and Llama (GQA); the library's ejected
  ``FlatPrefixTuning`` too.
* GPT-2 and Llama (transformers 4.57 dispatches their attention through the AttentionInterface):
  whole models, the library's against a plain model with our prefixes and ``"adapterkern_prefix"``
  attention, outputs and the gradients of the MLP's parameters, with and without padding, and greedy
  generation with a KV cache (against the library's cache-less decoding for Llama, whose cached decoding
  is broken under 4.57, see test_generation_equals_library). The library runs with ``attn_implementation="eager"``: under 4.57's
  ``"sdpa"`` its prefixes are mis-masked (a boolean mask gets its prefix columns inverted to False,
  i.e. the prefix is ignored whenever a mask exists; without a mask SDPA's upper-left ``is_causal``
  hides most of the prefix from early queries), while its eager path extends an additive mask correctly.
* BERT (4.57's BertSelfAttention has its own attention code, no AttentionInterface): the whole MAM
  model (prefix + parallel adapter) of the library against a plain BERT whose self-attention modules
  compute q/k/v and call ``prefix_attention_forward`` (a small test shim standing in for 5.x's
  dispatch), with the parallel half from ``add_adapter(AdapterConfig.parallel())`` holding the
  library's adapter weights; the library under both its eager and sdpa BERT attention.
"""
import copy
import os
import types

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from conftest import import_adapters  # noqa: E402

adapters = import_adapters()

import torch  # noqa: E402
import transformers  # noqa: E402
from adapters import MAMConfig, PrefixTuningConfig  # noqa: E402

import adapterkern as ak  # noqa: E402
from adapterkern.integrations.prefix_attention import (  # noqa: E402
    attention_places,
    enable_prefix_attention,
    prefix_attention_forward,
)
from adapterkern.integrations.transformers import AdapterSlot, adapter_modules  # noqa: E402
from adapterkern.nn.prefix import PrefixTuning, prefix_from_adapterhub  # noqa: E402
from conftest import rel_err  # noqa: E402

V = 64
PREFIX = dict(prefix_length=30, bottleneck_size=800)


pytestmark = pytest.mark.usefixtures("one_thread")


def _base(arch, impl="eager", lm_head=False):
    tf = transformers
    if arch == "bert":
        return tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                          vocab_size=V, max_position_embeddings=40, attn_implementation=impl))
    if arch == "gpt2":
        cls = tf.GPT2LMHeadModel if lm_head else tf.GPT2Model
        return cls(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=40, attn_implementation=impl))
    if arch == "llama":
        cls = tf.LlamaForCausalLM if lm_head else tf.LlamaModel
        return cls(tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=V, max_position_embeddings=40, attn_implementation=impl))
    raise ValueError(arch)


def _pair(arch, config, impl="eager", lm_head=False):
    """(library model with adapter "a" active, a plain copy of the same backbone), both in eval mode."""
    plain = _base(arch, impl, lm_head).eval()
    lib = copy.deepcopy(plain)
    adapters.init(lib)
    lib.add_adapter("a", config=config)
    lib.set_active_adapters("a")
    with torch.no_grad():  # non-identity parallel adapters (mam_adapter init zeroes the up-projection)
        for name, p in lib.named_parameters():
            if ".adapters.a." in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return lib.eval(), plain


def _library_prefix(lib):
    return lib.base_model.prefix_tuning.prefix_tunings["a"]["self_prefix"]


def _attach(model, prefixes):
    for place, prefix in zip(attention_places(model), prefixes, strict=True):
        slot = AdapterSlot("prefix", place.hidden_size, place.layer)
        slot["a"] = prefix
        slot.active = "a"
        place.module.add_module("bottleneck_adapters", slot)


def _inputs(arch, padded, batch=3, seq=9):
    ids = torch.randint(2, V, (batch, seq))
    if not padded:
        return ids, None
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, n in ((1, 3), (2, 6)):
        if arch == "bert":
            mask[row, seq - n:] = 0
        else:
            mask[row, :n] = 0
    return ids, mask


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _forward_backward(model, ids, mask, params, cot):
    for p in params:
        p.grad = None
    out = _out(model(input_ids=ids, attention_mask=mask))
    (out * cot).sum().backward()
    return out.detach(), [p.grad.clone() for p in params]


def _assert_matches_library(plain, ours, lib, ids, mask):
    """Our model (prefix ``ours``) and the library's ``lib``: the same output and prefix gradients under
    one random cotangent. Returns the library's output."""
    cot = torch.randn(*ids.shape, 32)
    out, grads = _forward_backward(plain, ids, mask, _our_params(ours), cot)
    ref, ref_grads = _forward_backward(lib, ids, mask, _lib_params(lib), cot)
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-4, rel_err(g, rg)
    return ref


def _lib_params(lib):
    enc = _library_prefix(lib)
    return [enc.wte.weight, enc.control_trans[0].weight, enc.control_trans[0].bias, enc.control_trans[2].weight, enc.control_trans[2].bias]


def _our_params(prefixes):
    enc = prefixes[0].encoder
    return [enc.wte.weight, enc.control_trans[0].weight, enc.control_trans[0].bias, enc.control_trans[2].weight, enc.control_trans[2].bias]


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("config", ["prefix", "mam"])
def test_prefix_tensors_equal_library(arch, config):
    cfg = PrefixTuningConfig(**PREFIX) if config == "prefix" else MAMConfig()
    lib, _ = _pair(arch, cfg)
    lib_module = _library_prefix(lib)
    with torch.no_grad():
        theirs = lib_module(2)  # per layer: (2, batch, H, l, hd)
    ours = prefix_from_adapterhub(lib, "a")
    collapsed = prefix_from_adapterhub(lib_module, collapse=True)
    assert len(ours) == len(theirs) == 2
    heads, hd = (2, 8) if arch == "llama" else (4, 8)
    for layer, (kv, p, c) in enumerate(zip(theirs, ours, collapsed)):
        assert p.reparametrized and p.encoder is ours[0].encoder and p.layer == layer and not c.reparametrized
        k, v = p.key_value()
        assert k.shape == v.shape == (heads, 30, hd)
        for batch in range(2):
            assert rel_err(k, kv[0, batch]) < 1e-6 and rel_err(v, kv[1, batch]) < 1e-6
        ck, cv = c.key_value()
        assert torch.equal(ck, k) and torch.equal(cv, v)
    # the same parameters: one MLP of the library's shape and size
    assert sum(t.numel() for t in _our_params(ours)) == sum(t.numel() for t in lib_module.parameters())
    assert ours[0].encoder.control_trans[2].weight.shape == (2 * 2 * heads * hd, 800)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_ejected_flat_prefix_equals_library(arch):
    lib, _ = _pair(arch, PrefixTuningConfig(**PREFIX))
    with torch.no_grad():
        want = _library_prefix(lib)(1)
    lib.base_model.prefix_tuning.prefix_tunings["a"].eject()  # the library's own collapse (FlatPrefixTuning)
    flat = _library_prefix(lib)
    assert type(flat).__name__ == "FlatPrefixTuning"
    with torch.no_grad():
        theirs = flat(1)
    for kv, p in zip(theirs, prefix_from_adapterhub(flat)):
        assert not p.reparametrized
        k, v = p.key_value()
        assert torch.equal(k, kv[0, 0]) and torch.equal(v, kv[1, 0])
    for a, b in zip(want, theirs):
        assert rel_err(b, a) < 1e-6


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "padded"])
def test_causal_model_equals_library(arch, padded):
    lib, plain = _pair(arch, PrefixTuningConfig(**PREFIX), impl="eager")
    ours = prefix_from_adapterhub(lib, "a")
    _attach(plain, ours)
    enable_prefix_attention(plain)
    ids, mask = _inputs(arch, padded)
    _assert_matches_library(plain, ours, lib, ids, mask)


@pytest.mark.parametrize("arch,lib_cache", [("gpt2", True), ("gpt2", False), ("llama", False)])
def test_generation_equals_library(arch, lib_cache):
    """Our greedy decoding with a KV cache against the library's. The library's Llama ignores the cache
    under transformers 4.57 (its attention takes ``past_key_value``, 4.57 passes ``past_key_values``: a
    decode step sees only the prefix and the new token), so it decodes without a cache there."""
    lib, plain = _pair(arch, PrefixTuningConfig(**PREFIX), impl="eager", lm_head=True)
    _attach(plain, prefix_from_adapterhub(lib, "a", collapse=True))
    enable_prefix_attention(plain)
    ids, mask = _inputs(arch, True, seq=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=0)
    with torch.no_grad():
        ours = plain.generate(ids, **kwargs)
        theirs = lib.generate(ids, use_cache=lib_cache, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert rel_err(torch.stack(ours.scores), torch.stack(theirs.scores)) < 1e-5


def _shim_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """transformers 4.57 BertSelfAttention: q/k/v as the module computes them, attention through
    prefix_attention_forward (what transformers 5.x's BertSelfAttention dispatch does)."""
    batch, seq, _ = hidden_states.shape
    shape = (batch, seq, self.num_attention_heads, self.attention_head_size)
    q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
    out, _ = prefix_attention_forward(self, q, k, v, attention_mask, scaling=self.attention_head_size**-0.5, is_causal=False)
    return out.reshape(batch, seq, -1), None


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "padded"])
def test_bert_mam_equals_library(impl, padded):
    lib, plain = _pair("bert", MAMConfig(), impl=impl)
    ours = prefix_from_adapterhub(lib, "a")
    _attach(plain, ours)
    for place in attention_places(plain):
        place.module.forward = types.MethodType(_shim_forward, place.module)
    # the parallel half: adapterkern's parallel adapter beside each FFN, the library's weights
    ak.add_adapter(plain, "par", ak.AdapterConfig.parallel(), set_active=False)
    for module_name, adapter in adapter_modules(plain, "par").items():
        theirs = lib.get_submodule(module_name).adapters["a"]
        assert adapter.activation == "relu" and adapter.scaling == theirs.scaling == 4.0
        with torch.no_grad():
            adapter.adapter_down.weight.copy_(theirs.adapter_down[0].weight)
            adapter.adapter_down.bias.copy_(theirs.adapter_down[0].bias)
            adapter.adapter_up.weight.copy_(theirs.adapter_up.weight)
            adapter.adapter_up.bias.copy_(theirs.adapter_up.bias)
        plain.get_submodule(module_name).bottleneck_adapters.active = "par"
    ids, mask = _inputs("bert", padded)
    ref = _assert_matches_library(plain, ours, lib, ids, mask)
    # both halves matter
    for place in attention_places(plain):
        place.module.bottleneck_adapters.active = None
    with torch.no_grad():
        assert rel_err(_out(plain(input_ids=ids, attention_mask=mask)), ref) > 1e-3


def test_import_errors():
    lib, _ = _pair("bert", PrefixTuningConfig(**PREFIX))
    with pytest.raises(ValueError, match="name: required"):
        prefix_from_adapterhub(lib)
    with pytest.raises(ValueError, match="no prefix tuning 'b'"):
        prefix_from_adapterhub(lib, "b")
    with pytest.raises(ValueError, match="location_key"):
        prefix_from_adapterhub(lib, "a", location_key="cross_prefix")
    with pytest.raises(TypeError, match="PrefixTuningPool"):
        prefix_from_adapterhub(torch.nn.Linear(2, 2))
    gated, _ = _pair("bert", PrefixTuningConfig(**PREFIX, use_gating=True))
    with pytest.raises(ValueError, match="gating"):
        prefix_from_adapterhub(gated, "a")
    assert isinstance(prefix_from_adapterhub(lib, "a")[0], PrefixTuning)


def test_enable_refuses_a_model_without_the_attention_interface():
    """transformers 4.x BERT computes attention in its own code: enabling prefix attention there would
    silently do nothing, so it raises (transformers 5 BERT dispatches through the interface)."""
    model = _base("bert", "sdpa")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("BERT dispatches through the AttentionInterface in transformers 5")
    with pytest.raises(ValueError, match="does not dispatch"):
        enable_prefix_attention(model)
    assert model.config._attn_implementation == "sdpa"
