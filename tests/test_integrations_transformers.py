"""add_adapter & co on tiny random-weight Hugging Face models (no downloads).

The reference for every placement is the backbone copied to float64 with the adapted modules
replaced by explicit wrappers around tests/conftest.py's float64 ``reference_adapter``: no hooks,
no adapterkern code, the same weights. Which modules are adapted, and how (sequential, parallel,
parallel with the skip input), is written out here per model family (:data:`EXPECTED_PLACES`), not
read from the model under test.
"""
import copy
import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers not installed (it is in the test extra)")
pytest.importorskip("safetensors", reason="safetensors not installed (it is in the test extra)")

import adapterkern as ak  # noqa: E402
from adapterkern.integrations.transformers import adapter_modules, adapter_state_dict  # noqa: E402

from conftest import reference_adapter, rel_err  # noqa: E402

TINY = dict(num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=97)


def tiny_model(family: str, dropout: float = 0.0) -> nn.Module:
    if family == "bert":
        cfg = transformers.BertConfig(hidden_size=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **TINY)
        model = transformers.BertForSequenceClassification(cfg)
    elif family == "roberta":
        cfg = transformers.RobertaConfig(hidden_size=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **TINY)
        model = transformers.RobertaModel(cfg)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=97, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        model = transformers.GPT2Model(cfg)
    elif family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, num_key_value_heads=2, **TINY)
        model = transformers.LlamaModel(cfg)
    else:
        raise AssertionError(family)
    return model.eval()


# The places of each placement in layer N of each family, and their modes: the role table of
# adapterkern/integrations/placement.py's docstring written out (in model order within a layer).
_ATTN_OUT = {"bert": "bert.encoder.layer.{}.attention.output.dense", "roberta": "encoder.layer.{}.attention.output.dense",
             "gpt2": "h.{}.attn.c_proj", "llama": "layers.{}.self_attn.o_proj"}
_FFN_OUT = {"bert": "bert.encoder.layer.{}.output.dense", "roberta": "encoder.layer.{}.output.dense",
            "gpt2": "h.{}.mlp.c_proj", "llama": "layers.{}.mlp.down_proj"}
_FFN = {"bert": ("bert.encoder.layer.{}.output", "parallel_skip"), "roberta": ("encoder.layer.{}.output", "parallel_skip"),
        "gpt2": ("h.{}.mlp", "parallel"), "llama": ("layers.{}.mlp", "parallel")}
_ATTENTION = {"bert": "bert.encoder.layer.{}.attention.self", "roberta": "encoder.layer.{}.attention.self",
              "gpt2": "h.{}.attn", "llama": "layers.{}.self_attn"}
EXPECTED_PLACES = {
    family: {
        "pfeiffer": [(_FFN_OUT[family], "sequential")],
        "houlsby": [(_ATTN_OUT[family], "sequential"), (_FFN_OUT[family], "sequential")],
        "parallel": [_FFN[family]],
        "mam": [(_ATTENTION[family], "prefix"), _FFN[family]],
    }
    for family in ("bert", "roberta", "gpt2", "llama")
}


def expected_places(family, placement, leave_out=(), layers=3):
    """[(qualified module name, mode)] of an adapter of this placement, in model order."""
    return [(name.format(i), mode) for i in range(layers) if i not in leave_out for name, mode in EXPECTED_PLACES[family][placement]]


def places_and_modes(model, name):
    from adapterkern.integrations.slots import iter_slots

    return [(place, slot.mode) for place, _, slot in iter_slots(model) if name in slot]


