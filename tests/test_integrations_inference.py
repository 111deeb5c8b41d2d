"""optimize_for_inference / undo_inference_optimization on tiny random-weight Hugging Face models.

The reference is the same model before optimising (the hook path, itself tested against explicit
float64 maths in test_integrations_transformers.py). What each place should become is written out
here per model family (:data:`EXPECTED`), not read from the report under test; the report is then
checked against what runs (adapter calls counted per place).
"""
import copy
import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers not installed (it is in the test extra)")
pytest.importorskip("safetensors", reason="safetensors not installed (it is in the test extra)")

import adapterkern as ak  # noqa: E402
import adapterkern.functional  # noqa: E402
from adapterkern.integrations import inference_plans  # noqa: E402
from adapterkern.integrations.slots import iter_slots  # noqa: E402
from adapterkern.integrations.transformers import adapter_modules  # noqa: E402
from adapterkern.nn.bottleneck import BottleneckAdapter  # noqa: E402

from conftest import rel_err  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=97)
FAMILIES = ("bert", "roberta", "gpt2", "llama")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def tiny_model(family: str) -> nn.Module:
    """As in test_integrations_transformers.py; GPT-2 and Llama with their LM heads (for generate)."""
    if family == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(hidden_size=32, **TINY))
    elif family == "roberta":
        model = transformers.RobertaModel(transformers.RobertaConfig(hidden_size=32, **TINY))
    elif family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=97, bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(cfg)
    elif family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=32, num_key_value_heads=2, **TINY))
    else:
        raise AssertionError(family)
    return model.eval()


# Layer N's places per placement, and what optimize_for_inference makes of each (the role table of
# placement.py written out, with the model prefixes of the classes above).
_LAYER = {"bert": "bert.encoder.layer.{}", "roberta": "encoder.layer.{}", "gpt2": "transformer.h.{}", "llama": "model.layers.{}"}
_ATTN_OUT = {"bert": "attention.output.dense", "roberta": "attention.output.dense", "gpt2": "attn.c_proj", "llama": "self_attn.o_proj"}
_FFN_OUT = {"bert": "output.dense", "roberta": "output.dense", "gpt2": "mlp.c_proj", "llama": "mlp.down_proj"}
_FFN = {"bert": "output", "roberta": "output", "gpt2": "mlp", "llama": "mlp"}
_ATTENTION = {"bert": "attention.self", "roberta": "attention.self", "gpt2": "attn", "llama": "self_attn"}
_SEQ = {"bert": "fused", "roberta": "fused", "gpt2": "unchanged", "llama": "unchanged"}
EXPECTED = {
    family: {
        "parallel": [(_FFN[family], "merged")],
        "pfeiffer": [(_FFN_OUT[family], _SEQ[family])],
        "houlsby": [(_ATTN_OUT[family], _SEQ[family]), (_FFN_OUT[family], _SEQ[family])],
        "mam": [(_ATTENTION[family], "unchanged"), (_FFN[family], "merged")],
    }
    for family in FAMILIES
}


def expected(family, placement, layers=range(3), dropped=()):
    """{qualified place: merged / fused / unchanged}."""
    out = {}
    for i in layers:
        for place, what in EXPECTED[family][placement]:
            out[f"{_LAYER[family].format(i)}.{place}"] = "unchanged" if i in dropped else what
    return out


def config(placement, **kw):
    extra = {"prefix_length": 3, "prefix_bottleneck": 8} if placement == "mam" else {}
    return getattr(ak.AdapterConfig, placement)(**{"bottleneck_size": 5, **extra, **kw})


def randomize(model, name, scale=0.3):
    """Non-identity adapter weights, biases and scalings (a fresh parallel adapter is the identity)."""
    with torch.no_grad():
        for adapter in adapter_modules(model, name).values():
            for p in adapter.parameters():
                p.copy_(torch.randn_like(p) * scale)
            if isinstance(adapter, BottleneckAdapter) and isinstance(adapter.scaling, torch.Tensor):
                adapter.scaling.add_(1.0)


