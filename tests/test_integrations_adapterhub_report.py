"""patch_adapters says exactly what runs (adapterkern.integrations.adapterhub, adapterhub_report).

Each fused call the integration makes is attributed to the adapter modules whose weights it gets (a
batched / multi-adapter call: the modules stacked for it), and for each configuration the calls of a
forward pass must be exactly those the report implies: one ``bottleneck_adapter`` call per visit of a
module it lists as fused (none while training for one it lists as taking the library's path then),
one launch per fused composition block, none for what it lists on the library's path; the one
warning lists every library entry. Adapters the library adds, loads, averages or deletes after
patching are patched and reported as it does so; invertible adapters' coupling blocks are reported;
patched modules pickle. Numbers are always the library's (outputs and gradients). Tiny random-weight
models of test_integrations_adapterhub.py; run by ``make test-adapterhub`` (its own venv), elsewhere
the module skips, unless ADAPTERKERN_REQUIRE_ADAPTERS=1.
"""
import copy
import os
import pickle
import re
import warnings
from collections import Counter
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from conftest import import_adapters  # noqa: E402

adapters = import_adapters()

import torch  # noqa: E402
from adapters import SeqBnConfig  # noqa: E402
from adapters.composition import Average, BatchSplit, Fuse, Parallel, Split, Stack  # noqa: E402
from adapters.methods.bottleneck import BottleneckLayer, BottleneckState  # noqa: E402
from adapters.methods.modeling import Adapter, GLOWCouplingBlock, NICECouplingBlock  # noqa: E402