def run(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize(model, name, scale=0.3):
    """Non-identity adapter weights (fresh parallel adapters are exactly the identity)."""
    with torch.no_grad():
        for adapter in adapter_modules(model, name).values():
            for p in adapter.parameters():
                p.copy_(torch.randn_like(p) * scale)


class _SeqRef(nn.Module):
    def __init__(self, base, w, act, s):
        super().__init__()
        self.base, self.w, self.act, self.s = base, w, act, s

    def forward(self, *args, **kwargs):
        return reference_adapter(self.base(*args, **kwargs), *self.w, activation=self.act, scaling=self.s)


class _ParRef(_SeqRef):
    def forward(self, x):
        return reference_adapter(x, *self.w, activation=self.act, scaling=self.s, residual=self.base(x))


class _SkipRef(_SeqRef):
    def forward(self, hidden, skip):
        return self.base(hidden, reference_adapter(skip, *self.w, activation=self.act, scaling=self.s))


def reference_model(base, model, name, modes):
    """float64 copy of ``base`` (the model before add_adapter) with adapter ``name``'s places wrapped
    explicitly, each as ``modes[place]`` says (the test's expectation, not the model's own record);
    returns (ref_model, {place: [float64 leaf weights]})."""
    ref = copy.deepcopy(base).double()
    leaves = {}
    for place, adapter in adapter_modules(model, name).items():
        mode = modes[place]
        w = [
            None if t is None else t.detach().double().requires_grad_()
            for t in (adapter.adapter_down.weight, adapter.adapter_down.bias, adapter.adapter_up.weight, adapter.adapter_up.bias)
        ]
        s = adapter.scaling
        s = s.detach().double().requires_grad_() if isinstance(s, torch.Tensor) else s
        leaves[place] = w + [s]
        cls = {"sequential": _SeqRef, "parallel": _ParRef, "parallel_skip": _SkipRef}[mode]
        parent_name, _, child = place.rpartition(".")
        parent = ref.get_submodule(parent_name) if parent_name else ref
        setattr(parent, child, cls(ref.get_submodule(place), w, adapter.activation, s))
    return ref, leaves


def assert_matches_reference(family, config, backend="torch", train=False, expected=None):
    base = tiny_model(family)
    model = copy.deepcopy(base)
    ak.add_adapter(model, "task", config)
    if expected is None:
        expected = expected_places(family, config.placement, config.leave_out)
    assert places_and_modes(model, "task") == expected
    randomize(model, "task")
    model.train(train)
    ids = torch.randint(0, 97, (2, 9))
    out = run(model, ids)
    ref_model, leaves = reference_model(base, model, "task", dict(expected))
    ref_model.train(train)
    ref = run(ref_model, ids)
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    # gradients of every adapter tensor, through the rest of the frozen backbone
    cot = torch.randn_like(ref)
    (out * cot.float()).sum().backward()
    (ref * cot).sum().backward()
    for place, adapter in adapter_modules(model, "task").items():
        ours = [adapter.adapter_down.weight, adapter.adapter_down.bias, adapter.adapter_up.weight, adapter.adapter_up.bias]
        if isinstance(adapter.scaling, torch.Tensor):
            ours.append(adapter.scaling)
        for mine, theirs in zip(ours, leaves[place]):
            assert mine.grad is not None and theirs.grad is not None, place
            assert rel_err(mine.grad, theirs.grad) < 1e-4, (place, rel_err(mine.grad, theirs.grad))
    return model


PLACES_PER_LAYER = {"pfeiffer": 1, "houlsby": 2, "parallel": 1}


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "parallel"])
def test_matches_reference(family, placement):
    config = getattr(ak.AdapterConfig, placement)(bottleneck_size=5, activation="gelu")
    model = assert_matches_reference(family, config)
    assert len(adapter_modules(model, "task")) == 3 * PLACES_PER_LAYER[placement]


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "parallel", "mam"])
def test_places_and_modes_follow_the_role_table(family, placement):
    model = tiny_model(family)
    config = getattr(ak.AdapterConfig, placement)(bottleneck_size=4, **({"prefix_length": 2, "prefix_bottleneck": 8} if placement == "mam" else {}))
    ak.add_adapter(model, "a", config)
    assert places_and_modes(model, "a") == expected_places(family, placement)


def test_parallel_adapter_on_target_modules_matches_reference():
    config = ak.AdapterConfig.parallel(bottleneck_size=4, target_modules=["o_proj"])
    assert_matches_reference("llama", config, expected=[(f"layers.{i}.self_attn.o_proj", "parallel") for i in range(3)])


@pytest.mark.parametrize(
    "family, placement, target, match",
    [
        ("gpt2", "pfeiffer", "mlp.act", "not a linear layer"),  # an activation: the adapter would not fit its width
        ("llama", "pfeiffer", "layers", "not a linear layer"),  # a ModuleList: never called, the adapter would do nothing
        ("llama", "houlsby", "mlp", "not a linear layer"),
        ("bert", "parallel", "intermediate.dense", "keeps the width"),  # 32 -> 64
        ("llama", "parallel", "mlp.up_proj", "keeps the width"),
    ],
)
def test_target_modules_must_name_linear_layers(family, placement, target, match):
    model = tiny_model(family)
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="target_modules: .*" + match):
        ak.add_adapter(model, "a", ak.AdapterConfig(placement=placement, target_modules=[target]))
    assert ak.list_adapters(model) == [] and list(model.state_dict()) == keys
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("scaling", ["learned", "channel", 0.5])
def test_scaling_variants_and_train_mode(scaling):
    assert_matches_reference("llama", ak.AdapterConfig.houlsby(bottleneck_size=4, scaling=scaling), train=True)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "parallel"])
