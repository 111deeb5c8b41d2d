"""patch_adapters on the ``adapters`` library's composition blocks (adapterkern.integrations.adapterhub_compose)
and AdapterDrop's skip_layers.

BatchSplit / MultiTask / Parallel run in one ``bottleneck_adapter_batched`` launch per layer and place,
Fuse's N up-projections in one ``multi_adapter`` launch before the library's fusion layer. On tiny
random-weight BERT, GPT-2 and Llama models with random (non-identity) adapter and fusion weights, the
patched model's output and the gradients of the input embeddings and of every parameter must equal
the unpatched model's, in eval and train mode (adapter dropout 0; the base model's dropout draws the
same masks under the same seed), and the calls into the fused ops are counted (a silent fallback to
the library's loop fails). Blocks that cannot run in one launch keep the library's loop and say so
(test_integrations_adapterhub_report.py).
Run by ``make test-adapterhub`` (its own venv); elsewhere the module skips, unless
ADAPTERKERN_REQUIRE_ADAPTERS=1.
"""
import copy
import os
import warnings
from collections import Counter

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from conftest import import_adapters  # noqa: E402

adapters = import_adapters()

import torch  # noqa: E402
import transformers  # noqa: E402
from adapters import AdapterFusionConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig  # noqa: E402
from adapters.composition import Average, BatchSplit, Fuse, MultiTask, Parallel, Stack  # noqa: E402
from adapters.methods.bottleneck import BottleneckLayer, BottleneckState  # noqa: E402
from adapters.methods.modeling import BertFusion  # noqa: E402

import adapterkern  # noqa: E402
from adapterkern.backends import is_available  # noqa: E402
from adapterkern.integrations import adapterhub as ah  # noqa: E402
from adapterkern.integrations import adapterhub_compose, adapterhub_plans  # noqa: E402
from conftest import assert_runs_close, assert_runs_equal, rel_err  # noqa: E402
from test_integrations_adapterhub import _model  # noqa: E402  (the same tiny BERT / GPT-2 / Llama)

D = 32  # hidden size (test_integrations_adapterhub._model's)
B = 3  # batch
TRITON = pytest.mark.skipif(not is_available("triton", torch.device("cpu")), reason="Triton (interpreter) not available on CPU")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def calls(monkeypatch):
    """Counts the integration's calls into each fused op: Counter of (op, backend)."""
    counter = Counter()
    for module, op in (
        (adapterhub_plans, "bottleneck_adapter"),
        (adapterhub_compose, "bottleneck_adapter_batched"),
        (adapterhub_compose, "multi_adapter"),
    ):
        real = getattr(module, op)

        def counting(*args, _real=real, _op=op, **kwargs):
            counter[(_op, kwargs["backend"])] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, op, counting)
    return counter


