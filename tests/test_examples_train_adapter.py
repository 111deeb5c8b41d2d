"""Training with adapters, end to end, on a tiny random-weight BERT built here (no downloads).

* The same short training run (examples/train_adapter.py's loop: AdamW, cross-entropy) with
  backend="torch" and with a fused backend gives the same loss curve and the same trained adapter.
* DistributedDataParallel, 2 CPU processes (gloo on loopback, started by the test): the adapter and
  head gradients equal those of one process on the whole batch.
* The example script's main() runs on a tiny model and tokenizer written to disk, and a made-up task.
"""
import datetime
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

from adapterkern import train_adapter  # noqa: E402
from adapterkern.backends import is_available  # noqa: E402
from adapterkern.integrations.transformers import adapter_modules  # noqa: E402
from conftest import DEVICE, rel_err, run_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _load_example():
    spec = importlib.util.spec_from_file_location("adapterkern_example_train_adapter", ROOT / "examples" / "train_adapter.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ex = _load_example()

VOCAB, SEQ = 48, 12


def tiny_bert(seed: int, dtype=torch.float32, vocab_size: int = VOCAB) -> BertModel:
    """2 layers, hidden 32, no dropout (so that runs are comparable step by step), random weights."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=SEQ + 4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False).to(dtype)


def tiny_classifier(seed: int, backend: str, dtype=torch.float32) -> nn.Module:
    """The example's model (mean pooling + Linear head + Pfeiffer adapter, r = 32/4 = 8) on tiny_bert,
    with only the adapter and the head trainable."""
    model = ex.with_adapter(tiny_bert(seed, dtype), backend, reduction_factor=4).to(dtype)
    train_adapter(model, ex.ADAPTER_NAME)  # the adapter and its modules_to_save, the head
    return model


def random_data(n: int, seed: int) -> "ex.Encoded":
    """Random tokens with a ragged padding mask; label 1 when token 7 occurs (about 1 in 6)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(3, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ) < lengths[:, None]).long()
    ids = ids * mask
    labels = ((ids == 7).any(1)).long()
    return ex.Encoded(ids, mask, labels)