def adapted(family, placement="parallel", dtype=torch.float64, name="a", **kw):
    model = tiny_model(family)
    ak.add_adapter(model, name, config(placement, **kw))
    randomize(model, name)
    return model.to(dtype)


def batch(family, B=2, L=7):
    ids = torch.randint(3, 97, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L - 3:] = 0  # padding
    return {"input_ids": ids, "attention_mask": mask}


def run(model, inputs):
    """The last hidden state and the head's output (logits), as one flat tensor each."""
    out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) is not None else out.last_hidden_state
    head = out.logits if hasattr(out, "logits") else hidden
    return hidden, head


def assert_close(got, ref, dtype):
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= TOL[dtype], rel_err(g, r)


def report_kinds(report):
    kinds = {}
    for kind in ("merged", "fused", "unchanged"):
        for place in getattr(report, kind):
            assert place not in kinds, place
            kinds[place] = kind
    return kinds


def snapshot(model):
    """Everything undo must give back: module objects, parameters (objects, values, shapes,
    strides, requires_grad), hooks, slot state, the model's own attributes."""
    modules = list(model.named_modules(remove_duplicate=False))
    return {
        "modules": [(n, id(m), m.training) for n, m in modules],
        "params": [(n, id(p), tuple(p.shape), p.stride(), p.dtype, p.requires_grad) for n, p in model.named_parameters()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": [(n, list(m._forward_hooks.items()), list(m._forward_pre_hooks.items()), dict(m._forward_hooks_with_kwargs),
                   dict(m._forward_pre_hooks_with_kwargs), "forward" in m.__dict__, "train" in m.__dict__) for n, m in modules],
        "slots": [(n, slot.mode, slot.active, slot.dropped, slot.layer, list(slot), sorted(slot.__dict__)) for n, _, slot in iter_slots(model)],
        "dict": sorted(model.__dict__),
    }


def assert_equal_state(model, other):
    """Two models (a copy): the same modules by name and class, parameters (shapes, strides), state dict."""
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in other.named_modules()]
    assert [(n, p.shape, p.stride(), p.requires_grad) for n, p in model.named_parameters()] == [
        (n, p.shape, p.stride(), p.requires_grad) for n, p in other.named_parameters()]
    a, b = model.state_dict(), other.state_dict()
    assert list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert sorted(model.__dict__) == sorted(other.__dict__)


def assert_same(model, before):
    after = snapshot(model)
    for key in ("modules", "params", "hooks", "slots", "dict"):
        assert after[key] == before[key], key
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        assert after["state"][k].dtype == v.dtype and torch.equal(after["state"][k], v), k


@pytest.fixture
def calls(monkeypatch):
    """Counts, per adapter module, the calls that apply it: BottleneckAdapter.forward (the hook path)
    and adapterkern.functional.adapter_add_norm (the fused path, found by its w_down)."""
    counts = {"adapter": {}, "add_norm": {}}
    real_forward = BottleneckAdapter.forward

    def forward(self, *args, **kwargs):
        counts["adapter"][id(self)] = counts["adapter"].get(id(self), 0) + 1
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(BottleneckAdapter, "forward", forward)
    real_add_norm = adapterkern.functional.adapter_add_norm

    def add_norm(z, residual, w_down, *args, **kwargs):
        counts["add_norm"][id(w_down)] = counts["add_norm"].get(id(w_down), 0) + 1
        return real_add_norm(z, residual, w_down, *args, **kwargs)

    monkeypatch.setattr(adapterkern.functional, "adapter_add_norm", add_norm)
    return counts


def assert_calls_match_report(model, report, counts, forwards=1):
    """Merged places: no adapter call; fused: one adapter_add_norm call per forward and no adapter
    call; unchanged places of the active adapter (not dropped): one adapter call per forward."""
    kinds = report_kinds(report)
    for place, adapter in adapter_modules(model, report.adapter).items():
        if not isinstance(adapter, BottleneckAdapter):
            continue
        hooked = counts["adapter"].get(id(adapter), 0)
        fused = counts["add_norm"].get(id(adapter.adapter_down.weight), 0)
        if kinds[place] == "merged":
            assert (hooked, fused) == (0, 0), place
        elif kinds[place] == "fused":
            assert (hooked, fused) == (0, forwards), place
        elif "AdapterDrop" in report.unchanged[place]:
            assert (hooked, fused) == (0, 0), place
        else:
            assert (hooked, fused) == (forwards, 0), place