def _randomize(model):
    """Random, non-identity adapter and fusion weights (the library inits some to zero / identity)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                if name.endswith("scaling"):
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.4)
            elif "adapter_fusion_layer" in name:
                p.normal_(0.0, 0.2)


# Sequential adapters that agree on bottleneck size (D // 4), activation and bias layout, with every
# kind of scaling: different floats, learned (1,), per channel (d,).
SEQ = {
    "a": lambda: SeqBnConfig(reduction_factor=4, scaling=0.5),
    "b": lambda: SeqBnConfig(reduction_factor=4, scaling="learned"),
    "c": lambda: SeqBnConfig(reduction_factor=4, scaling="channel"),
    "d": lambda: SeqBnConfig(reduction_factor=4, scaling=2.0),
}
PAR = {
    "p": lambda: ParBnConfig(reduction_factor=4),  # scaling 4.0
    "q": lambda: ParBnConfig(reduction_factor=4, scaling="channel"),
}


def _setup(arch, configs, fusions=(), dtype=torch.float32):
    model = _model(arch)
    for name, config in configs.items():
        model.add_adapter(name, config=config())
    for fuse, config in fusions:
        model.add_adapter_fusion(fuse, config)
    _randomize(model)
    return model.to(dtype)


def _reset_fusion_temperature(model):
    for m in model.modules():  # BertFusion anneals T on every call: the same T in every run
        if isinstance(m, BertFusion):
            m.T = 50.0 if m.config["temperature"] else 1.0


def _run(model, inputs, seed=1234, **kwargs):
    """Output and gradients (inputs and every parameter) of a fixed random projection of the output."""
    _reset_fusion_temperature(model)
    torch.manual_seed(seed)
    out = model(**inputs, **kwargs).last_hidden_state
    proj = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    named = list(inputs.items()) + [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * proj).sum(), [t for _, t in named], allow_unused=True)
    return out.detach(), {n: g for (n, _), g in zip(named, grads)}


def _inputs(dtype=torch.float32, batch=B, seq=5):
    return {"inputs_embeds": torch.randn(batch, seq, D, dtype=dtype, requires_grad=True)}


def _assert_close(got, ref, out_tol=1e-5, grad_tol=3e-4):
    assert_runs_close(got, ref, out_tol, grad_tol)


_assert_equal = assert_runs_equal


def _adapter_grads_matter(ref, names):
    """The adapters' parameters get non-zero gradients (the comparison covers them)."""
    _, grads = ref
    for name in names:
        gs = [g for k, g in grads.items() if f".adapters.{name}." in k and g is not None]
        assert gs and all(g.abs().max() > 0 for g in gs), name


def _patch(model, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ah.AdapterPatchWarning)
        return adapterkern.patch_adapters(model, backend=backend)


def _compare(model, setup, expected, backend="torch", modes=("eval", "train"), inputs=None, tol=(1e-5, 3e-4), **kwargs):
    """Library vs patched for ``setup`` in each mode; ``expected`` the Counter of fused calls per forward."""
    model.set_active_adapters(setup)
    inputs = inputs or _inputs()
    refs = {}
    for mode in modes:
        model.train(mode == "train")
        refs[mode] = _run(model, inputs, **kwargs)
    calls = expected.pop("_counter")
    report = _patch(model, backend)
    assert report.compositions and not report.compositions_library, str(report)
    for mode in modes:
        model.train(mode == "train")
        calls.clear()
        got = _run(model, inputs, **kwargs)
        assert dict(calls) == {(op, backend): n for op, n in expected.items()}, (mode, dict(calls))
        _assert_close(got, refs[mode], *tol)
    adapterkern.unpatch_adapters(model)
    return refs, report


def _expect(calls, **ops):
    return dict(ops, _counter=calls)


# ------------------------------------------------------------------------------------------------
# BatchSplit (and MultiTask, which the library runs as a BatchSplit)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_batch_split_sequential(arch, calls):
    model = _setup(arch, SEQ)
    # Four adapters, one with no rows; "c" appears twice (two slices through one adapter).
    setup = BatchSplit("a", "b", "c", "d", "c", batch_sizes=[1, 0, 1, 2, 1])
    refs, report = _compare(model, setup, _expect(calls, bottleneck_adapter_batched=2), inputs=_inputs(batch=5))
    assert all("bottleneck_adapter_batched" in what for what in report.compositions.values())
    _adapter_grads_matter(refs["train"], "acd")


def test_batch_split_parallel_adapters(calls):
    model = _setup("gpt2", PAR)
    refs, _ = _compare(model, BatchSplit("q", "p", batch_sizes=[2, 1]), _expect(calls, bottleneck_adapter_batched=2))
    _adapter_grads_matter(refs["train"], "pq")


_LIBRARY_CONCAT = BottleneckLayer.pad_and_concat


def _concat_without_up(self, states):
    """BottleneckLayer.pad_and_concat, except that children without ``up`` give none (the library's
    own fails on the slice it passes on for an adapter missing in the layer: it has no ``up``)."""
    return _LIBRARY_CONCAT(self, [s._replace(bottleneck_up=None) for s in states])


