"""``python -m adapterkern.bench tradeoffs``: efficiency is more than latency.

One BERT-base-sized model (random weights) and one batch, four ways side by side:

* full fine-tuning (every weight trained; the checkpoint is the whole model);
* eager adapters (frozen backbone, a Pfeiffer adapter after every feed-forward sublayer, r = d/16);
* fused adapters (the same adapters through ``adapterkern.bottleneck_adapter``, same weights);
* LoRA on the attention query/value projections (trained unmerged), with the rank that gives the adapters' parameter
  count, merged into the weights for inference: the zero-added-latency reference.

For each: trainable parameters (count and percent of the backbone), checkpoint size on disk (what
must be stored per task), training step time (forward + backward + AdamW step, loss = mean square of
the last hidden state) and peak memory, and inference latency. Peak memory: on CUDA,
``torch.cuda.max_memory_allocated`` over training steps of that configuration alone; on CPU (no
allocator statistics), an account of parameters + gradients + AdamW state + the tensors autograd
saved for backward in one step. The step times and latencies are timed in alternation across the four
(ABCD ABCD ...), so the differences are side by side. One table, one CSV, one PNG.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
from typing import Dict, List, Optional

import torch

from adapterkern.backends import SINGLE

from . import common, models, timing
from .models import add_adapters, add_lora, bert_model, merge_lora
from .plot import MATPLOTLIB_MISSING, have_matplotlib, plot_bars
from .report import append_csv, read_csv

COLUMNS = [
    *common.PROVENANCE, "transformers", "malloc", "dtype", "layers", "batch", "seq", "config", "backend",
    "trainable_params", "trainable_pct", "checkpoint_MiB", "train_step_ms", "train_step_iqr_ms", "peak_mem_MiB",
    "mem_method", "infer_ms", "infer_iqr_ms",
]
CONFIGS = ("full fine-tuning", "eager adapters", "fused adapters", "LoRA (merged for inference)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adapterkern.bench tradeoffs", description=__doc__.splitlines()[0])
    common.add_size_args(p, quick="default; on CPU: 2 layers, batch 2x128",
                         full="12 layers; batch 32x512 on GPU, 8x128 on CPU")
    p.add_argument("--layers", type=int, help="encoder layers (default 12; CPU --quick 2)")
    p.add_argument("--batch", help="BxS (default GPU 32x512, CPU 2x128 quick / 8x128 full)")
    p.add_argument("--reduction-factor", type=int, default=16)
    p.add_argument("--png", help="PNG path (default: the CSV path with .png; needs matplotlib)")
    common.add_subcommand_args(p, "tradeoffs", rounds=None,
                               rounds_help="alternating timing rounds (default 5 quick, 10 full)")
    return p


def _count(params) -> int:
    """Number of elements of ``params``."""
    return sum(p.numel() for p in params)


def _checkpoint_mib(state: Dict[str, object]) -> float:
    """Size in MiB of ``torch.save(state)`` on disk."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.pt")
        torch.save(state, path)
        return os.path.getsize(path) / 2**20