# ------------------------------------------------------------------------------------------------
# Exactness, report, calls, undo
# ------------------------------------------------------------------------------------------------

CASES = [(torch.float64, 2.5), (torch.float64, "channel"), (torch.float32, "channel"), (torch.float32, "learned")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["parallel", "pfeiffer", "houlsby", "mam"])
@pytest.mark.parametrize("dtype, scaling", CASES)
def test_optimised_model_matches_and_undo_restores(family, placement, dtype, scaling, calls):
    model = adapted(family, placement, dtype, scaling=scaling, activation="gelu")
    inputs = batch(family)
    ref = run(model, inputs)
    before = snapshot(model)
    report = ak.optimize_for_inference(model)
    assert report.adapter == "a"
    assert report_kinds(report) == expected(family, placement)  # every place, and what it became
    assert {n for n, _, _ in iter_slots(model)} == set(report_kinds(report))  # the adapters still sit where they sat
    calls["adapter"].clear()
    out = run(model, inputs)
    assert_close(out, ref, dtype)
    assert_calls_match_report(model, report, calls)
    with torch.no_grad():  # the in-place paths of the merged modules
        assert_close(run(model, inputs), ref, dtype)
    assert str(report).startswith("optimize_for_inference (adapter 'a')")
    assert ak.undo_inference_optimization(model) is report
    assert_same(model, before)
    for o, r in zip(run(model, inputs), ref):
        assert torch.equal(o, r)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("placement, dtype", [("parallel", torch.float64), ("parallel", torch.float32), ("mam", torch.float64)])
def test_generate_with_kv_cache(family, placement, dtype):
    model = adapted(family, placement, dtype, scaling="channel")
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True,
                  pad_token_id=0, use_cache=True)
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
        report = ak.optimize_for_inference(model)
        assert set(report.merged) == {f"{_LAYER[family].format(i)}.mlp" for i in range(3)}
        out = model.generate(ids, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert rel_err(torch.stack(out.logits), torch.stack(ref.logits)) <= TOL[dtype]
    ak.undo_inference_optimization(model)
    with torch.no_grad():
        again = model.generate(ids, **kwargs)
    assert torch.equal(again.sequences, ref.sequences) and torch.equal(torch.stack(again.logits), torch.stack(ref.logits))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_still_flow_to_the_inputs(family):
    """Eval-mode inputs that require grad (saliency, attacks): the merged modules take their
    out-of-place path and the gradient equals the unoptimised model's."""
    model = adapted(family, "parallel", torch.float64, scaling="channel")
    embeds = torch.randn(2, 5, 32, dtype=torch.float64)

    def grad():
        x = embeds.clone().requires_grad_()
        hidden, _ = run(model, {"inputs_embeds": x})
        (hidden * torch.linspace(-1, 1, hidden.numel(), dtype=hidden.dtype).view_as(hidden)).sum().backward()
        return hidden.detach(), x.grad

    ref = grad()
    ak.optimize_for_inference(model)
    got = grad()
    assert rel_err(got[0], ref[0]) <= 1e-12 and rel_err(got[1], ref[1]) <= 1e-12


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["parallel", "pfeiffer"])
def test_autocast_and_inference_mode(family, placement):
    """Under autocast (CPU, bfloat16) and inference_mode. The outputs have the unoptimised model's
    dtype, except BERT / RoBERTa's merged parallel adapter: there the unoptimised model's adapter op
    returns the skip input in autocast's dtype, the merged FFN keeps it in its own (as the backbone
    without an adapter does)."""
    model = adapted(family, placement, torch.float32, scaling="channel")
    inputs = batch(family)

    def forward():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return run(model, inputs)

    ref = forward()
    ak.set_active_adapter(model, None)
    plain = forward()
    ak.set_active_adapter(model, "a")
    ak.optimize_for_inference(model)
    out = forward()
    for o, r, p in zip(out, ref, plain):
        assert o.dtype == (p.dtype if (family, placement) in (("bert", "parallel"), ("roberta", "parallel")) else r.dtype)
        assert rel_err(o, r) < 5e-2