def test_adapter_missing_in_a_layer(calls, monkeypatch):
    """An adapter left out of a layer: the library passes its slice on unchanged there (index -1).
    (Not as the first or last child: the library then fails in pre_block / on ``last``.)"""
    model = _setup("bert", {"a": SEQ["a"], "c": lambda: SeqBnConfig(reduction_factor=4, scaling="channel", leave_out=[0])})
    model.add_adapter("p", config=ParBnConfig(reduction_factor=4, leave_out=[1]))
    model.add_adapter("q", config=PAR["q"]())
    _randomize(model)
    monkeypatch.setattr(BottleneckLayer, "pad_and_concat", _concat_without_up)
    _compare(model, BatchSplit("a", "c", "a", batch_sizes=[1, 1, 1]), _expect(calls, bottleneck_adapter_batched=2))
    _compare(model, BatchSplit("q", "p", "q", batch_sizes=[1, 1, 1]), _expect(calls, bottleneck_adapter_batched=2))
    _compare(model, Parallel("a", "c", "a"), _expect(calls, bottleneck_adapter_batched=2))


def test_batch_split_in_stack_and_multi_task(calls):
    model = _setup("bert", SEQ)
    # Stack: "d" (its own fused op), then the split; layer 0 output place only: 2 layers x 1 place.
    _compare(model, Stack("d", BatchSplit("a", "b", batch_sizes=[2, 1])),
             _expect(calls, bottleneck_adapter=2, bottleneck_adapter_batched=2))
    # MultiTask: the library sorts the batch by task id and runs a BatchSplit (task "d" has no rows).
    _compare(model, MultiTask("a", "b", "c", "d"), _expect(calls, bottleneck_adapter_batched=2),
             task_ids=torch.tensor([2, 0, 2]))


# ------------------------------------------------------------------------------------------------
# Parallel: the library replicates the batch (first Parallel layer) or the model got it replicated
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_parallel_replicates_batch(arch, calls):
    model = _setup(arch, SEQ)
    refs, report = _compare(model, Parallel("c", "a", "b"), _expect(calls, bottleneck_adapter_batched=2))
    assert refs["eval"][0].shape[0] == 3 * B  # the library's replication happened (in both runs)
    assert all("replicated batch" in what for what in report.compositions.values())
    _adapter_grads_matter(refs["train"], "abc")


def test_parallel_input_already_replicated(calls):
    """adapter_input_parallelized=True (as generate() does): no replication in the layer; parallel
    adapters (the library fails to replicate for them itself: post_forward adds the unreplicated h)."""
    model = _setup("bert", {**PAR, "a": SEQ["a"], "b": SEQ["b"]})
    inputs = {"inputs_embeds": torch.randn(B, 5, D).repeat(2, 1, 1).requires_grad_()}
    for setup in (Parallel("p", "q"), Parallel("b", "a")):
        refs, _ = _compare(model, setup, _expect(calls, bottleneck_adapter_batched=2), inputs=inputs,
                           adapter_input_parallelized=True)
        assert refs["eval"][0].shape[0] == 2 * B
    _adapter_grads_matter(refs["train"], "ab")


# ------------------------------------------------------------------------------------------------
# Fuse: one multi_adapter launch for the N up-projections, then the library's fusion layer
# ------------------------------------------------------------------------------------------------
FUSION_CONFIGS = {
    "dynamic": "dynamic",
    # residual_before adds the residual into the stacked ``up`` in place; query before LN; annealed T
    "residual_before-query_before_ln-temperature": AdapterFusionConfig.load(
        "dynamic", residual_before=True, query_before_ln=True, temperature=True, value_before_softmax=False),
    "static": "static",
}


@pytest.mark.parametrize("arch,fusion", [("bert", "dynamic"), ("bert", "residual_before-query_before_ln-temperature"),
                                         ("gpt2", "dynamic"), ("llama", "static")])
def test_fuse(arch, fusion, calls):
    model = _setup(arch, SEQ, fusions=[(Fuse("a", "b", "c"), FUSION_CONFIGS[fusion])])
    refs, report = _compare(model, Fuse("a", "b", "c"), _expect(calls, multi_adapter=2))
    assert all("multi_adapter" in what for what in report.compositions.values())
    _adapter_grads_matter(refs["train"], "abc")
    assert any("adapter_fusion_layer" in k and g is not None and g.abs().max() > 0 for k, g in refs["train"][1].items())


