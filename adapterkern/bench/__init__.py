"""Benchmarks for the bottleneck adapter ops: ``python -m adapterkern.bench [--quick|--full] [...]``.

* the grid (default command, :mod:`.grid`): every implementation side by side over (mode, T, d, r), with
  the memory floor measured in the same run; a table, a CSV (appended) and a PNG;
* ``layer``: adapter overhead inside a BERT-base encoder layer and a Llama decoder layer;
* ``inference``: whole models (BERT-base-sized, Llama-style) with a parallel / Pfeiffer adapter: no adapter vs
  eager vs adapterkern vs ``optimize_for_inference``, latency next to the adapters' FLOP share, generation tokens/s;
* ``tradeoffs``: full fine-tuning vs eager/fused adapters vs merged LoRA on one BERT-base-sized model;
* ``adapterdrop``: N task adapters at once with AdapterDrop's sharing vs N passes;
* ``multi``: many adapters in one launch (stack, heterogeneous batch, mix, fusion) vs Python loops;
* ``plot`` / ``table``: redraw the PNG or reprint the table from a grid CSV.

:mod:`.cli` maps each subcommand to its module; :mod:`.common` holds what they all share (options,
run set-up, provenance, tables, progress). Nothing here is imported by ``import adapterkern``;
matplotlib, tqdm, transformers and adapters are optional (each feature that needs one says so and skips).
"""
from .grid import GridConfig, floor_bytes, run_grid  # noqa: F401
from .report import COLUMNS, append_csv, format_table, read_csv  # noqa: F401