def test_fused_path_on_triton():
    model = adapted("bert", "houlsby", torch.float32, backend="triton", scaling="channel")
    inputs = batch("bert", L=5)
    ref = run(model, inputs)
    report = ak.optimize_for_inference(model)
    assert len(report.fused) == 6 and all("backend 'triton'" in v for v in report.fused.values())
    assert_close(run(model, inputs), ref, torch.float32)


def test_fused_module_passes_the_adapter_and_norm(monkeypatch):
    """The fused module's call, checked against the formula with a stand-in adapter_add_norm (so this
    runs whether or not the real one is there)."""
    seen = []

    def add_norm(z, residual, w_down, b_down, w_up, b_up, norm_weight, norm_bias, *, activation, scaling, eps, norm, backend):
        seen.append((activation, eps, norm, backend))
        act = ak.get_activation(activation).fn
        y = z + scaling * (act(z @ w_down.T + b_down) @ w_up.T + b_up) + residual
        return torch.nn.functional.layer_norm(y, (z.shape[-1],), norm_weight, norm_bias, eps)

    monkeypatch.setattr(adapterkern.functional, "adapter_add_norm", add_norm, raising=False)
    model = adapted("roberta", "pfeiffer", torch.float64, scaling="channel", activation="swish")
    inputs = batch("roberta")
    ref = run(model, inputs)
    report = ak.optimize_for_inference(model)
    assert len(report.fused) == 3
    assert_close(run(model, inputs), ref, torch.float64)
    assert seen == [("silu", model.config.layer_norm_eps, "layernorm", "auto")] * 3


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_without_biases_merge(family):
    model = adapted(family, "parallel", torch.float64, bias=False, scaling=0.75)
    inputs = batch(family)
    ref = run(model, inputs)
    report = ak.optimize_for_inference(model)
    assert len(report.merged) == 3
    assert_close(run(model, inputs), ref, torch.float64)


# ------------------------------------------------------------------------------------------------
# Memory: the widened weights replace the old ones
# ------------------------------------------------------------------------------------------------