def test_fuse_of_parallel_adapters_in_stack_and_attentions(calls):
    model = _setup("bert", {**PAR, "a": SEQ["a"], "d": SEQ["d"]}, fusions=[(Fuse("p", "q"), "dynamic")])
    _compare(model, Fuse("p", "q"), _expect(calls, multi_adapter=2))
    model.add_adapter_fusion(Fuse("a", "p"), "dynamic")  # adapters of both kinds: s * up(...) is the same
    _randomize(model)
    _compare(model, Stack("d", Fuse("a", "p")), _expect(calls, bottleneck_adapter=2, multi_adapter=2))
    # The fusion attentions the library returns are the same too.
    model.eval()
    model.set_active_adapters(Fuse("a", "p"))
    x = torch.randn(2, 5, D)
    ref = model(inputs_embeds=x, output_adapter_fusion_attentions=True)
    _patch(model, "torch")
    calls.clear()
    got = model(inputs_embeds=x, output_adapter_fusion_attentions=True)
    assert calls[("multi_adapter", "torch")] == 2
    att_ref, att = ref.adapter_fusion_attentions["a,p"], got.adapter_fusion_attentions["a,p"]
    assert att.keys() == att_ref.keys() == {0, 1}
    for layer in att_ref:
        for place in att_ref[layer]:
            assert abs(att[layer][place] - att_ref[layer][place]).max() < 1e-5


# ------------------------------------------------------------------------------------------------
# float64 and the Triton backend (interpreter on CPU: tiny)
# ------------------------------------------------------------------------------------------------
def test_float64(calls):
    model = _setup("bert", SEQ, fusions=[(Fuse("d", "c"), "dynamic")], dtype=torch.float64)
    inputs = _inputs(torch.float64)
    for setup, op in ((BatchSplit("a", "c", batch_sizes=[1, 2]), "bottleneck_adapter_batched"),
                      (Parallel("b", "d"), "bottleneck_adapter_batched"), (Fuse("d", "c"), "multi_adapter"),
                      (Average("b", "c", "d", weights=[2.0, 1.0, 1.0]), "multi_adapter")):
        _compare(model, setup, {op: 2, "_counter": calls}, modes=("train",), inputs=inputs, tol=(1e-12, 1e-10))


@TRITON
def test_triton_backend(calls):
    model = _setup("bert", {**SEQ, **PAR}, fusions=[(Fuse("a", "c"), "dynamic")])
    inputs = _inputs(batch=2, seq=3)
    _compare(model, BatchSplit("c", "b", batch_sizes=[1, 1]), _expect(calls, bottleneck_adapter_batched=2),
             backend="triton", inputs=inputs)
    _compare(model, BatchSplit("q", "p", batch_sizes=[1, 1]), _expect(calls, bottleneck_adapter_batched=2),
             backend="triton", modes=("train",), inputs=inputs)  # parallel adapters: a stride-0 zero residual
    _compare(model, Parallel("a", "d"), _expect(calls, bottleneck_adapter_batched=2), backend="triton", modes=("train",), inputs=inputs)
    _compare(model, Fuse("a", "c"), _expect(calls, multi_adapter=2), backend="triton", modes=("train",), inputs=inputs)
    _compare(model, Average("c", "b", weights=[1.0, 2.0]), _expect(calls, multi_adapter=2), backend="triton", modes=("train",), inputs=inputs)


# ------------------------------------------------------------------------------------------------
# Stacked scalings (adapterkern.nn.bottleneck.stack_weights): differing Python floats are one
# float32 tensor of the exact floats, also in a bf16 model
# ------------------------------------------------------------------------------------------------
# Two float scalings that bf16 rounds down by 2^-8 relative (ties to even): 1 + 2^-8 -> 1, 2 + 2^-7 -> 2.
BF16_TIES = {"a": 1.0 + 2.0**-8, "b": 2.0 + 2.0**-7}


