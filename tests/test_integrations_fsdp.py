"""Adapters under FSDP2 (``torch.distributed.fsdp.fully_shard``), 2 CPU processes, gloo on loopback.

A frozen tiny random-weight BERT classifier with one trainable adapter (pfeiffer with learned scaling,
houlsby with channel scaling, parallel) and a trainable head. Two ways to shard it:

* ``layers``: ``fully_shard`` on every encoder layer, then on the root. Each FSDP unit holds frozen
  backbone parameters and trainable adapter ones (the head and the frozen embeddings: the root's unit).
  The layer's pre-forward all-gathers the adapters inside it with the rest.
* ``leaves``: first ``fully_shard`` on every leaf module with a trainable weight (the wrap policy PEFT
  recommends for adapters under FSDP: here each adapter's ``adapter_down`` / ``adapter_up`` and the
  head), then the layers and the root. The adapter reads its projections' weights without calling
  them (the known failure of fused LoRA kernels under FSDP): BottleneckAdapter unshards them itself.

Each rank runs its half of the batch, two AdamW steps. Checked, on every rank:

* Before the first forward every parameter, the adapters' included, is a DTensor sharded on dim 0 (each
  rank holds a part), and after each backward again (resharded): the unshard path is what runs.
* The fused op (``adapterkern.bottleneck_adapter``, called by each BottleneckAdapter) reads plain,
  full-size tensors.
* The reduce-scattered adapter and head gradients, gathered (``DTensor.full_tensor()``), equal one
  process's gradient on the whole batch at the same parameters; frozen parameters get no gradient.
* The AdamW steps on the shards give what one process's steps on the whole tensors give, with those
  gradients; and the parameters stay close to an independent single-process run on the whole batch.

Backends: ``torch`` and, where it runs on the CPU (Triton interpreter), ``triton``; float32 and float64.
"""
import datetime
import json
import os

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

import adapterkern  # noqa: E402
from adapterkern.backends import is_available  # noqa: E402
from conftest import rel_err, run_ranks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
VOCAB, SEQ, BATCH = 48, 12, 8  # 4 examples per rank
SEED = 21
LR = 1e-2
DTYPES = {"float32": torch.float32, "float64": torch.float64}
CASES = {
    "pfeiffer": lambda backend: adapterkern.AdapterConfig.pfeiffer(reduction_factor=4, scaling="learned", backend=backend),
    "houlsby": lambda backend: adapterkern.AdapterConfig.houlsby(reduction_factor=4, scaling="channel", backend=backend),
    # bert init: the preset's mam_adapter init zeroes up, and with it the down-projection's gradient
    "parallel": lambda backend: adapterkern.AdapterConfig.parallel(init="bert", backend=backend),
}
# trainable tensors per case: 2 layers x places x (down w, down b, up w, up b[, scaling]) + the head's 2
N_TRAINABLE = {"pfeiffer": 2 * 1 * 5 + 2, "houlsby": 2 * 2 * 5 + 2, "parallel": 2 * 1 * 4 + 2}
N_PLACES = {"pfeiffer": 2, "houlsby": 4, "parallel": 2}  # adapter calls per forward
NAME = "task"


class Classifier(nn.Module):
    """A 2-layer hidden-32 BERT without dropout, mean-pooled over the mask, and a Linear head."""

    def __init__(self, dtype):
        super().__init__()
        config = BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=SEQ + 4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.config = config  # as a transformers head model has (the parallel adapter reads hidden_size there)
        self.backbone = BertModel(config, add_pooling_layer=False).to(dtype)
        self.classifier = nn.Linear(32, 2, dtype=dtype)

    def forward(self, ids, mask):
        states = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(states.dtype)
        return self.classifier((states * m).sum(1) / m.sum(1))


def classifier(case: str, backend: str, dtype) -> Classifier:
    """Random weights (the same in every process), adapter ``case`` added, only the adapter and the head trainable."""
    torch.manual_seed(SEED)
    model = Classifier(dtype)
    adapterkern.add_adapter(model, NAME, CASES[case](backend))
    adapterkern.train_adapter(model, NAME, train_modules=["classifier"])
    return model


def batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
    mask = (torch.arange(SEQ) < torch.randint(3, SEQ + 1, (BATCH,), generator=g)[:, None]).long()
    ids = ids * mask
    return ids, mask, (ids == 7).any(1).long()


def loss_of(model, ids, mask, labels):
    return nn.functional.cross_entropy(model(ids, mask), labels)  # the mean over the examples given


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


STEPS = 2
WRAPS = ("layers", "leaves")
RUNS = [(c, d, w) for w in WRAPS for c in CASES for d in DTYPES]


def _shard(model, wrap: str, mesh) -> list:
    """``fully_shard`` as ``wrap`` says (see the module docstring); the names of the modules sharded."""
    from torch.distributed.fsdp import fully_shard

    units = []
    if wrap == "leaves":
        units += [n for n, m in model.named_modules()
                  if not list(m.children()) and getattr(m, "weight", None) is not None and m.weight.requires_grad]
    units += [n for n, _ in model.named_modules() if n.startswith("backbone.encoder.layer.") and n.count(".") == 3]
    modules = dict(model.named_modules())
    for n in units:
        fully_shard(modules[n], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return units + [""]


def _fsdp_worker(rank: int, port: int, out_dir: str, backends: list) -> None:
    """One rank: shard, then STEPS times forward + backward on its half of the batch and an AdamW step;
    the gathered gradients and updated parameters to a safetensors file, the sharding and what the
    fused op read to JSON."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import adapterkern.nn.bottleneck as bottleneck_module

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    real_op = bottleneck_module.bottleneck_adapter
    reads = []  # what each call of the fused op got: (is a DTensor, shape) of each parameter tensor

    def spy(x, w_down, b_down, w_up, b_up, **kwargs):
        tensors = [w_down, b_down, w_up, b_up] + ([kwargs["scaling"]] if isinstance(kwargs["scaling"], torch.Tensor) else [])
        reads.append([[isinstance(t, DTensor), list(t.shape)] for t in tensors])
        return real_op(x, w_down, b_down, w_up, b_up, **kwargs)

    def sharding(model) -> dict:
        return {
            n: {"shard0": isinstance(p, DTensor) and p.placements == (Shard(0),),
                "local": list(p.to_local().shape) if isinstance(p, DTensor) else None, "full": list(p.shape),
                "trainable": p.requires_grad}
            for n, p in model.named_parameters()
        }

    bottleneck_module.bottleneck_adapter = spy
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        ids, mask, labels = batch()
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for backend in backends:
            for case, dtype_name, wrap in RUNS:
                tag = f"{backend}-{case}-{dtype_name}-{wrap}"
                model = classifier(case, backend, dtype=DTYPES[dtype_name])
                adapters = adapterkern.integrations.transformers.adapter_modules(model, NAME).values()
                assert all(a.backend == backend for a in adapters)
                info = {"units": _shard(model, wrap, mesh), "sharding": [sharding(model)], "reads": []}
                optimizer = adamw(model)
                out = {}
                for step in range(STEPS):
                    reads.clear()
                    loss_of(model, ids[part], mask[part], labels[part]).backward()  # FSDP2 averages the gradients
                    info["reads"].append(list(reads))
                    info["sharding"].append(sharding(model))  # resharded after the backward
                    for n, p in model.named_parameters():
                        if p.requires_grad:
                            out[f"grad{step}.{n}"] = p.grad.full_tensor()
                        else:
                            assert p.grad is None, f"{tag}: frozen {n} got a gradient"
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    for n, p in model.named_parameters():
                        if p.requires_grad:
                            out[f"param{step}.{n}"] = p.detach().full_tensor()
                save_file(out, os.path.join(out_dir, f"{tag}-rank{rank}.safetensors"))
                with open(os.path.join(out_dir, f"{tag}-rank{rank}.json"), "w") as f:
                    json.dump(info, f)
        dist.barrier()  # both ranks reach the teardown together (pytorch/pytorch#75097: destroy can hang otherwise)
    finally:
        bottleneck_module.bottleneck_adapter = real_op
        dist.destroy_process_group()


# Gradients, against one process on the whole batch at the same parameters. float32: the reduce-scatter
# adds two half-batch gradients where one process sums the whole batch in one go, a different order of
# float32 additions; FSDP2 divides by the world size 2 (exact). Relative to each tensor's largest element,
# or, where the halves cancel (bias gradients once the loss has moved), to the halves' (|g_0| + |g_1|) / 2,
# the scale the rounding of their sum is relative to. Measured <= 4e-7 (either backend, either wrap), so
# 2e-6, ~17 float32 ulp (2^-23 = 1.2e-7). float64 pins the same maths to its rounding: measured <= 2e-15.
# A rank that kept its own half's gradient is off by > 1e-2 (checked below), one that summed the ranks'
# gradients without averaging by 1.
GRAD_TOL = {"float32": 2e-6, "float64": 1e-12}
# The steps on the shards, against one process stepping the whole tensors with the gradients the ranks
# gathered: AdamW's elementwise maths on the same numbers (a few ulp allowed for vectorised vs scalar
# loops over different lengths; measured: bitwise equal).
STEP_TOL = {"float32": 2.4e-7, "float64": 4.5e-16}
# Against an independent single-process run on the whole batch: the first AdamW step moves each element
# by lr * g / (|g| + eps), so the gradients' rounding differences reach an element with a tiny gradient
# amplified (by up to lr * eps / (|g| + eps)^2), relative to each tensor's largest element (as in
# test_examples_train_adapter.py). Measured <= 7e-6 (float32) and 2e-14 (float64); the steps move each
# tensor by ~lr = 1e-2 (checked).
PARAM_TOL = {"float32": 1e-4, "float64": 1e-10}
TIMEOUT_S = 300  # both ranks, every run; generous for a busy 2-core machine


def _record(errors: dict, key, err: float) -> None:
    errors[key] = max(errors.get(key, 0.0), err)


def _reference(case: str, dtype, grads=None):
    """One process, torch backend, STEPS AdamW steps: per step its gradients on the whole batch and on each
    rank's half, and the parameters after the step, which uses ``grads[step]`` (the ranks' gathered
    gradients) where given, else its own whole-batch gradient."""
    ids, mask, labels = batch()
    model = classifier(case, "torch", dtype)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = adamw(model)

    def grads_on(part):
        loss = loss_of(model, ids[part], mask[part], labels[part])
        return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    init = {n: p.detach().clone() for n, p in params.items()}
    full, halves, after = [], [], []
    for step in range(STEPS):
        full.append(grads_on(slice(None)))
        halves.append([grads_on(slice(r * BATCH // WORLD, (r + 1) * BATCH // WORLD)) for r in range(WORLD)])
        for n, p in params.items():
            p.grad = (full[step] if grads is None else grads[step])[n].clone()
        optimizer.step()
        after.append({n: p.detach().clone() for n, p in params.items()})
    return init, full, halves, after


def test_fsdp2_two_processes_match_one_process(tmp_path):
    """FSDP2 ``fully_shard`` (per layer, or per adapter projection and per layer) and on the root, 2 CPU
    processes: sharded adapter parameters are unsharded for the fused op; gradients and two AdamW steps
    equal one process on the whole batch."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    fsdp = pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch without FSDP2's fully_shard")

    backends = ["torch"] + (["triton"] if is_available("triton", torch.device("cpu")) else [])
    tags = [f"{b}-{c}-{d}-{w}" for b in backends for c, d, w in RUNS]
    files = [tmp_path / f"{t}-rank{r}.{ext}" for t in tags for r in range(WORLD) for ext in ("safetensors", "json")]
    run_ranks(_fsdp_worker, (str(tmp_path), backends), WORLD, files, TIMEOUT_S, "FSDP")

    ids, mask, labels = batch()
    errors = {}  # (backend, dtype, what) -> the largest relative difference over cases, wraps, ranks, steps, tensors
    for case in CASES:
        for dtype_name, dtype in DTYPES.items():
            init, full, halves, stepped = _reference(case, dtype)  # the independent single-process run
            names = set(init)
            assert len(names) == N_TRAINABLE[case], sorted(names)
            assert sum(".bottleneck_adapters." in n for n in names) == N_TRAINABLE[case] - 2 and "classifier.weight" in names
            for n in names:
                assert full[0][n].abs().max() > 0, f"{case} {n}: zero gradient, nothing to compare"
                # what rank 0 would hold without the reduce-scatter
                assert rel_err(halves[0][0][n], full[0][n]) > 1e-2, f"{case} {n}: a half batch gives the same gradient"
                assert rel_err(stepped[0][n], init[n]) > LR / 2, f"{case} {n}: the step barely moved it"  # ~lr * sign(g)
            for backend in backends:
                for wrap in WRAPS:
                    tag = f"{backend}-{case}-{dtype_name}-{wrap}"
                    got = [load_file(str(tmp_path / f"{tag}-rank{r}.safetensors")) for r in range(WORLD)]
                    assert set(got[0]) == {f"{k}{s}.{n}" for k in ("grad", "param") for s in range(STEPS) for n in names}
                    for key in got[0]:  # full_tensor() gives every rank the same
                        assert got[0][key].dtype == dtype and torch.equal(got[0][key], got[1][key]), (tag, key)
                    gathered = [{n: got[0][f"grad{s}.{n}"] for n in names} for s in range(STEPS)]
                    _, shadow, shadow_halves, shadow_params = _reference(case, dtype, grads=gathered)  # the ranks' trajectory
                    for s in range(STEPS):
                        for n in names:
                            param = got[0][f"param{s}.{n}"]
                            # relative to the gradient, or to the two halves the reduce-scatter adds where they cancel
                            scale = sum(h[n].abs() for h in shadow_halves[s]) / WORLD
                            _record(errors, (backend, dtype_name, "grad"), rel_err(gathered[s][n], shadow[s][n], scale=scale))
                            _record(errors, (backend, dtype_name, "step"), rel_err(param, shadow_params[s][n]))
                            _record(errors, (backend, dtype_name, "param"), rel_err(param, stepped[s][n]))
                    for r in range(WORLD):
                        info = json.loads((tmp_path / f"{tag}-rank{r}.json").read_text())
                        leaves = sum(".bottleneck_adapters." in u for u in info["units"])
                        assert leaves == (2 * N_PLACES[case] if wrap == "leaves" else 0), info["units"]
                        # every parameter, frozen or not, sharded on dim 0 before the first forward and after each
                        # backward; the adapters' tensors of more than one row each hold only a part on each rank
                        for when, sharding in enumerate(info["sharding"]):
                            assert {n for n, v in sharding.items() if v["trainable"]} == names
                            for n, v in sharding.items():
                                assert v["shard0"], f"{tag} rank {r} {n} (after {when} backwards): not sharded: {v}"
                                if ".bottleneck_adapters." in n and v["full"][0] > 1:
                                    assert v["local"][0] < v["full"][0], f"{tag} rank {r} {n}: holds all of it: {v}"
                        # the fused op ran once per place and forward, and read plain, full-size tensors
                        shapes = sorted(v["full"] for n, v in info["sharding"][0].items() if ".bottleneck_adapters." in n)
                        for reads in info["reads"]:
                            assert len(reads) == N_PLACES[case], reads
                            assert sorted(shape for call in reads for _, shape in call) == shapes
                            assert not any(is_dtensor for call in reads for is_dtensor, _ in call), reads
    print("\nmax relative differences:", {" ".join(k): f"{v:.1e}" for k, v in sorted(errors.items())})
    tols = {"grad": GRAD_TOL, "step": STEP_TOL, "param": PARAM_TOL}
    over = {k: v for k, v in errors.items() if v > tols[k[2]][k[1]]}
    assert not over, f"over the tolerance: {over}"