import adapterkern  # noqa: E402
from adapterkern.integrations import adapterhub as ah  # noqa: E402
from adapterkern.integrations import adapterhub_compose, adapterhub_plans  # noqa: E402
from adapterkern.integrations.adapterhub_compose import _FUSE_LOOP as FUSE_LOOP  # noqa: E402
from conftest import assert_runs_close  # noqa: E402
from test_integrations_adapterhub import _model  # noqa: E402
from test_integrations_adapterhub_compose import (  # noqa: E402,F401  (calls: a fixture)
    D, PAR, SEQ, _assert_close, _compare, _expect, _inputs, _patch, _randomize, _run, _setup, calls,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Adapters of every kind the report distinguishes, on one tiny BERT (output adapters: 2 layers).
ADAPTERS = {
    **SEQ, **PAR,
    "g": lambda: SeqBnConfig(reduction_factor=4, non_linearity="gelu"),  # differs from a in activation
    "gated": lambda: SeqBnConfig(reduction_factor=4, use_gating=True),  # the library's path
    "drop": lambda: SeqBnConfig(reduction_factor=4, dropout=0.3),  # the library's path while training
}
FUSIONS = [(Fuse("a", "b"), "dynamic"), (Fuse("a", "g"), "dynamic"), (Fuse("drop", "b"), "dynamic")]


@pytest.fixture
def made(monkeypatch):
    """The integration's fused calls, each as (op, qualified names of the adapter modules whose weights
    it got); ``track(model)`` names the model's modules first."""
    made_calls, owners = [], {}
    real_stack = adapterhub_compose.stack_weights

    def stack(downs, ups, scalings):
        stacked = real_stack(downs, ups, scalings)
        owners[id(stacked[0])] = frozenset(name for down in downs for name in owners[id(down.weight)])
        return stacked

    monkeypatch.setattr(adapterhub_compose, "stack_weights", stack)
    for module, op, w_down_at in ((adapterhub_plans, "bottleneck_adapter", 1),
                                  (adapterhub_compose, "bottleneck_adapter_batched", 2),
                                  (adapterhub_compose, "multi_adapter", 1)):
        real = getattr(module, op)

        def counting(*args, _real=real, _op=op, _at=w_down_at, **kwargs):
            made_calls.append((_op, owners[id(args[_at])]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, op, counting)

    def track(model):
        for name, m in model.named_modules():
            if isinstance(m, Adapter):
                owners[id(m.adapter_down[-2].weight)] = frozenset([name])

    return SimpleNamespace(calls=made_calls, track=track)


def implied_calls(model, report, training: bool) -> Counter:
    """The fused calls of one forward pass as the report states them, (op, modules) -> count."""
    implied = Counter()
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, BottleneckLayer) or layer.get_active_setup() is None:
            continue

        def visit(block):
            if isinstance(block, str):
                name = f"{layer_name}.adapters.{block}"
                if name in report.fused and not (training and name in report.library_in_training):
                    implied["bottleneck_adapter", frozenset([name])] += 1
                return
            key = f"{layer_name}: {block!r}"
            how = report.compositions.get(key)
            if how is not None and not (training and "while training, the library's loop" in how):
                op = "multi_adapter" if "multi_adapter launch" in how else "bottleneck_adapter_batched"
                implied[op, frozenset(f"{layer_name}.adapters.{c}" for c in block.children if c in layer.adapters)] += 1
            elif FUSE_LOOP not in (how or report.compositions_library.get(key, "")):  # the library's loop: each child
                for child in block.children:
                    visit(child)

        visit(layer.get_active_setup())
    return implied


def _patch_checking_warning(model, backend="torch"):
    """patch_adapters; its one warning (if any) lists every library entry of the report, none else."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = adapterkern.patch_adapters(model, backend=backend)
    record = [w for w in record if issubclass(w.category, ah.AdapterPatchWarning)]
    listed = {**report.library, **report.library_in_training, **report.compositions_library}
    assert len(record) == (1 if listed else 0), [str(w.message) for w in record]
    for key, why in listed.items():
        assert f"{key}: {why}" in str(record[0].message)
    return report


# setup: fused calls per forward in eval and in train mode (2 layers, one output adapter place each)
CASES = {
    "seq_bn": ("a", 2, 2),
    "par_bn": ("p", 2, 2),
    "stack-par-par": (Stack("p", "q"), 4, 4),
    "stack-seq-par": (Stack("a", "p"), 4, 4),
    "stack-par-seq": (Stack("p", "a"), 4, 4),
    "batch_split": (BatchSplit("a", "b", batch_sizes=[1, 2]), 2, 2),
    "batch_split-parallel-adapters": (BatchSplit("q", "p", batch_sizes=[2, 1]), 2, 2),
    "stack-seq-batch_split": (Stack("c", BatchSplit("b", "a", batch_sizes=[1, 2])), 4, 4),
    "parallel": (Parallel("a", "b"), 2, 2),
    "fuse": (Fuse("a", "b"), 2, 2),
    "average": (Average("a", "b", weights=[1.0, 3.0]), 2, 2),
    "average-parallel-adapters": (Average("p", "q"), 2, 2),
    # The library's loop, each fused adapter on its own; Fuse reads each adapter's up: none.
    "batch_split-differ": (BatchSplit("a", "g", batch_sizes=[1, 2]), 4, 4),
    "fuse-differ": (Fuse("a", "g"), 0, 0),
    "split": (Split("a", "b", splits=[2, 3]), 4, 4),
    # The library's path, always or while training.
    "gated": ("gated", 0, 0),
    "dropout": ("drop", 2, 0),
    "batch_split-dropout": (BatchSplit("drop", "b", batch_sizes=[1, 2]), 2, 2),  # train: b alone
    "average-dropout": (Average("b", "drop"), 2, 2),  # train: b alone
    "fuse-dropout": (Fuse("drop", "b"), 2, 0),  # train: the library's Fuse, which reads their up
}


@pytest.mark.parametrize("case", CASES)
def test_report_matches_calls(case, made):
    setup, n_eval, n_train = CASES[case]
    model = _setup("bert", ADAPTERS, fusions=FUSIONS)
    model.set_active_adapters(setup)
    made.track(model)
    inputs = _inputs()
    refs = {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        refs[mode] = _run(model, inputs)
    report = _patch_checking_warning(model)
    for mode, n in (("eval", n_eval), ("train", n_train)):
        model.train(mode == "train")
        made.calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ah.AdapterPatchWarning)  # the active setup: said at patch time
            got = _run(model, inputs)
        assert Counter(made.calls) == implied_calls(model, report, mode == "train"), (mode, made.calls, str(report))
        assert len(made.calls) == n, (mode, made.calls)
        assert_runs_close(got, refs[mode], 1e-5, 3e-4)


def test_stack_of_parallel_adapters_on_triton(made):
    """The parallel adapter's own forward (a stride-0 zero residual) on the Triton backend."""
    from adapterkern.backends import is_available

    if not is_available("triton", torch.device("cpu")):
        pytest.skip("Triton (interpreter) not available on CPU")
    model = _setup("bert", PAR)
    made.track(model)
    model.set_active_adapters(Stack("p", "q"))
    inputs = _inputs(batch=2, seq=3)
    model.train()
    ref = _run(model, inputs)
    report = _patch_checking_warning(model, backend="triton")
    made.calls.clear()
    got = _run(model, inputs)
    assert Counter(made.calls) == implied_calls(model, report, True) and len(made.calls) == 4
    assert_runs_close(got, ref, 1e-5, 3e-4)


# ------------------------------------------------------------------------------------------------
# Adapters the library adds, loads, averages or deletes after patching
# ------------------------------------------------------------------------------------------------
def _library_copy(model):
    """The unpatched model with the same weights."""
    ref = copy.deepcopy(model)
    adapterkern.unpatch_adapters(ref)
    return ref


def _check_setups(model, report, setups, made):
    """Each (setup, fused calls per forward) in train mode against the library; a setup of plain
    adapters (the report's compositions are the patch-time setup's) makes the calls the report implies."""
    ref_model = _library_copy(model)
    made.track(model)
    inputs = _inputs()
    for setup, n in setups:
        for m in (model, ref_model):
            m.set_active_adapters(setup)
            m.train()
        ref = _run(ref_model, inputs)
        made.calls.clear()
        got = _run(model, inputs)
        assert len(made.calls) == n, (setup, made.calls)
        if isinstance(setup, (str, Stack)):
            assert Counter(made.calls) == implied_calls(model, report, True), (setup, made.calls)
        assert_runs_close(got, ref, 1e-5, 3e-4)


def test_adapters_added_after_patching_are_patched_and_reported(tmp_path, made):
    saved = _setup("bert", {"l": SEQ["c"]})
    saved.save_adapter(str(tmp_path), "l")
    model = _setup("bert", {"a": SEQ["a"]})
    model.set_active_adapters("a")
    report = _patch(model, "torch")
    before = dict(report.fused)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ah.AdapterPatchWarning)  # all fusable: nothing to say
        model.add_adapter("a2", config=SEQ["a"]())
        model.add_adapter("n", config=PAR["q"]())
        model.load_adapter(str(tmp_path), load_as="l")
        model.average_adapter("avg", ["a", "a2"], weights=[1.0, 3.0])
    # The library's averaged weights (loaded after the new module was patched).
    adapters_0 = model.encoder.layer[0].output.adapters
    average = 0.25 * adapters_0["a"].adapter_up.weight + 0.75 * adapters_0["a2"].adapter_up.weight
    assert torch.allclose(adapters_0["avg"].adapter_up.weight, average)
    _randomize(model)
    with pytest.warns(ah.AdapterPatchWarning) as record:  # one warning for the adapter, not one per module
        model.add_adapter("gated", config=ADAPTERS["gated"]())
        model.add_adapter("drop", config=ADAPTERS["drop"]())
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2, messages
    assert "adapter 'drop', added after patching, takes the library's path while training" in messages[0]
    assert "adapter 'gated', added after patching, keeps the adapters library's path" in messages[1] and "gating" in messages[1]

    layers = [f"encoder.layer.{i}.output.adapters." for i in (0, 1)]
    assert report.fused.keys() == {p + n for p in layers for n in ("a", "a2", "n", "l", "avg", "drop")}
    assert all(report.fused[k] == v for k, v in before.items())
    assert report.library.keys() == {p + "gated" for p in layers}
    assert report.library_in_training.keys() == {p + "drop" for p in layers}
    setups = [("n", 2), ("l", 2), ("avg", 2), (Stack("avg", "n"), 4), ("drop", 0),
              (BatchSplit("l", "avg", "a", batch_sizes=[1, 1, 1]), 2)]  # one batched launch per layer
    _check_setups(model, report, setups, made)

    model.delete_adapter("n")
    assert not any(k.endswith(".n") for k in report.fused)
    fresh = _patch_checking_warning(model)  # patching again: a fresh report of the same modules
    assert fresh.fused == report.fused and fresh.library == report.library
    assert fresh.library_in_training == report.library_in_training