def test_triton_backend(placement):
    config = getattr(ak.AdapterConfig, placement)(bottleneck_size=4, backend="triton", leave_out=[1, 2])
    assert_matches_reference("bert", config, backend="triton")


def test_place_names_and_leave_out():
    model = tiny_model("llama")
    ak.add_adapter(model, "h", ak.AdapterConfig.houlsby(leave_out=[0, 2]))
    assert list(adapter_modules(model, "h")) == ["layers.1.self_attn.o_proj", "layers.1.mlp.down_proj"]
    model = tiny_model("bert")
    ak.add_adapter(model, "p", ak.AdapterConfig.parallel())
    assert list(adapter_modules(model, "p")) == [f"bert.encoder.layer.{i}.output" for i in range(3)]
    ak.add_adapter(model, "f", ak.AdapterConfig.pfeiffer())
    assert list(adapter_modules(model, "f")) == [f"bert.encoder.layer.{i}.output.dense" for i in range(3)]
    gpt = tiny_model("gpt2")
    ak.add_adapter(gpt, "h", ak.AdapterConfig.houlsby())
    assert list(adapter_modules(gpt, "h"))[:2] == ["h.0.attn.c_proj", "h.0.mlp.c_proj"]


def test_presets_follow_adapters_library_defaults():
    p, h, par = ak.AdapterConfig.pfeiffer(), ak.AdapterConfig.houlsby(), ak.AdapterConfig.parallel()
    assert (p.reduction_factor, p.activation, p.scaling) == (16, "relu", 1.0)
    assert (h.reduction_factor, h.activation) == (16, "silu")
    assert (par.reduction_factor, par.scaling, par.init) == (2, 4.0, "mam_adapter")
    model = tiny_model("llama")
    ak.add_adapter(model, "p", par)
    assert all(a.bottleneck_size == 16 for a in adapter_modules(model, "p").values())  # d=32 / 2


def test_fresh_parallel_adapter_is_identity_and_none_is_backbone():
    base = tiny_model("gpt2")
    model = copy.deepcopy(base)
    ids = torch.randint(0, 97, (2, 6))
    expected = run(base, ids)
    ak.add_adapter(model, "p", ak.AdapterConfig.parallel())
    assert torch.equal(run(model, ids), expected)
    randomize(model, "p")
    assert not torch.allclose(run(model, ids), expected)
    ak.set_active_adapter(model, None)
    assert torch.equal(run(model, ids), expected)


