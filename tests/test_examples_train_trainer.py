"""examples/train_trainer.py (Trainer + adapterkern's PEFT method) on a tiny BERT and a made-up task:
evaluation, adapter-only checkpoints, reload with AutoPeftModel, and a run interrupted and resumed from
its last checkpoint ending with the loss and adapter of an uninterrupted run."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "film", "plot", "was", "and", "a", "it", "movie"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("train_trainer", ROOT / "examples" / "train_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_task(tmp_path, monkeypatch, ex):
    """A word-level tokenizer, a random tiny BERT classifier on disk, and reviews whose words are mostly
    their class's (good / great / fine vs bad / awful / poor) among filler words."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    model_dir = tmp_path / "model"
    transformers.BertTokenizer(str(vocab)).save_pretrained(model_dir)
    torch.manual_seed(3)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=24, initializer_range=0.3)
    transformers.BertModel(config).save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    texts, labels, movies = [], [], []
    for i in range(200):
        label = i % 2
        telling = torch.rand(6, generator=g) < 0.7
        words = [WORDS[int(torch.randint(0, 3, (1,), generator=g)) + 3 * (1 - label)] if t
                 else WORDS[6 + int(torch.randint(0, 8, (1,), generator=g))] for t in telling]
        texts.append(" ".join(words))
        labels.append(label)
        movies.append(f"movie{i // 2}")
    monkeypatch.setattr(ex.base_example, "model_dir", lambda: model_dir)
    monkeypatch.setattr(ex.base_example, "load_reviews", lambda: (texts, labels, movies))
    return tmp_path


def _argv(out, *more):
    return ["--epochs", "10", "--seed", "1", "--output", str(out), "--reduction-factor", "4", "--batch-size", "16",
            "--lr", "3e-3", "--log-every", "1", "--save-steps", "7", "--max-length", "16", "--backend", "torch", *more]


def test_trainer_example_trains_checkpoints_and_resumes_to_the_same_end(ex, tiny_task, capsys):
    whole = ex.main(_argv(tiny_task / "whole"))
    printed = capsys.readouterr().out
    assert "predictions identical" in printed and "held-out accuracy" in printed
    assert whole["accuracy"] >= 0.75  # chance: 0.5 (the classes alternate)
    steps = whole["global_step"]
    assert steps > 14
    checkpoint = tiny_task / "whole" / "checkpoint-7"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}  # adapter-only checkpoints
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert saved and all("bottleneck_adapters" in k or ".classifier." in k or ".pooler." in k for k in saved)
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == "ADAPTERKERN_BOTTLENECK"

    stopped = ex.main(_argv(tiny_task / "resumed", "--stop-after", "10"))  # interrupted after step 10; last checkpoint 7
    assert stopped["global_step"] == 10
    resumed = ex.main(_argv(tiny_task / "resumed", "--resume", "last"))
    assert resumed["global_step"] == steps
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-5, abs=1e-6)
    assert resumed["accuracy"] == whole["accuracy"]
    a = load_file(str(tiny_task / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tiny_task / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