def test_model_patched_before_its_adapters(made):
    model = _model("gpt2")
    with pytest.warns(ah.AdapterPatchWarning, match="patched as they are added"):
        report = adapterkern.patch_adapters(model, backend="torch")
    model.add_adapter("p", config=PAR["p"]())
    model.add_adapter("h", config="double_seq_bn")
    _randomize(model)
    assert len(report.fused) == 2 + 4
    _check_setups(model, report, [("p", 2), ("h", 4), (Stack("h", "p"), 6)], made)


# ------------------------------------------------------------------------------------------------
# Invertible adapters: the library's coupling blocks, reported
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,where", [("bert", "invertible_adapters"), ("t5", "encoder.invertible_adapters")])
def test_invertible_adapters_reported(arch, where, made):
    model = _model(arch)
    model.add_adapter("i", config="seq_bn_inv")
    model.add_adapter("h", config="double_seq_bn_inv")
    _randomize(model)
    model.set_active_adapters("i")
    report = _patch_checking_warning(model)
    assert {f"{where}.i", f"{where}.h"} <= report.library.keys()
    assert "invertible adapter (NICECouplingBlock)" in report.library[f"{where}.i"]
    added = r"adapter 'j', added after patching, keeps .*invertible adapter \(GLOWCouplingBlock\)"
    with pytest.warns(ah.AdapterPatchWarning, match=added):
        model.add_adapter("j", config=SeqBnConfig(reduction_factor=4, inv_adapter="glow", inv_adapter_reduction_factor=2))
    # Every adapter module of the model is in the report, once.
    modules = {n for n, m in model.named_modules() if isinstance(m, (Adapter, NICECouplingBlock, GLOWCouplingBlock))}
    assert modules == report.fused.keys() | report.library.keys() and not report.fused.keys() & report.library.keys()
    assert all(".invertible_adapters." in f".{n}" for n in report.library)
    model.delete_adapter("j")
    assert f"{where}.j" not in report.library
    if arch == "bert":  # a single active adapter with an invertible one: the coupling block is the library's
        ref = _library_copy(model)
        made.track(model)
        model.train()
        ref.train()
        inputs = _inputs()
        expected = _run(ref, inputs)
        made.calls.clear()
        assert_runs_close(_run(model, inputs), expected, 1e-5, 3e-4)
        assert Counter(made.calls) == implied_calls(model, report, True) and len(made.calls) == 2