def test_several_adapters_switch_without_reloading():
    base = tiny_model("bert")
    model = copy.deepcopy(base)
    ids = torch.randint(0, 97, (2, 6))
    ak.add_adapter(model, "a", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    ak.add_adapter(model, "b", ak.AdapterConfig.parallel(bottleneck_size=4))
    randomize(model, "a")
    randomize(model, "b")
    assert ak.get_active_adapter(model) == "b" and ak.list_adapters(model) == ["a", "b"]
    out_b = run(model, ids)
    ak.set_active_adapter(model, "a")
    out_a = run(model, ids)
    only_a = copy.deepcopy(model)
    ak.delete_adapter(only_a, "b")
    assert torch.equal(run(only_a, ids), out_a)
    ak.set_active_adapter(model, "b")
    assert torch.equal(run(model, ids), out_b) and not torch.allclose(out_a, out_b)
    # deleting every adapter restores the backbone exactly: keys, hooks, outputs
    ak.delete_adapter(model, "a")
    ak.delete_adapter(model, "b")
    assert list(model.state_dict()) == list(base.state_dict())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(run(model, ids), run(base, ids))


def test_train_adapter_freezes_the_backbone():
    model = tiny_model("bert")
    ak.add_adapter(model, "a", ak.AdapterConfig.houlsby(bottleneck_size=4))
    ak.add_adapter(model, "b", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    summary = ak.train_adapter(model, "a", train_modules=["classifier"])
    assert ak.get_active_adapter(model) == "a"
    adapter_params = [p for a in adapter_modules(model, "a").values() for p in a.parameters()]
    head = list(model.classifier.parameters())
    expected = sum(p.numel() for p in adapter_params + head)
    assert summary.trainable == expected
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert summary.percent == pytest.approx(100 * expected / summary.total)
    assert summary.adapters["a"] == sum(p.numel() for p in adapter_params)
    assert "trainable parameters" in str(summary)
    randomize(model, "a")
    model(input_ids=torch.randint(0, 97, (2, 5)), labels=torch.tensor([0, 1])).loss.backward()
    for name, p in model.named_parameters():
        should = p.requires_grad
        assert (p.grad is not None) == should, name
        if should:
            assert p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="train_modules"):
        ak.train_adapter(model, "a", train_modules=["no_such_head"])


def test_save_load_roundtrip(tmp_path):
    base = tiny_model("bert")
    model = copy.deepcopy(base)
    ak.add_adapter(model, "sent", ak.AdapterConfig.houlsby(bottleneck_size=4, scaling="channel", leave_out=[1]))
    randomize(model, "sent")
    ids = torch.randint(0, 97, (2, 6))
    expected = run(model, ids)
    directory = ak.save_adapter(model, "sent", tmp_path / "sent")
    weights = directory / "adapter_model.safetensors"
    meta = json.loads((directory / "adapter_config.json").read_text())
    assert meta["weights_bytes"] == weights.stat().st_size
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    assert set(saved) == set(adapter_state_dict(model, "sent"))  # the adapter's tensors only
    assert sum(t.numel() for t in saved.values()) == ak.adapter_summary(model).adapters["sent"]
    assert weights.stat().st_size < 4 * meta["num_parameters"] + 4096
    other = copy.deepcopy(base)
    assert ak.load_adapter(other, directory) == "sent"
    assert torch.equal(run(other, ids), expected)
    assert ak.load_adapter(other, directory, name="again") == "again"
    assert ak.list_adapters(other) == ["sent", "again"]


def _corrupt_byte(path, offset_from_end=10):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_load_refuses_bad_files_and_leaves_model_unchanged(tmp_path):
    base = tiny_model("bert")
    src = copy.deepcopy(base)
    ak.add_adapter(src, "a", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    good = ak.save_adapter(src, "a", tmp_path / "good")
    target = copy.deepcopy(base)
    ak.add_adapter(target, "keep", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    randomize(target, "keep")
    ids = torch.randint(0, 97, (2, 5))
    before, keys = run(target, ids), list(target.state_dict())

    def refused(directory, match):
        with pytest.raises(ValueError, match=match):
            ak.load_adapter(target, directory)
        assert ak.list_adapters(target) == ["keep"] and list(target.state_dict()) == keys
        assert torch.equal(run(target, ids), before)

    import shutil

    bad = tmp_path / "flipped"
    shutil.copytree(good, bad)
    _corrupt_byte(bad / "adapter_model.safetensors")
    refused(bad, "SHA-256")
    missing = tmp_path / "missing"
    missing.mkdir()
    refused(missing, "has no")
    # a well-formed file for another model: hidden size 48 instead of 32
    wide = tiny_model("bert").__class__(transformers.BertConfig(hidden_size=48, **TINY))
    ak.add_adapter(wide, "a", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    refused(ak.save_adapter(wide, "a", tmp_path / "wide"), "hidden size")
    # a different model family: the places do not exist
    llama = tiny_model("llama")
    ak.add_adapter(llama, "a", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    refused(ak.save_adapter(llama, "a", tmp_path / "llama"), "does not have")
    # tensors renamed consistently (size and hash updated): names no longer match the places
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    shutil.copytree(good, renamed)
    tensors = load_file(str(renamed / "adapter_model.safetensors"))
    tensors = {k.replace("adapter_up", "adapter_upp"): v for k, v in tensors.items()}
    save_file(tensors, str(renamed / "adapter_model.safetensors"))
    meta = json.loads((renamed / "adapter_config.json").read_text())
    import hashlib

    blob = (renamed / "adapter_model.safetensors").read_bytes()
    meta.update(weights_bytes=len(blob), weights_sha256=hashlib.sha256(blob).hexdigest())
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": "float32"} for k, v in tensors.items()}
    (renamed / "adapter_config.json").write_text(json.dumps(meta))
    refused(renamed, "lacks tensors")
    # and the same name twice
    ak.load_adapter(target, good, name="second")
    with pytest.raises(ValueError, match="already has"):
        ak.load_adapter(target, good, name="second")


def test_target_modules_on_a_custom_model():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 40), nn.Linear(40, 16)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    model = nn.Sequential(Block(), Block())
    with pytest.raises(ValueError, match="Sequential.*target_modules"):
        ak.add_adapter(model, "a")
    ak.add_adapter(model, "a", ak.AdapterConfig.pfeiffer(bottleneck_size=3, target_modules=["fc2"]))
    assert list(adapter_modules(model, "a")) == ["0.fc2", "1.fc2"]
    randomize(model, "a")
    x = torch.randn(5, 16)
    h = x
    for block, a in zip(model, adapter_modules(model, "a").values()):
        fc2_out = nn.functional.linear(torch.relu(block.fc1(h)), block.fc2.weight, block.fc2.bias)  # no hook
        w = [t.double() for t in (a.adapter_down.weight, a.adapter_down.bias, a.adapter_up.weight, a.adapter_up.bias)]
        h = h + reference_adapter(fc2_out.double(), *w).float()
    assert rel_err(model(x), h) < 1e-5
    with pytest.raises(ValueError, match="matches no module"):
        ak.add_adapter(model, "b", ak.AdapterConfig.pfeiffer(target_modules=["fc9"]))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(placement="sideways"), ValueError, "placement"),
        (dict(bottleneck_size=0), ValueError, "bottleneck_size"),
        (dict(reduction_factor=-2), ValueError, "reduction_factor"),
        (dict(activation="nope"), ValueError, "activation"),
        (dict(scaling="big"), ValueError, "scaling"),
        (dict(scaling=[1.0]), TypeError, "scaling"),
        (dict(init="zeros"), ValueError, "init"),
        (dict(leave_out=(1.5,)), TypeError, "leave_out"),
        (dict(target_modules=[]), ValueError, "target_modules"),
        (dict(backend="jax"), ValueError, "backend"),
        (dict(scaling=float("nan")), ValueError, "scaling"),
        (dict(scaling=float("inf")), ValueError, "scaling"),
        (dict(scaling=float("-inf")), ValueError, "scaling"),
        (dict(target_modules=["fc("]), ValueError, "target_modules: 'fc\\(' is not a valid regular expression"),
        (dict(target_modules=["o_proj", "[a-"]), ValueError, "target_modules"),
        (dict(bias="yes"), TypeError, "bias"),
        (dict(leave_out=3), TypeError, "leave_out"),
    ],
)
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ak.AdapterConfig(**kwargs)


def test_bad_calls():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="model"):
        ak.add_adapter("llama", "a")
    with pytest.raises(ValueError, match="name"):
        ak.add_adapter(model, "has space")
    with pytest.raises(TypeError, match="config"):
        ak.add_adapter(model, "a", {"placement": "pfeiffer"})
    with pytest.raises(ValueError, match="leaves no place"):
        ak.add_adapter(model, "a", ak.AdapterConfig.pfeiffer(leave_out=[0, 1, 2]))
    ak.add_adapter(model, "a")
    with pytest.raises(ValueError, match="already has"):
        ak.add_adapter(model, "a")
    with pytest.raises(ValueError, match="no adapter 'b'"):
        ak.set_active_adapter(model, "b")
    with pytest.raises(ValueError, match="no adapter 'b'"):
        ak.train_adapter(model, "b")