def _storage_elements(tensors):
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes() // t.element_size()
    return sum(storages.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_no_second_copy_of_the_backbone(family):
    model = adapted(family, "parallel", torch.float32, scaling="channel")
    old = list({id(p): p for p in model.parameters()}.values())
    numel_before, storage_before = sum(p.numel() for p in old), _storage_elements(old)
    adapter = sum(p.numel() for a in adapter_modules(model, "a").values() for p in a.parameters())
    ak.optimize_for_inference(model)
    new = list({id(p): p for p in model.parameters()}.values())
    extra = sum(p.numel() for p in new) - numel_before
    # the widened weights hold W_down, b_down and s * W_up once more (+ Llama: zero biases for gate/up,
    # and a bias for down_proj, which has none)
    d, r, n = 32, 5, 64
    slack = 3 * (2 * n + d) if family == "llama" else 0
    assert 2 * 3 * r * d <= extra <= adapter + slack, (extra, adapter)
    # every tensor still alive, the replaced modules' included: their weights are views of the widened ones
    assert _storage_elements(old + new) - storage_before <= adapter + slack + 3 * d
    replaced = [t for t in old if all(t is not p for p in new) and t.numel() > d]
    assert replaced and all(any(t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for p in new) for t in replaced)


# ------------------------------------------------------------------------------------------------
# Refusals while optimised; what keeps working
# ------------------------------------------------------------------------------------------------


def _two_adapter_bert(tmp_path):
    model = tiny_model("bert")
    ak.add_adapter(model, "b", config("pfeiffer"))
    ak.add_adapter(model, "a", config("pfeiffer", scaling="channel"))
    randomize(model, "a")
    randomize(model, "b")
    saved = ak.save_adapter(model, "b", tmp_path / "b")
    return model, saved


def test_refusals_leave_the_model_as_it_is(tmp_path):
    model, saved = _two_adapter_bert(tmp_path)
    model.eval()  # the adapters too (add_adapter makes them in training mode; it does not matter for them)
    inputs = batch("bert")
    ref = run(model, inputs)
    ak.optimize_for_inference(model)
    state = snapshot(model)
    refused = {
        "model.train()": lambda: model.train(),
        "model.train(True)": lambda: model.train(True),
        "train_adapter": lambda: ak.train_adapter(model, "a"),
        "set_active_adapter": lambda: ak.set_active_adapter(model, "b"),
        "set_active_adapter(None)": lambda: ak.set_active_adapter(model, None),
        "add_adapter": lambda: ak.add_adapter(model, "c", config("parallel")),
        "delete_adapter": lambda: ak.delete_adapter(model, "b"),
        "load_adapter": lambda: ak.load_adapter(model, saved, name="c"),
        "add_fusion": lambda: ak.add_fusion(model, "f", ["a", "b"]),
        "route_adapters": lambda: ak.route_adapters(model, ["a", "b"], torch.tensor([0, 1])).__enter__(),
        "set_adapter_drop": lambda: ak.set_adapter_drop(model, 1),
        "StochasticAdapterDrop.step": lambda: ak.StochasticAdapterDrop(model).step(),
        "multi_task_forward": lambda: ak.multi_task_forward(model, ["a", "b"], **inputs),
        "optimize_for_inference": lambda: ak.optimize_for_inference(model),
        # a submodule of the optimised model: refused by the slots' flags
        "set_adapter_drop(model.bert)": lambda: ak.set_adapter_drop(model.bert, 1),
        "set_active_adapter(model.bert)": lambda: ak.set_active_adapter(model.bert, None),
    }
    for what, call in refused.items():
        with pytest.raises(RuntimeError, match="optimi[sz]ed for inference.*undo_inference_optimization"):
            call()
        assert_same(model, state)
    assert model.eval() is model and model.train(False) is model and not model.training
    assert_same(model, state)
    assert_close(run(model, inputs), ref, torch.float32)
    # train() on a submodule gets past the model's guard; the merged / fused modules refuse to run
    model.bert.encoder.train()
    with pytest.raises(RuntimeError, match="training mode.*undo_inference_optimization"):
        run(model, inputs)
    model.eval()
    ak.undo_inference_optimization(model)
    model.train()
    ak.set_active_adapter(model, "b")  # all allowed again
    ak.delete_adapter(model, "b")


def test_optimise_refuses_training_mode_routing_and_undo_needs_an_optimised_model():
    model = adapted("bert", "parallel", torch.float32)
    model.train()
    state = snapshot(model)
    with pytest.raises(RuntimeError, match="training mode.*eval"):
        ak.optimize_for_inference(model)
    assert_same(model, state)
    model.eval()
    state = snapshot(model)
    with ak.route_adapters(model, ["a"], torch.tensor([0, 0])):
        with pytest.raises(RuntimeError, match="route_adapters"):
            ak.optimize_for_inference(model)
    assert_same(model, state)
    with pytest.raises(ValueError, match="not optimised"):
        ak.undo_inference_optimization(model)
    with pytest.raises(TypeError):
        ak.optimize_for_inference("model")


def assert_same_files(directory, other):
    """Two saved adapters hold the same tensors (names, dtypes, values, in the same order) and configs.
    (Not byte for byte: safetensors writes its __metadata__ entries in no fixed order, and the
    config records the weights file's SHA-256.)"""
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (directory, other))
    assert list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (directory, other))
    assert ca.pop("weights_sha256") and cb.pop("weights_sha256")
    assert ca == cb


@pytest.mark.parametrize("family, placement", [("bert", "parallel"), ("bert", "pfeiffer"), ("gpt2", "mam"), ("llama", "parallel"),
                                               ("llama", "houlsby")])