def test_patching_is_all_or_nothing(monkeypatch):
    """A failure while patching (here: classifying the third module) leaves every module as it was."""
    model = _setup("bert", {"a": SEQ["a"], "p": PAR["p"]})
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    real, seen = ah.classify, []

    def failing(*args):
        seen.append(args[0])
        if len(seen) == 3:
            raise RuntimeError("classify failed")
        return real(*args)

    monkeypatch.setattr(ah, "classify", failing)
    with pytest.raises(RuntimeError, match="classify failed"):
        adapterkern.patch_adapters(model, backend="torch")
    assert {name: dict(vars(m)) for name, m in model.named_modules()} == before


# ------------------------------------------------------------------------------------------------
# Patched modules pickle (and deep-copy), and run after unpickling
# ------------------------------------------------------------------------------------------------
def test_patched_modules_pickle(made):
    model = _setup("bert", {"a": SEQ["a"], "b": SEQ["b"], "p": PAR["p"], "q": PAR["q"]}).eval()
    model.set_active_adapters("p")
    layer = model.encoder.layer[0].output
    torch.manual_seed(0)
    x, h = torch.randn(2, 5, D), torch.randn(2, 5, D)

    def runs(layer):
        with torch.no_grad():
            return [
                layer.adapters["a"](x, residual_input=h)[0],
                layer.adapters["p"](x, residual_input=x)[0],
                layer.compose_average(Average("a", "b", weights=[1.0, 2.0]), BottleneckState(x, x, x, None), 0).hidden_states,
                layer.bottleneck_layer_forward(h, x, layer.LayerNorm if hasattr(layer, "LayerNorm") else None),
            ]

    ref = runs(layer)
    _patch(model, "torch")
    made.track(model)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        for m in [clone, *clone.adapters.values()]:
            for attr in ah.PATCHED_ATTRS:
                f = vars(m).get(attr)
                assert f is None or (ah.is_patch_function(f) and f.__self__ is m), (attr, f)
        made.track(clone)
        made.calls.clear()
        got = runs(clone)
        assert [op for op, _ in made.calls] == ["bottleneck_adapter", "bottleneck_adapter", "multi_adapter", "bottleneck_adapter"]
        for g, r in zip(got, ref):
            assert torch.allclose(g, r, atol=1e-5), (g - r).abs().max()
    adapter = pickle.loads(pickle.dumps(layer.adapters["a"]))  # a module alone
    made.track(adapter)
    made.calls.clear()
    with torch.no_grad():
        assert torch.allclose(adapter(x, residual_input=h)[0], ref[0], atol=1e-5)
    assert len(made.calls) == 1


