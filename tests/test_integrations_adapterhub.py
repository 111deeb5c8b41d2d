"""patch_adapters / unpatch_adapters on models set up with the AdapterHub ``adapters`` library: each
adapter module's classification and fused forward (adapterkern.integrations.adapterhub_plans), the
report and warning, patch / unpatch mechanics (adapterkern.integrations.adapterhub).

Tiny random-weight BERT, RoBERTa, GPT-2, Llama and T5 models (no downloads) carry adapters of each
bottleneck config type with random (non-identity) weights; the patched model's outputs and the
gradients of the input embeddings and of every parameter must equal the unpatched model's, in eval
and train mode (same seed: the base model's dropout draws the same masks), and the fused op must
actually have run (its calls are counted). Run by ``make test-adapterhub`` (its own venv: the
library pins transformers~=4.57); elsewhere the module skips, unless ADAPTERKERN_REQUIRE_ADAPTERS=1.
"""
import copy
import json
import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from conftest import import_adapters  # noqa: E402

adapters = import_adapters()

import torch  # noqa: E402
import transformers  # noqa: E402
from adapters import (  # noqa: E402
    AdapterPlusConfig,
    CompacterConfig,
    DoubleSeqBnConfig,
    MAMConfig,
    ParBnConfig,
    PrefixTuningConfig,
    SeqBnConfig,
)
from adapters.composition import BatchSplit, Fuse, Stack  # noqa: E402

import adapterkern  # noqa: E402
from adapterkern.backends import is_available  # noqa: E402
from adapterkern.integrations import adapterhub as ah  # noqa: E402
from adapterkern.integrations import adapterhub_plans  # noqa: E402
from conftest import assert_runs_close, assert_runs_equal, rel_err  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:`past_key_value` is deprecated:FutureWarning"),  # transformers' T5
    pytest.mark.usefixtures("one_thread"),
]

D = 32  # hidden size of every tiny model
DROP = 0.1  # the base models' own dropout (active in train mode)



def _model(arch: str):
    """A tiny random-weight model of ``arch`` with adapters.init applied."""
    tf = transformers
    common = dict(vocab_size=64, max_position_embeddings=32)
    if arch == "bert":
        m = tf.BertModel(tf.BertConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                       hidden_dropout_prob=DROP, attention_probs_dropout_prob=DROP, **common))
    elif arch == "roberta":
        m = tf.RobertaModel(tf.RobertaConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                             hidden_dropout_prob=DROP, attention_probs_dropout_prob=DROP, pad_token_id=1,
                                             vocab_size=64, max_position_embeddings=40))
    elif arch == "gpt2":
        m = tf.GPT2Model(tf.GPT2Config(vocab_size=64, n_positions=32, n_embd=D, n_layer=2, n_head=4,
                                       resid_pdrop=DROP, embd_pdrop=DROP, attn_pdrop=DROP))
    elif arch == "llama":
        m = tf.LlamaModel(tf.LlamaConfig(hidden_size=D, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, attention_dropout=DROP, **common))
    elif arch == "t5":
        m = tf.T5Model(tf.T5Config(vocab_size=64, d_model=D, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   dropout_rate=DROP, decoder_start_token_id=0))
    else:
        raise ValueError(arch)
    adapters.init(m)
    return m


def _randomize(model):
    """Random, non-identity adapter weights (the library inits some up-projections to zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." not in name and "prefix" not in name:
                continue
            if name.endswith("scaling"):
                p.uniform_(0.5, 1.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.4)


def _inputs(arch, dtype, batch=2, seq=5):
    x = {"inputs_embeds": torch.randn(batch, seq, D, dtype=dtype, requires_grad=True)}
    if arch == "t5":
        x["decoder_inputs_embeds"] = torch.randn(batch, 4, D, dtype=dtype, requires_grad=True)
    return x


def _run(model, inputs, seed=1234, **kwargs):
    """Output and gradients (of the inputs and every parameter) of a fixed random projection of the output."""
    torch.manual_seed(seed)  # the same dropout masks in every run
    out = model(**inputs, **kwargs).last_hidden_state
    proj = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    named = list(inputs.items()) + [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * proj).sum(), [t for _, t in named], allow_unused=True)
    return out.detach(), {n: g for (n, _), g in zip(named, grads)}


_assert_close = assert_runs_close
_assert_equal = assert_runs_equal


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls into the fused op made by the integration."""
    calls = []
    real = adapterhub_plans.bottleneck_adapter

    def counting(*args, **kwargs):
        calls.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(adapterhub_plans, "bottleneck_adapter", counting)
    return calls