def test_save_adapter_saves_the_adapter_not_the_merged_weights(family, placement, tmp_path):
    model = adapted(family, placement, torch.float32, scaling="channel")
    before = ak.save_adapter(model, "a", tmp_path / "before")
    report = ak.optimize_for_inference(model)
    assert report.merged or report.fused or family == "llama"
    after = ak.save_adapter(model, "a", tmp_path / "after")
    assert_same_files(after, before)


# ------------------------------------------------------------------------------------------------
# All or nothing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, placement, target", [("bert", "parallel", "_wide_out"), ("llama", "parallel", "MergedGatedMLP"),
                                                       ("roberta", "houlsby", "FusedAddNormOutput")])
def test_a_failure_half_way_leaves_the_model_bit_identical(family, placement, target, monkeypatch):
    model = adapted(family, placement, torch.float32, scaling="channel")
    inputs = batch(family)
    ref = run(model, inputs)
    state = snapshot(model)
    real = getattr(inference_plans, target)
    seen = []

    def failing(*args, **kwargs):
        seen.append(1)
        if len(seen) == 3:  # after two places are swapped in
            raise MemoryError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(inference_plans, target, failing)
    with pytest.raises(MemoryError, match="injected"):
        ak.optimize_for_inference(model)
    assert len(seen) == 3
    assert_same(model, state)
    for o, r in zip(run(model, inputs), ref):
        assert torch.equal(o, r)
    monkeypatch.setattr(inference_plans, target, real)
    ak.optimize_for_inference(model)  # and it can be optimised afterwards
    assert_close(run(model, inputs), ref, torch.float32)


# ------------------------------------------------------------------------------------------------
# What keeps the hook path, and why
# ------------------------------------------------------------------------------------------------


def _optimise_and_compare(model, family, dtype=torch.float64):
    inputs = batch(family)
    ref = run(model, inputs)
    state = snapshot(model)
    report = ak.optimize_for_inference(model)
    assert set(report_kinds(report)) == {n for n, _, _ in iter_slots(model)}
    assert_close(run(model, inputs), ref, dtype)
    ak.undo_inference_optimization(model)
    assert_same(model, state)
    return report


def test_adapter_drop_layers_stay_plain(calls):
    model = adapted("gpt2", "parallel", scaling="channel")
    ak.set_adapter_drop(model, 2)
    inputs = batch("gpt2")
    ref = run(model, inputs)
    report = ak.optimize_for_inference(model)
    assert report_kinds(report) == expected("gpt2", "parallel", dropped=(0, 1))
    assert all("AdapterDrop" in report.unchanged[f"transformer.h.{i}.mlp"] for i in (0, 1))
    calls["adapter"].clear()
    assert_close(run(model, inputs), ref, torch.float64)
    assert_calls_match_report(model, report, calls)


def test_gpt2_and_llama_sequential_adapters_keep_the_hook(calls):
    for family in ("gpt2", "llama"):
        model = adapted(family, "houlsby")
        report = _optimise_and_compare(model, family)
        assert not report.merged and not report.fused and len(report.unchanged) == 6
        assert all("decoder layer" in why for why in report.unchanged.values())


def test_fusion_and_no_active_adapter_keep_the_hook(tmp_path):
    model, _ = _two_adapter_bert(tmp_path)
    model = model.double()
    ak.add_fusion(model, "f", ["a", "b"])
    report = _optimise_and_compare(model, "bert")
    assert report.adapter == "f" and not report.merged and not report.fused
    assert all("composition" in why or "holds no entry" in why for why in report.unchanged.values())
    ak.set_active_adapter(model, None)
    report = _optimise_and_compare(model, "bert")
    assert report.adapter is None and set(report.unchanged.values()) == {"no adapter is active"}