# ------------------------------------------------------------------------------------------------
# What keeps the library's loop: said at patch time (active setup) or once at run time
# ------------------------------------------------------------------------------------------------
def test_incompatible_blocks_keep_library_loop(calls):
    configs = {
        **SEQ,
        "r8": lambda: SeqBnConfig(reduction_factor=2),
        "gelu": lambda: SeqBnConfig(reduction_factor=4, non_linearity="gelu"),
        "lnb": lambda: SeqBnConfig(reduction_factor=4, ln_before=True),
        "gated": lambda: SeqBnConfig(reduction_factor=4, use_gating=True),
        **PAR,
    }
    model = _setup("bert", configs)
    model.eval()
    inputs = _inputs(batch=2)
    cases = {  # setup: (reason, fused single-adapter calls per forward on the library's loop)
        "size": (BatchSplit("a", "r8", batch_sizes=[1, 1]), r"differ in bottleneck size \(a: 8, r8: 16\)", 4),
        "activation": (Parallel("a", "gelu"), r"differ in activation \(a: relu, gelu: gelu\)", 4),
        "ln_before": (BatchSplit("a", "lnb", batch_sizes=[1, 1]), r"'lnb' has ln_before", 4),
        "unfused": (BatchSplit("gated", "a", batch_sizes=[1, 1]), r"'gated' keeps the library's path \(gating", 2),
        "kinds": (BatchSplit("a", "p", batch_sizes=[1, 1]), r"differ in kind", 4),
        "nested": (BatchSplit(Stack("a", "b"), "c", batch_sizes=[1, 1]), r"nested Stack block", 6),
        "average-nested": (Average(Stack("a", "b"), "c"), r"Average with a nested Stack block", 6),
        "average-kinds": (Average("a", "p"), r"differ in kind", 4),
        "split": (Split("a", "b", splits=[2, 3]), r"Split .* is not fused", 4),
    }
    refs = {}
    for key, (setup, _, _) in cases.items():
        model.set_active_adapters(setup)
        refs[key] = _run(model, inputs)
    # The active setup at patch time is in the report and the one warning.
    model.set_active_adapters(cases["size"][0])
    with pytest.warns(ah.AdapterPatchWarning) as record:
        report = adapterkern.patch_adapters(model, backend="torch")
    assert len(record) == 1
    message = str(record[0].message)
    assert "encoder.layer.0.output: BatchSplit[a, r8]" in message and "bottleneck size" in message
    assert set(report.compositions_library) == {f"encoder.layer.{i}.output: BatchSplit[a, r8]" for i in (0, 1)}
    assert not report.compositions
    for key, (setup, reason, n) in cases.items():
        model.set_active_adapters(setup)
        calls.clear()
        if key == "size":  # warned at patch time already
            with warnings.catch_warnings():
                warnings.simplefilter("error", ah.AdapterPatchWarning)
                got = _run(model, inputs)
        else:  # warned once (per layer), at its first call
            with pytest.warns(ah.AdapterPatchWarning, match=reason):
                got = _run(model, inputs)
        assert dict(calls) == {("bottleneck_adapter", "torch"): n}, (key, dict(calls))
        _assert_close(got, refs[key])
        with warnings.catch_warnings():
            warnings.simplefilter("error", ah.AdapterPatchWarning)
            _run(model, inputs)


def test_backend_without_the_blocks_op_keeps_library_loop(calls):
    """The op a block needs (BatchSplit / Parallel: bottleneck_adapter_batched; Fuse / Average:
    multi_adapter) decides: a backend without it (the CUDA extension has the single-adapter op only)
    keeps the library's loop, and the report and the warning name the backend and the op; ``auto``
    falls back per op, and what its report lists as fused runs fused."""
    model = _setup("bert", SEQ, fusions=[(Fuse("a", "c"), "dynamic")])
    cases = ((BatchSplit("a", "b", batch_sizes=[1, 2]), "bottleneck_adapter_batched"),
             (Parallel("a", "b"), "bottleneck_adapter_batched"), (Fuse("a", "c"), "multi_adapter"),
             (Average("a", "b"), "multi_adapter"))
    for setup, op in cases:
        model.set_active_adapters(setup)
        why = f"backend='cuda' has no {op} kernel" + (f"; {FUSE_LOOP}" if isinstance(setup, Fuse) else "")
        with pytest.warns(ah.AdapterPatchWarning, match=re.escape(why)):
            report = adapterkern.patch_adapters(model, backend="cuda")  # no CUDA needed to patch
        assert len(report.fused) == 8 and not report.compositions, str(report)
        assert report.compositions_library == {f"encoder.layer.{i}.output: {setup!r}": why for i in (0, 1)}
        adapterkern.unpatch_adapters(model)
        _compare(model, setup, _expect(calls, **{op: 2}), backend="auto", modes=("eval",))