def trainable(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------
# (a) The same training run on the torch backend and on a fused one
# ------------------------------------------------------------------------------------------------
FUSED = [
    pytest.param("triton", marks=pytest.mark.skipif(not is_available("triton", DEVICE), reason="triton cannot run here")),
    pytest.param("cuda", marks=pytest.mark.skipif(not is_available("cuda", DEVICE), reason="needs a GPU and the CUDA extension")),
]

# Tolerance for the loss curve: float32 everywhere (the Triton kernels use IEEE float32 dots unless
# torch allows TF32). One fused step differs from the torch step by float32 summation order only (a
# few ulp, ~1e-7 relative, in each adapter output and gradient); AdamW divides each update by the
# gradient's running RMS, so elements with tiny gradients carry that noise into the weights at up to
# ~lr * 1e-5, and it grows over the steps. Measured (CPU, Triton interpreter): over these 8 steps the
# losses agree within 6e-8 and the trained parameters within 3e-7 relative (over 12 steps: 6e-8 and
# 7e-6). The bounds leave > 100x headroom on the loss and > 10x on the parameters of the longer run,
# while the loss falls by > 0.1 and one step moves it by ~0.1 and the parameters by > 1e-2 (checked):
# a fused gradient wrong in any way that matters to training shows at once.
LOSS_TOL = 1e-5
PARAM_TOL = 1e-4  # relative to each tensor's largest element, after the run


@pytest.mark.parametrize("fused", FUSED)
def test_loss_curve_fused_matches_torch(fused):
    data = random_data(64, seed=1)
    curves, params = {}, {}
    for backend in ("torch", fused):
        model = tiny_classifier(seed=0, backend=backend).to(DEVICE)
        assert all(a.backend == backend for a in adapter_modules(model, ex.ADAPTER_NAME).values())
        params[backend, "init"] = trainable(model)
        curves[backend] = ex.train(model, data, epochs=2, batch_size=16, lr=1e-2, seed=3)
        params[backend] = trainable(model)
    # Same start (the backend does not touch the RNG), 8 steps each.
    for name, p in params["torch", "init"].items():
        assert torch.equal(p, params[fused, "init"][name])
    ref, got = torch.tensor(curves["torch"]), torch.tensor(curves[fused])
    assert len(ref) == len(got) == 8
    assert ref[-3:].mean() < ref[:3].mean() - 0.1, f"the loss did not fall, nothing to compare: {ref.tolist()}"
    diff = (got - ref).abs().max().item()
    assert diff <= LOSS_TOL, f"loss curves differ by {diff:.2e}:\n torch {ref.tolist()}\n {fused} {got.tolist()}"
    for name, p in params["torch"].items():
        moved = rel_err(p, params["torch", "init"][name])
        assert moved > 100 * PARAM_TOL, f"{name} barely trained ({moved:.1e})"
        assert rel_err(params[fused][name], p) <= PARAM_TOL, name


# ------------------------------------------------------------------------------------------------
# (b) DistributedDataParallel, 2 CPU processes, gloo on loopback
# ------------------------------------------------------------------------------------------------
WORLD = 2
DDP_BATCH = 8  # 4 examples per rank
DDP_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _ddp_batch():
    data = random_data(DDP_BATCH, seed=5)
    return data.input_ids, data.attention_mask, data.labels


def _loss(model, ids, mask, labels):
    return nn.functional.cross_entropy(model(ids, mask), labels)


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _ddp_worker(rank: int, port: int, out_dir: str, backends: list) -> None:
    """One rank: the model (same seed on every rank), its half of the batch, DDP's averaged gradients to a file."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        for backend in backends:
            for dtype_name, dtype in DDP_DTYPES.items():
                model = tiny_classifier(seed=11, backend=backend, dtype=dtype)
                ddp = DistributedDataParallel(model)
                ids, mask, labels = _ddp_batch()
                part = slice(rank * DDP_BATCH // WORLD, (rank + 1) * DDP_BATCH // WORLD)
                _loss(ddp, ids[part], mask[part], labels[part]).backward()  # DDP averages the gradients over ranks
                save_file(_grads(model), os.path.join(out_dir, f"{backend}-{dtype_name}-rank{rank}.safetensors"))
        dist.barrier()  # both ranks reach the teardown together (pytorch/pytorch#75097: destroy can hang otherwise)
    finally:
        dist.destroy_process_group()


# float32: the all-reduce adds two half-batch gradients where one process sums the whole batch in
# one go, a different order of float32 additions: measured <= 3e-7 relative (either backend), so
# 2e-6. float64 pins the same maths to its rounding: measured <= 5e-16, so 1e-12. A rank that kept
# its own half's gradient (no all-reduce) would be off by ~1 (checked below).
DDP_TOL = {"float32": 2e-6, "float64": 1e-12}
DDP_TIMEOUT_S = 180  # ~10 s on an idle 2-core machine; generous for a busy one


def test_ddp_two_processes_match_one_process(tmp_path):
    """Adapter training under DistributedDataParallel, 2 CPU processes (gloo, loopback), each the mean
    loss of its half of the batch: every rank's gradients equal one process's on the whole batch.
    Ranks run the torch backend and, where it can run on the CPU, the Triton one (interpreter)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    backends = ["torch"] + (["triton"] if is_available("triton", torch.device("cpu")) else [])
    files = [tmp_path / f"{b}-{d}-rank{r}.safetensors" for b in backends for d in DDP_DTYPES for r in range(WORLD)]
    run_ranks(_ddp_worker, (str(tmp_path), backends), WORLD, files, DDP_TIMEOUT_S, "DDP")
    for dtype_name, dtype in DDP_DTYPES.items():
        # One process, the whole batch, the mean loss, on the torch backend.
        model = tiny_classifier(seed=11, backend="torch", dtype=dtype)
        ids, mask, labels = _ddp_batch()
        _loss(model, ids, mask, labels).backward()
        full = _grads(model)
        # What rank 0 would hold without the all-reduce: its own half's gradient.
        model.zero_grad(set_to_none=True)
        _loss(model, ids[: DDP_BATCH // 2], mask[: DDP_BATCH // 2], labels[: DDP_BATCH // 2]).backward()
        half = _grads(model)
        names = set(full)
        assert any(".bottleneck_adapters." in n for n in names) and "classifier.weight" in names
        assert len(names) == 2 * 2 * 2 + 2, sorted(names)  # 2 layers x (down, up) x (weight, bias) + head
        for name in names:
            assert full[name].abs().max() > 0, f"{name}: zero gradient, nothing to compare"
            assert rel_err(half[name], full[name]) > 1e-2, f"{name}: a half batch gives the same gradient; the test could not fail"
        for backend in backends:
            for r in range(WORLD):
                got = load_file(str(tmp_path / f"{backend}-{dtype_name}-rank{r}.safetensors"))
                assert set(got) == names
                for name in sorted(names):
                    assert got[name].dtype == dtype
                    err = rel_err(got[name], full[name])
                    assert err <= DDP_TOL[dtype_name], f"{backend} {dtype_name} rank {r} {name}: {err:.2e}"


# ------------------------------------------------------------------------------------------------
# (c) The example's main() on a tiny model and tokenizer on disk, and a made-up task
# ------------------------------------------------------------------------------------------------
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "film", "plot", "was", "and", "a", "it", "movie"]


def test_example_main_runs_end_to_end(tmp_path, monkeypatch, capsys):
    from transformers import BertTokenizer

    # A word-level BERT vocabulary and a random tiny BERT saved as a model directory.
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    model_dir = tmp_path / "model"
    BertTokenizer(str(vocab)).save_pretrained(model_dir)
    tiny_bert(seed=2, vocab_size=len(WORDS) + 5).save_pretrained(model_dir)

    # Reviews: a positive or a negative word among filler words; two reviews per "movie".
    g = torch.Generator().manual_seed(0)
    texts, labels, movies = [], [], []
    for i in range(320):
        label = i % 2
        words = [WORDS[6 + int(j)] for j in torch.randint(0, 8, (6,), generator=g)]
        words.insert(int(torch.randint(0, 6, (1,), generator=g)), WORDS[int(torch.randint(0, 3, (1,), generator=g)) + 3 * (1 - label)])
        texts.append(" ".join(words))
        labels.append(label)
        movies.append(f"movie{i // 2}")
    monkeypatch.setattr(ex, "model_dir", lambda: model_dir)
    monkeypatch.setattr(ex, "load_reviews", lambda: (texts, labels, movies))

    out = tmp_path / "out"
    result = ex.main(["--epochs", "8", "--seed", "1", "--output", str(out), "--reduction-factor", "4",
                      "--batch-size", "20", "--lr", "3e-2", "--log-every", "10", "--backend", "torch"])
    printed = capsys.readouterr().out
    assert result["loss_last"] < result["loss_first"] - 0.2, printed
    assert result["accuracy"] >= result["chance"] + 0.2, printed
    assert result["reloaded_accuracy"] == result["accuracy"]
    assert 0 < result["percent"] < 100
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"] and "classifier.weight" in saved["tensors"]
    for line in ("held-out accuracy:", "trainable parameters:", "saved adapter and head:", "predictions identical"):
        assert line in printed


def test_split_by_movie_keeps_movies_apart():
    movies = [f"m{i % 37}" for i in range(500)]
    train, test = ex.split_by_movie(movies)
    assert sorted(train + test) == list(range(500))
    assert not {movies[i] for i in train} & {movies[i] for i in test}
    assert 0.05 < len(test) / 500 < 0.4
    assert ex.split_by_movie(movies) == (train, test)