def _patch(model, **kwargs):
    """patch_adapters, failing on any warning (the configs here are all fusable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ah.AdapterPatchWarning)
        return adapterkern.patch_adapters(model, **kwargs)


# ------------------------------------------------------------------------------------------------
# Equivalence with the library: config types x models, eval and train mode
# ------------------------------------------------------------------------------------------------
CONFIGS = {
    # seq_bn (Pfeiffer): original_ln_before, residual_before_ln True, relu
    "seq_bn": lambda: SeqBnConfig(reduction_factor=4),
    "seq_bn-post_add-channel-gelu_new": lambda: SeqBnConfig(reduction_factor=4, residual_before_ln="post_add", scaling="channel", non_linearity="gelu_new"),
    "seq_bn-res_after_ln-learned-tanh": lambda: SeqBnConfig(reduction_factor=4, residual_before_ln=False, scaling="learned", non_linearity="tanh"),
    "seq_bn-ln_before-ln_after-leakyrelu": lambda: SeqBnConfig(reduction_factor=4, ln_before=True, ln_after=True, adapter_residual_before_ln=True, scaling=0.7, non_linearity="leakyrelu"),
    # double_seq_bn (Houlsby): adapters after attention and FFN, swish
    "double_seq_bn": lambda: DoubleSeqBnConfig(reduction_factor=4),
    "double_seq_bn-ln_before_after-quick_gelu": lambda: DoubleSeqBnConfig(reduction_factor=4, original_ln_before=True, original_ln_after=False, residual_before_ln=False, scaling="channel", non_linearity="Quick_GELU"),
    # par_bn / scaled_par_bn (He et al.): reads the sublayer input, adds to its output
    "par_bn": lambda: ParBnConfig(reduction_factor=4),
    "scaled_par_bn-gelu": lambda: ParBnConfig(scaling="learned", non_linearity="gelu"),
    "par_bn-ln_before-channel-sigmoid": lambda: ParBnConfig(reduction_factor=4, ln_before=True, scaling="channel", non_linearity="sigmoid"),
    "mam": lambda: MAMConfig(PrefixTuningConfig(bottleneck_size=16, prefix_length=3), ParBnConfig(reduction_factor=4)),
    "adapter_plus": lambda: AdapterPlusConfig(reduction_factor=4, stochastic_depth=0.0),
}


def _setup(arch, config, dtype=torch.float32, name="a"):
    model = _model(arch)
    model.add_adapter(name, config=config)
    model.set_active_adapters(name)
    _randomize(model)
    return model.to(dtype)


def _check_equivalence(model, arch, mode, fused_calls, backend="torch", out_tol=1e-5, grad_tol=1e-4, dtype=torch.float32):
    """Patch ``model`` (unpatched on entry) and compare with the library in ``mode``; returns (ref, got)."""
    model.train(mode == "train")
    inputs = _inputs(arch, dtype)
    ref = _run(model, inputs)
    report = _patch(model, backend=backend)
    assert report.fused and not report.library and not report.library_in_training, str(report)
    fused_calls.clear()
    got = _run(model, inputs)
    # One fused call per fused module (each sits in the forward once), all on the requested backend.
    assert len(fused_calls) == len(report.fused) and set(fused_calls) == {backend}, (fused_calls, str(report))
    _assert_close(got, ref, out_tol, grad_tol)
    adapterkern.unpatch_adapters(model)
    return ref, got


# Every config on BERT; on the other models each placement once, the variants spread over them.
# (residual_before_ln="post_add" needs a model that hands the library its LayerNorm: BERT, RoBERTa.)
CASES = [("bert", c) for c in CONFIGS] + [
    ("roberta", "seq_bn-post_add-channel-gelu_new"),
    ("roberta", "double_seq_bn-ln_before_after-quick_gelu"),
    ("roberta", "par_bn-ln_before-channel-sigmoid"),
    ("roberta", "mam"),
    ("gpt2", "seq_bn-res_after_ln-learned-tanh"),
    ("gpt2", "double_seq_bn"),
    ("gpt2", "scaled_par_bn-gelu"),
    ("gpt2", "mam"),
    ("gpt2", "adapter_plus"),
    ("llama", "seq_bn-ln_before-ln_after-leakyrelu"),
    ("llama", "double_seq_bn-ln_before_after-quick_gelu"),
    ("llama", "par_bn"),
    ("llama", "mam"),
    ("llama", "adapter_plus"),
    ("t5", "seq_bn"),
    ("t5", "double_seq_bn"),
    ("t5", "scaled_par_bn-gelu"),
    ("t5", "mam"),
    ("t5", "adapter_plus"),
]


@pytest.mark.parametrize("arch,config", CASES, ids=[f"{a}-{c}" for a, c in CASES])
def test_patched_equals_library(arch, config, fused_calls):
    model = _setup(arch, CONFIGS[config]())
    for mode in ("eval", "train"):
        ref, _ = _check_equivalence(model, arch, mode, fused_calls)
    # The adapters matter (random weights): without them the output is far from the reference.
    model.set_active_adapters(None)
    plain = _run(model, _inputs(arch, torch.float32))
    assert rel_err(plain[0], ref[0]) > 1e-2


@pytest.mark.parametrize("config", ["seq_bn-ln_before-ln_after-leakyrelu", "double_seq_bn", "scaled_par_bn-gelu", "adapter_plus"])
def test_patched_equals_library_float64(config, fused_calls):
    model = _setup("bert", CONFIGS[config](), dtype=torch.float64)
    _check_equivalence(model, "bert", "train", fused_calls, out_tol=1e-12, grad_tol=1e-10, dtype=torch.float64)


TRITON = pytest.mark.skipif(not is_available("triton", torch.device("cpu")), reason="Triton (interpreter) not available on CPU")


@TRITON
@pytest.mark.parametrize(
    "arch,config",
    [("bert", "seq_bn-post_add-channel-gelu_new"), ("gpt2", "double_seq_bn"), ("llama", "scaled_par_bn-gelu"), ("t5", "mam")],
    ids=["sequential-bert", "double-gpt2", "parallel-llama", "mam-t5"],
)
def test_patched_equals_library_triton(arch, config, fused_calls):
    model = _setup(arch, CONFIGS[config]())
    for mode in ("eval", "train"):
        _check_equivalence(model, arch, mode, fused_calls, backend="triton")


# ------------------------------------------------------------------------------------------------
# Activations: the library's module decides (old-checkpoint renames included)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "saved,loaded",
    [("gelu", "gelu_new"), ("gelu_orig", "gelu")],  # adapters.utils.ACTIVATION_RENAME for configs without "version"
)
def test_old_checkpoint_activation_names(tmp_path, saved, loaded, fused_calls):
    src = _setup("bert", SeqBnConfig(reduction_factor=4, non_linearity="relu"))
    src.save_adapter(str(tmp_path), "a")
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["version"]  # an old (adapter-transformers v1/v2) checkpoint
    config["config"]["non_linearity"] = saved
    path.write_text(json.dumps(config))
    model = _model("bert")
    model.load_adapter(str(tmp_path), load_as="a", set_active=True)
    assert model.adapters_config.get("a")["non_linearity"] == loaded
    model.eval()
    inputs = _inputs("bert", torch.float32)
    ref = _run(model, inputs)
    report = _patch(model, backend="torch")
    assert all(f"activation={loaded}," in what for what in report.fused.values()), str(report)
    _assert_close(_run(model, inputs), ref, 1e-5, 1e-4)
    assert len(fused_calls) == 2


# ------------------------------------------------------------------------------------------------
# What keeps the library's path: one warning lists the modules and why; numbers are the library's
# ------------------------------------------------------------------------------------------------
def _patch_warning(model, **kwargs):
    with pytest.warns(ah.AdapterPatchWarning) as record:
        report = adapterkern.patch_adapters(model, **kwargs)
    assert len(record) == 1, [str(w.message) for w in record]
    return report, str(record[0].message)


def test_unfusable_configs_keep_library_path_with_one_warning(fused_calls):
    model = _model("bert")
    unfusable = {
        "phm": (CompacterConfig(reduction_factor=4, phm_dim=4), "PHM / Compacter"),
        "gated": (SeqBnConfig(reduction_factor=4, use_gating=True), "gating"),
        "ln_after_alone": (SeqBnConfig(reduction_factor=4, ln_after=True, adapter_residual_before_ln=False), "ln_after"),
        "par_ln_after": (ParBnConfig(reduction_factor=4, ln_after=True), "ln_after on a parallel adapter"),
        "mish": (SeqBnConfig(reduction_factor=4, non_linearity="mish"), "activation MishActivation has no fused kernel"),
    }
    for name, (config, _) in unfusable.items():
        model.add_adapter(name, config=config)
    model.add_adapter("ok", config=SeqBnConfig(reduction_factor=4))
    _randomize(model)
    model.train()
    inputs = _inputs("bert", torch.float32)
    refs = {}
    for name in [*unfusable, "ok"]:
        model.set_active_adapters(name)
        refs[name] = _run(model, inputs, output_adapter_gating_scores=name == "gated")
    refs["ok-scores"] = _run(model, inputs, output_adapter_gating_scores=True)  # the library reports ``up`` as the score

    report, message = _patch_warning(model, backend="torch")
    assert sorted(report.fused) == [f"encoder.layer.{i}.output.adapters.ok" for i in range(2)]
    for name, (_, why) in unfusable.items():
        modules = [m for m in report.library if m.endswith(f".adapters.{name}")]
        assert len(modules) == (4 if name == "phm" else 2), (name, report.library)  # compacter: attention + FFN
        for module in modules:
            assert why in report.library[module] and f"{module}: " in message
    assert ".adapters.ok" not in message

    for name in unfusable:  # the library's own code: bitwise the same numbers, no fused call
        model.set_active_adapters(name)
        fused_calls.clear()
        _assert_equal(_run(model, inputs, output_adapter_gating_scores=name == "gated"), refs[name])
        assert fused_calls == []
    model.set_active_adapters("ok")
    _assert_equal(_run(model, inputs, output_adapter_gating_scores=True), refs["ok-scores"])  # needs ``up``: library
    assert fused_calls == []
    _assert_close(_run(model, inputs), refs["ok"], 1e-5, 1e-4)
    assert len(fused_calls) == 2


def test_dropout_while_training_keeps_library_path(fused_calls):
    model = _setup("gpt2", SeqBnConfig(reduction_factor=4, dropout=0.3, scaling="channel"))
    inputs = _inputs("gpt2", torch.float32)
    model.train()
    ref_train = _run(model, inputs, seed=7)
    model.eval()
    ref_eval = _run(model, inputs)
    report, message = _patch_warning(model, backend="torch")
    assert len(report.fused) == 2 and not report.library
    assert report.library_in_training.keys() == report.fused.keys()
    assert "dropout p=0.3" in message and "while training" in message
    # Training: the library's path, the same dropout masks under the same seed.
    model.train()
    _assert_equal(_run(model, inputs, seed=7), ref_train)
    assert fused_calls == []
    # Eval: no dropout, fused.
    model.eval()
    _assert_close(_run(model, inputs), ref_eval, 1e-5, 1e-4)
    assert len(fused_calls) == 2


def test_unrecognised_drop_path_keeps_library_path():
    model = _setup("bert", AdapterPlusConfig(reduction_factor=4, stochastic_depth=0.0))
    adapter = model.encoder.layer[0].output.adapters["a"]
    adapter.DropPath = torch.nn.Identity()  # not torchvision's StochasticDepth: its semantics are unknown
    report, message = _patch_warning(model, backend="torch")
    assert "unrecognised DropPath module Identity" in report.library["encoder.layer.0.output.adapters.a"]
    assert list(report.fused) == ["encoder.layer.1.output.adapters.a"]


@pytest.mark.skipif(not transformers.utils.is_torchvision_available(), reason="AdapterPlus stochastic depth needs torchvision")
def test_stochastic_depth_fused_in_eval_library_in_training(fused_calls):
    model = _setup("bert", AdapterPlusConfig(reduction_factor=4))  # stochastic_depth=0.1
    inputs = _inputs("bert", torch.float32)
    model.train()
    ref_train = _run(model, inputs, seed=3)
    model.eval()
    ref_eval = _run(model, inputs)
    report, message = _patch_warning(model, backend="torch")
    assert "stochastic depth p=0.1" in message
    model.train()
    _assert_equal(_run(model, inputs, seed=3), ref_train)
    assert fused_calls == []
    model.eval()
    _assert_close(_run(model, inputs), ref_eval, 1e-5, 1e-4)
    assert len(fused_calls) == 2


def test_runtime_library_path_under_autocast(fused_calls):
    model = _setup("llama", SeqBnConfig(reduction_factor=4)).eval()
    inputs = _inputs("llama", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _run(model, inputs)
        _patch(model, backend="torch")
        got = _run(model, inputs)
    _assert_equal(got, ref)
    assert fused_calls == []


# ------------------------------------------------------------------------------------------------
# Compositions
# ------------------------------------------------------------------------------------------------
def test_compositions(fused_calls):
    """Stack of sequential adapters runs fused adapter by adapter, and so does a Stack of two parallel
    adapters (the library runs both: the second reads the sublayer input again); BatchSplit and Fuse of
    adapters that differ in activation keep the library's loop (warned once; each adapter of the
    BatchSplit still fused on its own, Fuse reads each adapter's ``up``: the library's forward).
    (Compatible blocks in one launch: test_integrations_adapterhub_compose.py.)"""
    model = _model("bert")
    model.add_adapter("a", config=SeqBnConfig(reduction_factor=4))
    model.add_adapter("b", config=SeqBnConfig(reduction_factor=4, non_linearity="gelu", scaling="learned"))
    model.add_adapter("p", config=ParBnConfig(reduction_factor=4))
    model.add_adapter("q", config=ParBnConfig(reduction_factor=4, scaling="learned"))
    model.add_adapter_fusion(Fuse("a", "b"))
    _randomize(model)
    model.eval()
    inputs = _inputs("bert", torch.float32)
    setups = {
        "stack": (Stack("a", "b"), 4),
        "batch_split": (BatchSplit("a", "b", batch_sizes=[1, 1]), 4),
        "fuse": (Fuse("a", "b"), 0),
        "stack_parallel": (Stack("p", "q"), 4),
        "single_parallel": (Stack("p"), 2),
    }
    refs = {}
    for key, (setup, _) in setups.items():
        model.set_active_adapters(setup)
        refs[key] = _run(model, inputs)
    _patch(model, backend="torch")
    for key, (setup, calls) in setups.items():
        model.set_active_adapters(setup)
        fused_calls.clear()
        if key in ("batch_split", "fuse"):
            with pytest.warns(ah.AdapterPatchWarning, match=r"keeps the adapters library's loop .* differ in activation \(a: relu, b: gelu\)"):
                got = _run(model, inputs)
        else:
            got = _run(model, inputs)
        assert len(fused_calls) == calls, key
        if calls:
            _assert_close(got, refs[key], 1e-5, 1e-4)
        else:
            _assert_equal(got, refs[key])
    # An AdapterSetup context overrides the model's setup: Fuse there is seen too.
    model.set_active_adapters("a")
    fused_calls.clear()
    with adapters.AdapterSetup(Fuse("a", "b")):
        _assert_equal(_run(model, inputs), refs["fuse"])
    assert fused_calls == []


# ------------------------------------------------------------------------------------------------
# Patch / unpatch mechanics
# ------------------------------------------------------------------------------------------------
PATCHED_ATTRS = ah.PATCHED_ATTRS  # forwards, composition functions, the add / delete hooks


def _patched_modules(model):
    return {name for name, m in model.named_modules() if any(ah.is_patch_function(vars(m).get(attr)) for attr in PATCHED_ATTRS)}


def test_unpatch_restores_library_and_patch_is_idempotent(fused_calls):
    model = _model("t5")
    model.add_adapter("a", config=DoubleSeqBnConfig(reduction_factor=4))
    model.add_adapter("p", config=ParBnConfig(reduction_factor=4))
    model.set_active_adapters("a")
    _randomize(model)
    model.eval()
    inputs = _inputs("t5", torch.float32)
    ref = _run(model, inputs)
    before = {name: dict(vars(m)) for name, m in model.named_modules()}

    first = _patch(model, backend="torch")
    patched = _patched_modules(model)
    second = _patch(model, backend="torch")
    assert second == first and _patched_modules(model) == patched
    for name, m in model.named_modules():  # each patched attribute is bound to its own module, not a wrapper of a wrapper
        for attr in PATCHED_ATTRS:
            f = vars(m).get(attr)
            if ah.is_patch_function(f):
                assert f.__self__ is m
    fused_calls.clear()
    _assert_close(_run(model, inputs), ref, 1e-5, 1e-4)
    assert len(fused_calls) == 8  # double_seq_bn: self-attention and FFN of 2 encoder + 2 decoder blocks
    touched = patched | {name for name, m in model.named_modules() if any(k.startswith("_adapterkern") for k in vars(m))}
    # + the 10 BottleneckLayers (add / delete hooks; the 8 holding a fused adapter: composition functions
    # too) + the encoder holding the invertible adapters (its add / delete hooks).
    assert len(touched) == len(first.fused) + 10 + 1
    assert adapterkern.unpatch_adapters(model) == len(touched)
    assert _patched_modules(model) == set()
    after = {name: dict(vars(m)) for name, m in model.named_modules()}
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].keys() == before[name].keys(), name
    fused_calls.clear()
    _assert_equal(_run(model, inputs), ref)
    assert fused_calls == []
    assert adapterkern.unpatch_adapters(model) == 0


def test_deepcopy_of_patched_model(fused_calls):
    model = _setup("bert", ParBnConfig(reduction_factor=4, scaling="channel")).eval()
    inputs = _inputs("bert", torch.float32)
    ref = _run(model, inputs)
    _patch(model, backend="torch")
    clone = copy.deepcopy(model)
    for name, m in clone.named_modules():
        f = vars(m).get("bottleneck_layer_forward")
        if f is not None:
            assert f.__self__ is m  # bound to the copy, not to the original
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the copy must not read the original's weights
    _assert_close(_run(clone, inputs), ref, 1e-5, 1e-4)
    assert len(fused_calls) == 2


def test_model_without_adapters():
    model = _model("gpt2")
    with pytest.warns(ah.AdapterPatchWarning, match="no bottleneck adapter modules"):
        report = adapterkern.patch_adapters(model)
    assert report.fused == {} and report.library == {} and "no bottleneck adapter" in str(report)
    with pytest.warns(ah.AdapterPatchWarning, match="no bottleneck adapter modules"):
        assert not adapterkern.patch_adapters(torch.nn.Linear(4, 4)).fused
    # Nothing fused, but hooked for adapters added later: the 4 BottleneckLayers and the model (invertible adapters).
    assert adapterkern.unpatch_adapters(model) == 4 + 1
    assert adapterkern.unpatch_adapters(model) == 0


def test_bad_arguments():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        adapterkern.patch_adapters("bert")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        adapterkern.unpatch_adapters(None)
    with pytest.raises(ValueError, match="backend.*'tpu'"):
        adapterkern.patch_adapters(torch.nn.Linear(4, 4), backend="tpu")
    with pytest.raises(TypeError, match="backend"):
        adapterkern.patch_adapters(torch.nn.Linear(4, 4), backend=None)