def test_config_json_roundtrip():
    cfg = ak.AdapterConfig.houlsby(bottleneck_size=8, scaling="learned", leave_out=[3, 1], target_modules=["o_proj"])
    again = ak.AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.leave_out == (1, 3)
    with pytest.raises(ValueError, match="unknown fields"):
        ak.AdapterConfig.from_dict({"placement": "pfeiffer", "dropout": 0.1})


def test_torch_compile():
    model = tiny_model("llama")
    ak.add_adapter(model, "a", ak.AdapterConfig.houlsby(bottleneck_size=4))
    randomize(model, "a")
    ids = torch.randint(0, 97, (2, 5))
    expected = run(model, ids)
    compiled = torch.compile(model, backend="aot_eager")
    assert rel_err(run(compiled, ids), expected) < 1e-6


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_mam_is_the_parallel_adapter_plus_prefixes(family, tmp_path):
    """MAM through add_adapter == a parallel adapter with the same weights plus the same prefix modules
    put on the attention modules by hand (the prefix attention itself is tested in test_nn_prefix.py)."""
    from adapterkern.integrations.prefix_attention import attention_places
    from adapterkern.integrations.transformers import AdapterSlot

    base = tiny_model(family)
    mam = copy.deepcopy(base)
    ak.add_adapter(mam, "m", ak.AdapterConfig.mam(prefix_length=4, prefix_bottleneck=16, leave_out=[2]))
    randomize(mam, "m", scale=0.2)
    places = adapter_modules(mam, "m")
    assert places_and_modes(mam, "m") == expected_places(family, "mam", leave_out=[2])  # 2 attentions (prefix) + 2 FFNs
    ids = torch.randint(0, 97, (2, 7))
    out = run(mam, ids)

    manual = copy.deepcopy(base)
    ak.add_adapter(manual, "m", ak.AdapterConfig.parallel(leave_out=[2]))
    for place, adapter in adapter_modules(manual, "m").items():
        adapter.load_state_dict(places[place].state_dict())
    from adapterkern.integrations.prefix_attention import enable_prefix_attention

    for att in attention_places(manual):
        if att.layer == 2:
            continue
        slot = AdapterSlot("prefix", att.hidden_size, att.layer)
        slot["m"] = copy.deepcopy(places[att.name]).collapse()
        slot.active = "m"
        att.module.add_module("bottleneck_adapters", slot)
    enable_prefix_attention(manual)
    assert rel_err(out, run(manual, ids)) < 1e-6
    assert not torch.allclose(out, run(base, ids))

    # the shared prefix MLP is counted once; saving writes collapsed prefixes only
    summary = ak.adapter_summary(mam)
    unique = {id(p): p for a in places.values() for p in a.parameters()}
    assert summary.adapters["m"] == sum(p.numel() for p in unique.values())
    directory = ak.save_adapter(mam, "m", tmp_path / "mam")
    from safetensors.torch import load_file

    keys = set(load_file(str(directory / "adapter_model.safetensors")))
    assert {k.rsplit(".", 1)[-1] for k in keys if "prefix" in k} == {"prefix_key", "prefix_value"}
    assert all(k.endswith((".prefix_key", ".prefix_value")) or ".adapter_" in k for k in keys), sorted(keys)
    other = copy.deepcopy(base)
    ak.load_adapter(other, directory)
    assert rel_err(run(other, ids), out) < 1e-6
    ak.delete_adapter(other, "m")
    assert torch.equal(run(other, ids), run(base, ids))

    # training reaches the prefix MLP
    ak.train_adapter(mam, "m")
    run(mam, ids).square().mean().backward()
    mlp_grads = [p.grad for a in places.values() if hasattr(a, "encoder") and a.encoder is not None for p in a.encoder.parameters()]
    assert mlp_grads and all(g is not None and g.abs().sum() > 0 for g in mlp_grads)