def _tie_adapters():
    return {name: (lambda s=s: SeqBnConfig(reduction_factor=4, scaling=s)) for name, s in BF16_TIES.items()}


def test_stacked_float_scalings_are_float32_in_a_bf16_model(monkeypatch):
    """Every fused composition op gets the differing float scalings as float32, unrounded (the library
    multiplies its bf16 ``up`` by the Python float itself); a learned bf16 scaling joins them as the
    float32 of its value."""
    model = _setup("bert", {**_tie_adapters(), "l": SEQ["b"]}, fusions=[(Fuse("a", "b"), "dynamic")],
                   dtype=torch.bfloat16)
    model.eval()
    seen = []
    for op in ("bottleneck_adapter_batched", "multi_adapter"):
        real = getattr(adapterhub_compose, op)

        def capture(*args, _real=real, **kwargs):
            seen.append(kwargs["scaling"])
            return _real(*args, **kwargs)

        monkeypatch.setattr(adapterhub_compose, op, capture)
    _patch(model, "torch")
    layer = model.encoder.layer[0].output
    x = torch.randn(2, 5, D, dtype=torch.bfloat16)
    exact = torch.tensor(list(BF16_TIES.values()), dtype=torch.float32)
    assert not torch.equal(exact.to(torch.bfloat16).float(), exact)  # bf16 would round them
    for setup, compose in ((BatchSplit("a", "b", batch_sizes=[1, 1]), layer.compose_batch_split),
                           (Fuse("a", "b"), layer.compose_fuse), (Average("a", "b"), layer.compose_average)):
        seen.clear()
        with torch.no_grad():
            compose(setup, BottleneckState(x, x, x, None), 0)
        assert len(seen) == 1, setup
        assert seen[0].dtype == torch.float32 and torch.equal(seen[0], exact), (setup, seen[0])
    seen.clear()
    with torch.no_grad():
        layer.compose_batch_split(BatchSplit("a", "l", batch_sizes=[1, 1]), BottleneckState(x, x, x, None), 0)
    learned = layer.adapters["l"].scaling
    assert learned.dtype == torch.bfloat16
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], torch.cat([exact[:1], learned.detach().float()]))


def test_stacked_float_scalings_unrounded_in_bf16_average():
    """The numbers: a bf16 model's Average (folded in float32 on every backend) gives the adapters'
    part of the float64 reference up to unbiased bf16 rounding, where the scalings rounded to bf16
    first would scale it by 1 - 2^-8 (both scalings round down by that much)."""
    model = _setup("bert", _tie_adapters(), dtype=torch.bfloat16)
    model.eval()
    _patch(model, "torch")
    layer = model.encoder.layer[0].output
    torch.manual_seed(0)
    x = torch.randn(2, 8, D, dtype=torch.bfloat16)
    weights = [1.0, 3.0]
    with torch.no_grad():
        state = layer.compose_average(Average(*BF16_TIES, weights=weights), BottleneckState(x, None, x, None), 0)
    got = state.hidden_states
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights) / len(weights)  # the library's (1/N) sum_n w_n out_n
    x64 = x.double()
    ref, ref_rounded = 0, 0  # the adapters' part: sum_n (w_n / N) s_n u_n
    for w_n, name in zip(w, BF16_TIES):
        adapter = layer.adapters[name]
        down, up = adapter.adapter_down[-2], adapter.adapter_up
        u = torch.relu(x64 @ down.weight.double().T + down.bias.double()) @ up.weight.double().T + up.bias.double()
        ref = ref + w_n * adapter.scaling * u
        ref_rounded = ref_rounded + w_n * torch.tensor(adapter.scaling, dtype=torch.bfloat16).double() * u
    assert got.dtype == torch.float32
    got = got.double() - x64 * w.sum()  # the residual's part is added in float32: exact enough
    big = ref.abs() > 0.05  # relative errors where they mean something

    def bias(y):
        return ((y - ref) / ref)[big].mean().item()

    assert big.sum() > 200
    assert bias(ref_rounded) < -3.8e-3  # what rounding the scalings to bf16 would do
    assert abs(bias(got)) < 1e-3, bias(got)
    assert rel_err(got, ref) < 1e-2