def main(argv: Optional[List[str]] = None) -> int:
    """``tradeoffs``: per configuration, trainable parameters, checkpoint MiB, training step ms, training
    memory MiB and inference ms; one table, one CSV, one PNG (when matplotlib is installed)."""
    args = parser().parse_args(argv)
    run = common.start(args, "tradeoffs", requires=models.transformers_reason)
    if run is None:
        return 0
    import transformers  # present: models.transformers_reason() said so

    device, dtype, env = run.device, run.dtype, run.env
    cpu = device.type == "cpu"
    layers = args.layers or (2 if cpu and not args.full else 12)
    batch_text = args.batch or ("32x512" if not cpu else ("8x128" if args.full else "2x128"))
    b, s = (int(v) for v in batch_text.lower().split("x"))
    rounds = args.rounds or (10 if args.full else 5)
    backend = run.backend(args.backend, SINGLE)

    torch.manual_seed(0)
    base = bert_model(layers, device, dtype)
    d = base.config.hidden_size
    r = max(1, d // args.reduction_factor)
    backbone_params = _count(base.parameters())
    adapter_params_per_layer = 2 * d * r + r + d
    lora_rank = max(1, round(adapter_params_per_layer / (2 * 2 * d)))  # q and v: rank * (d_in + d_out) each
    run.say(f"BERT-base-sized, {layers} layers ({backbone_params / 1e6:.1f}M params), batch {b}x{s}, "
            f"{common.dtype_name(dtype)} on {env['device']}; adapters r={r}, LoRA rank {lora_rank} on q,v; "
            f"fused backend {backend}")

    def build(config: str):
        model = copy.deepcopy(base)
        if config == "full fine-tuning":
            trainable = list(model.parameters())
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            if config == "LoRA (merged for inference)":
                trainable = [p for m in add_lora(model, lora_rank) for p in (m.lora_a, m.lora_b)]
            else:
                mods = add_adapters(model, "eager" if config == "eager adapters" else "fused", r, "relu", backend)
                trainable = [p for m in mods for p in m.parameters()]
            for p in trainable:
                p.requires_grad_(True)
        model.train()
        return model, trainable

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, base.config.vocab_size, (b, s), generator=gen).to(device)

    def step_fn(model, trainable):
        opt = torch.optim.AdamW(trainable, lr=1e-4)

        def step():
            out = model(input_ids=ids).last_hidden_state
            loss = out.float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, opt

    def infer_fn(model):
        def f():
            with torch.inference_mode():
                return model(input_ids=ids).last_hidden_state
        return f

    results: Dict[str, Dict[str, object]] = {c: {} for c in CONFIGS}
    built, steps, opts = {}, {}, {}
    for config in CONFIGS:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)  # the other configurations' models stay resident
        model, trainable = build(config)
        n_train = _count(trainable)
        state = model.state_dict() if config == "full fine-tuning" else {
            n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        res = results[config]
        res.update(trainable_params=n_train, trainable_pct=100.0 * n_train / backbone_params,
                   checkpoint_MiB=_checkpoint_mib(state), backend=backend if config == "fused adapters" else "")
        step, opt = step_fn(model, trainable)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(2):
                step()
            torch.cuda.synchronize(device)
            res.update(peak_mem_MiB=(torch.cuda.max_memory_allocated(device) - before) / 2**20,
                       mem_method="cuda max_memory_allocated over 2 steps, less what was allocated before "
                                  "this configuration's model was built")
        else:
            saved: Dict[int, int] = {}

            def pack(t):
                try:
                    st = t.untyped_storage()
                    saved[st.data_ptr()] = st.nbytes()
                except Exception:  # noqa: BLE001
                    pass
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                step()
            step()
            param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
            opt_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                            if torch.is_tensor(v))
            param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
            act_bytes = sum(n for ptr, n in saved.items() if ptr not in param_ptrs)
            res.update(peak_mem_MiB=(param_bytes + grad_bytes + opt_bytes + act_bytes) / 2**20,
                       mem_method="accounted: params+grads+AdamW state+saved activations")
        built[config], steps[config], opts[config] = model, step, opt
    # the fused adapters start from the eager adapters' weights (copied after build for an equal start)
    eager_ad = [m for m in built["eager adapters"].modules() if type(m).__name__ == "EagerAdapter"]
    fused_ad = [m for m in built["fused adapters"].modules() if type(m).__name__ == "EagerAdapter"]
    with torch.no_grad():
        for e, f in zip(eager_ad, fused_ad):
            f.load_state_dict(e.state_dict())

    run.say(f"timing training steps ({rounds} alternating rounds) ...")
    block_s = args.block_ms / 1e3
    train_t = timing.interleaved([steps[c] for c in CONFIGS], device, rounds=rounds, min_block_s=block_s)
    for c, t in zip(CONFIGS, train_t):
        results[c].update(train_step_ms=t.median_s * 1e3, train_step_iqr_ms=t.iqr_s * 1e3)
    del opts, steps
    for model in built.values():
        model.eval()
    merge_lora(built["LoRA (merged for inference)"])
    run.say(f"timing inference ({rounds} alternating rounds) ...")
    infer_t = timing.interleaved([infer_fn(built[c]) for c in CONFIGS], device, rounds=rounds, min_block_s=block_s)
    for c, t in zip(CONFIGS, infer_t):
        results[c].update(infer_ms=t.median_s * 1e3, infer_iqr_ms=t.iqr_s * 1e3)

    rows = [run.row(transformers=transformers.__version__, layers=layers, batch=b, seq=s, config=c, **results[c])
            for c in CONFIGS]
    path = append_csv(run.csv, rows, COLUMNS)
    status = run.finish(format_table(rows), rows, path, f"peak memory is {rows[0]['mem_method']}",
                        transformers=transformers.__version__)
    if have_matplotlib():
        written = [r for r in read_csv(path) if r["run_id"] == run.run_id]
        png = plot_bars(written, "config", [
            ("trainable_pct", "trainable params (% of backbone)", True),
            ("checkpoint_MiB", "checkpoint on disk (MiB)", True),
            ("train_step_ms", "training step (ms)"),
            ("peak_mem_MiB", "training memory (MiB)"),
            ("infer_ms", "inference latency (ms)"),
        ], f"BERT-base-sized, {layers} layers, batch {b}x{s}, {rows[0]['dtype']}, {env['device']}",
            common.png_path(path, args.png))
        print(f"wrote {png}")
    else:
        print(f"note: {MATPLOTLIB_MISSING}, no PNG drawn")
    return status


def format_table(rows: List[Dict[str, object]]) -> str:
    """One line per configuration; times as median ± IQR."""
    header = ["config", "trainable", "% of backbone", "checkpoint MiB", "train step ms", "train mem MiB",
              "inference ms"]
    cells = [[
        str(r["config"]) + (f" ({r['backend']})" if r["backend"] else ""),
        f"{int(r['trainable_params']):,}", f"{float(r['trainable_pct']):.2f}%", f"{float(r['checkpoint_MiB']):,.2f}",
        f"{float(r['train_step_ms']):,.1f} ± {float(r['train_step_iqr_ms']):,.1f}",
        f"{float(r['peak_mem_MiB']):,.0f}",
        f"{float(r['infer_ms']):,.2f} ± {float(r['infer_iqr_ms']):,.2f}",
    ] for r in rows]
    return common.text_table(header, cells, left=1) + "\n(± is the IQR; times are medians)"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