_STREAM = {"bert": ("bert.encoder.layer.{}.output.LayerNorm", "renorm"), "roberta": ("encoder.layer.{}.output.LayerNorm", "renorm"),
           "gpt2": ("h.{}", "sequential"), "llama": ("layers.{}", "sequential")}


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
def test_original_ln_before_adapts_the_stream_after_the_residual_add(family, tmp_path):
    """pfeiffer(original_ln_before=True), the adapters library's seq_bn (its numbers: the AdapterHub fixture
    tests): places after the FFN's residual add; saved and loaded; optimize_for_inference leaves it on the
    hook path with the same output."""
    model = tiny_model(family)
    ids = torch.tensor([[5, 17, 42, 8, 3, 61]])
    plain = run(model, ids)
    ak.add_adapter(model, "s", ak.AdapterConfig.pfeiffer(original_ln_before=True, reduction_factor=4))
    name, mode = _STREAM[family]
    assert places_and_modes(model, "s") == [(name.format(i), mode) for i in range(3)]
    randomize(model, "s")
    adapted = run(model, ids)
    assert (adapted - plain).abs().max() > 1e-3
    ak.save_adapter(model, "s", tmp_path)
    other = tiny_model(family)
    other.load_state_dict(ak.backbone_state_dict(model))
    ak.load_adapter(other, tmp_path)
    torch.testing.assert_close(run(other, ids), adapted, rtol=0, atol=0)
    report = ak.optimize_for_inference(model)
    assert "unchanged" in str(report)
    torch.testing.assert_close(run(model, ids), adapted, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="original_ln_before"):
        ak.AdapterConfig.houlsby(original_ln_before=True)