# ------------------------------------------------------------------------------------------------
# AdapterDrop: skip_layers (the library: no active setup in a skipped layer)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_skip_layers(arch, calls):
    configs = {**SEQ, **PAR, "h": lambda: DoubleSeqBnConfig(reduction_factor=4)}
    model = _setup(arch, configs, fusions=[(Fuse("a", "b"), "dynamic")])
    inputs = _inputs()
    setups = [  # setup, fused calls per forward with no layer skipped (2 layers)
        ("h", {"bottleneck_adapter": 4}),  # self-attention and FFN places
        ("p", {"bottleneck_adapter": 2}),
        (BatchSplit("a", "c", "b", batch_sizes=[1, 1, 1]), {"bottleneck_adapter_batched": 2}),
        (Parallel("a", "b"), {"bottleneck_adapter_batched": 2}),
        (Fuse("a", "b"), {"multi_adapter": 2}),
    ]
    for skip in ([0], [1], [0, 1]):
        refs = {}
        for setup, _ in setups:
            model.set_active_adapters(setup, skip_layers=skip)
            model.train()
            refs[repr(setup)] = _run(model, inputs)
        _patch(model, "torch")
        for setup, per_forward in setups:
            model.set_active_adapters(setup, skip_layers=skip)
            model.train()
            calls.clear()
            got = _run(model, inputs)
            # Half of the calls per skipped layer; none when both are skipped.
            assert dict(calls) == {(op, "torch"): n * (2 - len(skip)) // 2 for op, n in per_forward.items() if skip != [0, 1]}, (setup, skip)
            _assert_close(got, refs[repr(setup)])
            if skip != [0, 1]:  # skipping matters: the result differs from using every layer
                model.set_active_adapters(setup)
                full = _run(model, inputs)
                assert rel_err(full[0], got[0]) > 1e-3, (setup, skip)
        adapterkern.unpatch_adapters(model)


# ------------------------------------------------------------------------------------------------
# Average: the library's weighted mean, the N adapters folded into one launch
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_average(arch, calls):
    model = _setup(arch, {**SEQ, **PAR})
    # Sequential adapters with every kind of scaling, unequal weights, one adapter twice.
    refs, report = _compare(model, Average("a", "b", "c", "a", weights=[1.0, 3.0, 2.0, 0.5]), _expect(calls, multi_adapter=2))
    assert all("weighted mean folded" in what for what in report.compositions.values())
    _adapter_grads_matter(refs["train"], "abc")
    refs, _ = _compare(model, Average("p", "q"), _expect(calls, multi_adapter=2))  # parallel adapters
    _adapter_grads_matter(refs["train"], "pq")
    # Inside a Stack, and the library's own default weights.
    _compare(model, Stack("d", Average("b", "c")), _expect(calls, bottleneck_adapter=2, multi_adapter=2))


def test_average_bf16_keeps_the_library_dtype(calls):
    """The library multiplies the states by float32 weights: a bf16 model's Average output is float32."""
    model = _setup("bert", SEQ, dtype=torch.bfloat16)
    model.eval()
    layer = model.encoder.layer[0].output
    x = torch.randn(2, 5, D, dtype=torch.bfloat16)
    setup = Average("a", "b", "c", weights=[1.0, 3.0, 2.0])
    ref = layer.compose_average(setup, BottleneckState(x, None, x, None), 0).hidden_states
    _patch(model, "torch")
    got = layer.compose_average(setup, BottleneckState(x, None, x, None), 0).hidden_states
    assert calls[("multi_adapter", "torch")] == 1
    assert got.dtype == ref.dtype == torch.float32
    assert rel_err(got, ref) < 2e-2  # the library rounds each child's output to bf16 first


def test_average_note_and_library_numbers():
    """The library's Average with sequential adapters: (1/N) sum_n w_n (res + s_n u_n) (what README.md's
    "AdapterHub models: how patch_adapters works" says, and what the patched Average computes);
    adapterkern.multi_adapter(weights=) keeps res once."""
    model = _setup("bert", {"a": SEQ["a"], "b": SEQ["b"]})
    model.eval()
    layer = model.encoder.layer[0].output
    x = res = torch.randn(2, 5, D)  # no LayerNorm in this call: the adapters' input is their residual
    setup = Average("a", "b", weights=[1.0, 3.0])
    state = layer.compose_average(setup, BottleneckState(x, None, None, None), 0)
    outs = [layer.adapters[n](x, residual_input=res)[0] for n in "ab"]
    w = torch.tensor([0.25, 0.75])
    assert torch.allclose(state.hidden_states, (w[0] * outs[0] + w[1] * outs[1]) / 2, atol=1e-6)
    a, b = layer.adapters["a"], layer.adapters["b"]
    ours = adapterkern.multi_adapter(
        x, torch.stack([a.adapter_down[0].weight, b.adapter_down[0].weight]), torch.stack([a.adapter_down[0].bias, b.adapter_down[0].bias]),
        torch.stack([a.adapter_up.weight, b.adapter_up.weight]), torch.stack([a.adapter_up.bias, b.adapter_up.bias]),
        scaling=torch.stack([torch.tensor(0.5), b.scaling.detach()[0]]), residual=res, weights=w, backend="torch",
    )
    assert torch.allclose(ours, res + w[0] * (outs[0] - res) + w[1] * (outs[1] - res), atol=1e-5)


def test_training_dropout_keeps_library_loop(calls):
    model = _setup("gpt2", {"a": lambda: SeqBnConfig(reduction_factor=4, dropout=0.2), "b": SEQ["b"]},
                   fusions=[(Fuse("a", "b"), "dynamic")])
    inputs = _inputs()
    for setup in (BatchSplit("a", "b", batch_sizes=[2, 1]), Parallel("a", "b"), Fuse("a", "b")):
        model.set_active_adapters(setup)
        model.train()
        ref = _run(model, inputs, seed=5)
        with pytest.warns(ah.AdapterPatchWarning, match="dropout p=0.2"):
            adapterkern.patch_adapters(model, backend="torch")
        calls.clear()
        got = _run(model, inputs, seed=5)
        # "a" draws its dropout masks in the library's code; "b" alone still through the fused op
        # (BatchSplit, Parallel), Fuse reads both adapters' ``up``: the library's forwards.
        _assert_close(got, ref)
        assert calls[("bottleneck_adapter_batched", "torch")] == calls[("multi_adapter", "torch")] == 0
        model.eval()
        calls.clear()
        _run(model, inputs)
        assert sum(calls.values()) == 2  # eval: one launch per layer
        adapterkern.unpatch_adapters(model)


def test_unpatch_restores_composition_functions_and_deepcopy(calls):
    model = _setup("bert", SEQ).eval()
    model.set_active_adapters(BatchSplit("a", "b", batch_sizes=[1, 2]))
    inputs = _inputs()
    ref = _run(model, inputs)
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    _patch(model, "torch")
    layer = model.encoder.layer[0].output
    assert all(ah.is_patch_function(vars(layer)[f]) and vars(layer)[f].__self__ is layer for f in adapterhub_compose.COMPOSE_FUNCS)
    clone = copy.deepcopy(model)  # bound to the copy's layers, reading the copy's weights
    clone_layer = clone.encoder.layer[0].output
    assert all(vars(clone_layer)[f].__self__ is clone_layer for f in adapterhub_compose.COMPOSE_FUNCS)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    calls.clear()
    _assert_close(_run(clone, inputs), ref)
    assert dict(calls) == {("bottleneck_adapter_batched", "torch"): 2}
    # 8 adapter modules; 4 BottleneckLayers (add / delete hooks; the 2 holding the adapters: composition
    # functions too); the model (the hooks of its invertible adapters).
    assert adapterkern.unpatch_adapters(model) == 8 + 4 + 1
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before
    calls.clear()
    model(**_inputs())
    assert not calls