def test_other_adapters_places_inside_replaced_modules_are_carried(tmp_path):
    """An inactive adapter on GPT-2's mlp.c_proj (inside the replaced mlp) and an inactive parallel
    adapter on BERT's output (the module the fused path replaces): their slots move with the
    replacement, under the same names; saving them gives the same files."""
    for family, active, other in (("gpt2", "parallel", "pfeiffer"), ("bert", "pfeiffer", "parallel")):
        model = tiny_model(family)
        ak.add_adapter(model, "q", config(other))
        ak.add_adapter(model, "a", config(active, scaling="channel"))
        randomize(model, "a")
        randomize(model, "q")
        model = model.double()
        before = ak.save_adapter(model, "q", tmp_path / family / "before")
        inputs = batch(family)
        ref = run(model, inputs)
        state = snapshot(model)
        report = ak.optimize_for_inference(model)
        assert len(report.merged) + len(report.fused) == 3 and len(report.unchanged) == 3
        assert all("holds no entry of the active adapter" in why for why in report.unchanged.values())
        assert_same_files(ak.save_adapter(model, "q", tmp_path / family / "after"), before)
        assert_close(run(model, inputs), ref, torch.float64)
        ak.undo_inference_optimization(model)
        assert_same(model, state)


def test_unexpressible_places_keep_the_hook():
    # an adapter that is not a plain BottleneckAdapter
    class Custom(BottleneckAdapter):
        pass

    model = adapted("llama", "parallel")
    slot = model.model.layers[1].mlp.bottleneck_adapters
    old = slot["a"]
    new = Custom(32, 5, activation=old.activation, scaling=old.scaling, dtype=torch.float64)
    new.load_state_dict(old.state_dict())
    slot["a"] = new
    report = _optimise_and_compare(model, "llama")
    assert len(report.merged) == 2 and "not a plain BottleneckAdapter" in report.unchanged["model.layers.1.mlp"]
    # a parallel adapter on a linear layer (target_modules): no FFN to merge into
    model = adapted("llama", "parallel", target_modules=["o_proj"])
    report = _optimise_and_compare(model, "llama")
    assert len(report.unchanged) == 3 and all("unknown FFN structure" in why for why in report.unchanged.values())
    # someone else's hook on a module the merge would replace
    model = adapted("gpt2", "parallel")
    model.transformer.h[2].mlp.c_fc.register_forward_hook(lambda m, a, o: o * 1.0)
    report = _optimise_and_compare(model, "gpt2")
    assert len(report.merged) == 2 and "forward hooks" in report.unchanged["transformer.h.2.mlp"]
    # a module in training mode where the merge would go (its dropout is random: no outputs compared)
    model = adapted("bert", "parallel")
    model.bert.encoder.layer[0].output.dropout.train()
    state = snapshot(model)
    report = ak.optimize_for_inference(model)
    assert len(report.merged) == 2 and "training mode" in report.unchanged["bert.encoder.layer.0.output"]
    ak.undo_inference_optimization(model)
    assert_same(model, state)


# ------------------------------------------------------------------------------------------------
# Copies and casts of an optimised model
# ------------------------------------------------------------------------------------------------


def test_deepcopy_and_cast_of_an_optimised_model():
    model = adapted("gpt2", "parallel", torch.float32, scaling="channel")
    plain = copy.deepcopy(model)
    inputs = batch("gpt2")
    ref = run(model, inputs)
    ak.optimize_for_inference(model)
    twin = copy.deepcopy(model)
    assert_close(run(twin, inputs), ref, torch.float32)
    with pytest.raises(RuntimeError, match="optimised for inference"):
        twin.train()
    ak.undo_inference_optimization(twin)
    assert_equal_state(twin, plain)
    # pickled whole (torch.save; before any forward, which installs transformers' unpicklable hooks)
    import io

    fresh = adapted("llama", "parallel", torch.float32, scaling="channel")
    fresh_plain = copy.deepcopy(fresh)
    ak.optimize_for_inference(fresh)
    buffer = io.BytesIO()
    torch.save(fresh, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_close(run(loaded, inputs), run(fresh_plain, inputs), torch.float32)
    with pytest.raises(RuntimeError, match="optimised for inference"):
        ak.set_active_adapter(loaded, None)
    ak.undo_inference_optimization(loaded)
    assert_equal_state(loaded, fresh_plain)
    # cast while optimised: undo gives back the weights in the new dtype
    model.double()
    ak.undo_inference_optimization(model)
    assert_equal_state(model, plain.double())
