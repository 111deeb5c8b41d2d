"""The Rotten Tomatoes task of examples/train_adapter.py, trained with ``transformers.Trainer`` through
adapterkern's PEFT method.

The PEFT user's usual script: ``get_peft_model(model, BottleneckConfig(...))``, ``Trainer`` with
evaluation every epoch and adapter-only checkpoints every ``--save-steps`` steps, ``save_pretrained``,
``AutoPeftModelForSequenceClassification.from_pretrained``, predict. The model is
``BertForSequenceClassification`` on all-MiniLM-L6-v2 (its [CLS] pooler and the classifier are the
trained head: PEFT's ``modules_to_save``); the Pfeiffer adapter is adapterkern's.

    make example-trainer                           # sets up .venv with the examples and peft extras
    python examples/train_trainer.py --epochs 2 --output /tmp/rotten_tomatoes_trainer
    python examples/train_trainer.py --epochs 2 --output /tmp/rotten_tomatoes_trainer --resume last

``--resume last`` (or a checkpoint directory) continues an interrupted run from its newest checkpoint:
model, optimiser, scheduler, data order and random state are restored, so the run ends where an
uninterrupted one would have (tests/test_examples_train_trainer.py checks the final loss).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; a hub call would be a bug
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from peft import AutoPeftModelForSequenceClassification, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments, set_seed,
)

from adapterkern.peft import BottleneckConfig  # noqa: E402 - importing adapterkern.peft registers the method


def _load_sibling(name: str):
    """examples/<name>.py as a module (the data and its split are train_adapter.py's)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


base_example = _load_sibling("train_adapter")


class ReviewDataset(torch.utils.data.Dataset):
    """Encoded reviews as the dicts the Trainer collates: input_ids, attention_mask, labels."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.data.input_ids[i], "attention_mask": self.data.attention_mask[i],
                "labels": self.data.labels[i]}


def accuracy_metric(eval_prediction) -> Dict[str, float]:
    logits, labels = eval_prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"), help="adapter backend")
    ap.add_argument("--epochs", type=int, default=2, help="passes over the training reviews")
    ap.add_argument("--max-train", type=int, default=None, help="use at most this many training reviews (None: all)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation, order and dropout")
    ap.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()) / "adapterkern-example-trainer",
                    help="checkpoints (output/checkpoint-N) and the final adapter (output/adapter)")
    ap.add_argument("--batch-size", type=int, default=32, help="reviews per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (adapter and head)")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per review")
    ap.add_argument("--reduction-factor", type=int, default=16, help="bottleneck r = 384 / this")
    ap.add_argument("--save-steps", type=int, default=50, help="an adapter-only checkpoint every this many steps")
    ap.add_argument("--log-every", type=int, default=25, help="log the mean loss every this many steps")
    ap.add_argument("--resume", default=None, help="'last' or a checkpoint directory: continue from it")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="end the run after this many steps as if it had been interrupted (checkpoints kept)")
    return ap.parse_args(argv)


class StopAfter(TrainerCallback):
    """Ends training after ``steps`` steps, as an interruption would (the resume test's)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True
        return control


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    start = time.perf_counter()
    set_seed(args.seed)
    path = base_example.model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts, labels, movies = base_example.load_reviews()
    train_idx, test_idx = base_example.split_by_movie(movies)
    if args.max_train is not None:
        perm = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(args.seed)).tolist()
        train_idx = sorted(train_idx[i] for i in perm[: args.max_train])
    data = base_example.encode(tokenizer, texts, labels, args.max_length)
    train_set, test_set = ReviewDataset(data.subset(train_idx)), ReviewDataset(data.subset(test_idx))
    print(f"data: {len(train_set)} train / {len(test_set)} held-out reviews")

    backbone = BertForSequenceClassification.from_pretrained(path, num_labels=len(base_example.LABELS))
    config = BottleneckConfig(preset="pfeiffer", reduction_factor=args.reduction_factor, activation="relu",
                              backend=args.backend, task_type="SEQ_CLS", modules_to_save=["pooler"])
    model = get_peft_model(backbone, config)  # + the classifier in modules_to_save (PEFT's SEQ_CLS default)
    model.print_trainable_parameters()

    out = Path(args.output)
    training_args = TrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128, learning_rate=args.lr, weight_decay=0.01, lr_scheduler_type="linear",
        eval_strategy="epoch", save_strategy="steps", save_steps=args.save_steps, logging_steps=args.log_every,
        seed=args.seed, data_seed=args.seed, report_to=[], use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True,
    )
    callbacks = [StopAfter(args.stop_after)] if args.stop_after else []
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=test_set,
                      compute_metrics=accuracy_metric, callbacks=callbacks)
    resume = args.resume
    if resume == "last":
        checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        resume = str(checkpoints[-1]) if checkpoints else None
        print(f"resuming from {resume}" if resume else "no checkpoint to resume from: training from the start")
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.perf_counter() - t0
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    final_loss = losses[-1] if losses else float("nan")
    print(f"training: {trainer.state.global_step} steps in {train_s:.0f} s, mean loss {result.training_loss:.4f}, "
          f"last logged loss {final_loss:.4f}")
    if args.stop_after and trainer.state.global_step < trainer.state.max_steps:
        print(f"stopped after {trainer.state.global_step} steps (--stop-after); continue with --resume last")
        return {"global_step": trainer.state.global_step, "final_loss": final_loss}

    metrics = trainer.evaluate()
    print(f"held-out accuracy: {metrics['eval_accuracy']:.4f}, loss {metrics['eval_loss']:.4f}")
    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir)  # adapter tensors and the head only
    print(f"saved adapter: {adapter_dir}/ ({', '.join(sorted(p.name for p in adapter_dir.iterdir()))})")

    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir).eval()
    pred = trainer.predict(test_set).predictions.argmax(-1)
    pred2 = Trainer(model=reloaded, args=training_args, eval_dataset=test_set).predict(test_set).predictions.argmax(-1)
    same = int((pred == pred2).sum())
    print(f"reloaded with AutoPeftModelForSequenceClassification: {same}/{len(pred)} predictions identical")
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    if same != len(pred):
        raise SystemExit("the reloaded adapter predicts differently from the trained one")
    return {"global_step": trainer.state.global_step, "final_loss": final_loss, "accuracy": metrics["eval_accuracy"],
            "training_loss": result.training_loss}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
