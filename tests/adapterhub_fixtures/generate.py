"""Make AdapterHub test fixtures with the REAL ``adapters`` library.

Run in the library's environment (it pins transformers 4.x)::

    .venv-adapterhub/bin/python tests/adapterhub_fixtures/generate.py OUTDIR

For each tiny random-weight base model (BERT, RoBERTa, GPT-2, Llama: hidden 32, 2 layers, 2 heads,
intermediate 64, vocab 100, dropout 0, fixed seeds) it writes ``OUTDIR/<family>/base`` (the bare
``*Model``, ``save_pretrained`` in safetensors) and, for each adapter config, the library's
``save_adapter`` output twice: ``OUTDIR/<family>/<config>/bin`` (the default: ``pytorch_adapter.bin``)
and ``OUTDIR/<family>/<config>/safetensors`` (``use_safetensors=True``: ``adapter.safetensors``).
Every adapter parameter holds random, non-identity values. Beside the library's files each
directory gets ``expected_outputs.safetensors`` (the library's output on the fixed input ids:
``last_hidden_state``, or ``logits`` for the head model; float32) and ``fixture.json`` (what was
saved and how to reproduce the output). BERT also gets AdapterFusions over two ``seq_bn`` adapters
(``bert/fusion``) and over two ``double_seq_bn`` adapters (``bert/fusion_double_seq_bn``), and an
``AutoAdapterModel`` with a classification head saved with its adapter (``bert/head``).
``OUTDIR/index.json`` lists every fixture directory, every file (size, SHA-256) and the saves the
library fails: ``use_safetensors=True`` for ``mam`` (prefix tuning) raises in the library (its prefix
tensors are shared between the pool and every layer), so ``<family>/mam`` has ``bin`` only.
See FORMAT.md for what the files hold. The output is byte-identical from run to run.

The fixtures are not committed: tests generate them (a few seconds) or skip without the library.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB, POSITIONS = 32, 2, 2, 64, 100, 64
FAMILIES = ("bert", "roberta", "gpt2", "llama")
PAD_ID = {"bert": 0, "roberta": 1, "gpt2": 0, "llama": 0}
BASE_SEED = {"bert": 1, "roberta": 2, "gpt2": 3, "llama": 4}
# Two sequences; the second is right-padded (attention_mask 0 on its last two positions).
TOKENS = [[5, 17, 42, 8, 63, 21], [9, 33, 71, 12, None, None]]
ATTN_IMPLEMENTATION = "eager"
OUR_FILES = ("expected_outputs.safetensors", "fixture.json")


def input_ids(family: str):
    ids = [[PAD_ID[family] if t is None else t for t in row] for row in TOKENS]
    mask = [[0 if t is None else 1 for t in row] for row in TOKENS]
    return ids, mask


def base_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=PAD_ID[family])
    if family == "bert":
        cfg = tf.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS, type_vocab_size=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    elif family == "roberta":
        cfg = tf.RobertaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS, type_vocab_size=1,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, bos_token_id=0, eos_token_id=2,
                               **common)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE, n_positions=POSITIONS,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=3, eos_token_id=3, **common)
    elif family == "llama":
        # num_key_value_heads=1: grouped-query attention, so prefix-tuning tensors have H_kv != H.
        cfg = tf.LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             num_key_value_heads=1, intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS,
                             attention_dropout=0.0, bos_token_id=3, eos_token_id=4, **common)
    else:
        raise ValueError(family)
    cfg._attn_implementation = ATTN_IMPLEMENTATION
    return cfg


def base_class(family: str):
    import transformers as tf

    return {"bert": tf.BertModel, "roberta": tf.RobertaModel, "gpt2": tf.GPT2Model, "llama": tf.LlamaModel}[family]


def adapter_configs(family: str):
    """name -> (the config passed to add_adapter, a one-line description for fixture.json)."""
    from adapters import BnConfig, DoubleSeqBnConfig, MAMConfig, ParBnConfig, PrefixTuningConfig, SeqBnConfig

    configs = {
        "seq_bn": ("seq_bn", "the library's 'seq_bn' string (Pfeiffer): SeqBnConfig() defaults"),
        "double_seq_bn": ("double_seq_bn", "the library's 'double_seq_bn' string (Houlsby): DoubleSeqBnConfig() defaults"),
        "par_bn": ("par_bn", "the library's 'par_bn' string: ParBnConfig() defaults (scaling 4.0, mam_adapter init)"),
        "scaled_par_bn": ("scaled_par_bn", "the library's 'scaled_par_bn' string: ParBnConfig(scaling='learned')"),
        # MAMConfig() uses prefix_length 30 and bottleneck_size 800 (~0.5 MB per tiny model); the same
        # structure, smaller, keeps the fixtures small.
        "mam": (
            MAMConfig(PrefixTuningConfig(prefix_length=4, bottleneck_size=16), ParBnConfig()),
            "MAMConfig(PrefixTuningConfig(prefix_length=4, bottleneck_size=16), ParBnConfig()): 'mam' with a smaller prefix",
        ),
        # Non-default options: reduction factor, activation (an alias: gelu_new; gelu, which a config
        # without "version" would read as gelu_new), learned / channel scaling, leave_out, init_weights.
        "custom_houlsby": (
            DoubleSeqBnConfig(reduction_factor=4, non_linearity="gelu_new", scaling="learned", leave_out=[0]),
            "DoubleSeqBnConfig(reduction_factor=4, non_linearity='gelu_new', scaling='learned', leave_out=[0])",
        ),
        "custom_par": (
            ParBnConfig(reduction_factor=4, non_linearity="gelu", scaling="channel", leave_out=[1], init_weights="bert"),
            "ParBnConfig(reduction_factor=4, non_linearity='gelu', scaling='channel', leave_out=[1], init_weights='bert')",
        ),
        # The LayerNorm / residual variants (AdapterPlus-style: the adapter after the sub-layer's own
        # residual add and LayerNorm), a per-layer reduction factor, the "swish" alias, a float scaling:
        "custom_seq": (
            SeqBnConfig(mh_adapter=True, original_ln_before=True, original_ln_after=False, residual_before_ln=False,
                        reduction_factor={"1": 8, "default": 4}, non_linearity="swish", scaling=0.5),
            "SeqBnConfig(mh_adapter=True, original_ln_before=True, original_ln_after=False, residual_before_ln=False, "
            "reduction_factor={'1': 8, 'default': 4}, non_linearity='swish', scaling=0.5)",
        ),
    }
    if family in ("bert", "roberta"):
        # residual_before_ln="post_add" reads the model's LayerNorm: the library fails on GPT-2 / Llama
        # (pre-LN blocks pass no LayerNorm: UnboundLocalError in Adapter.pre_forward).
        configs["custom_post_add"] = (
            BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=8, non_linearity="relu",
                     original_ln_before=True, original_ln_after=True, residual_before_ln="post_add"),
            "BnConfig(output_adapter=True, reduction_factor=8, non_linearity='relu', original_ln_before=True, "
            "original_ln_after=True, residual_before_ln='post_add')",
        )
    return configs


def model_name(family: str) -> str:
    return f"adapterkern-fixtures/tiny-{family}"


def seed_of(key: str) -> int:
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def randomize(model, selectors, seed: int) -> int:
    """Overwrite every parameter whose name a selector accepts with fixed-seed random values (the
    library zero-inits some up-projections: mam_adapter init; a fresh fusion value matrix is ~identity).
    Returns the number of tensors changed."""
    g = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if not any(sel(name) for sel in selectors):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "scaling":
                value = torch.rand(p.shape, generator=g) + 0.5  # U(0.5, 1.5)
            elif leaf == "bias":
                value = torch.randn(p.shape, generator=g) * 0.1
            elif "norm" in name.lower() and leaf == "weight":
                value = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            elif ".wte." in name:
                value = torch.randn(p.shape, generator=g)
            else:
                value = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(value.to(p.dtype))
            changed += 1
    return changed


def adapter_selector(model, name):
    from adapters.loading import AdapterLoader

    return AdapterLoader(model).filter_func(name)


def run(model, family: str, head: bool = False) -> dict:
    ids, mask = input_ids(family)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if head:
        return {"logits": out.logits.float().contiguous()}
    return {"last_hidden_state": out.last_hidden_state.float().contiguous()}


def write_expected(directory: Path, outputs: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in outputs.items()}, str(directory / "expected_outputs.safetensors"))


def versions() -> dict:
    import adapters
    import safetensors
    import transformers

    return {
        "adapters_version": adapters.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "safetensors_version": safetensors.__version__,
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def fixture_record(outdir: Path, directory: Path, family: str, **fields) -> dict:
    ids, mask = input_ids(family)
    record = {
        "family": family,
        "base": os.path.relpath(outdir / family / "base", directory),
        "input_ids": ids,
        "attention_mask": mask,
        "attn_implementation": ATTN_IMPLEMENTATION,
        # what the library (or save_pretrained) wrote here; expected_outputs.safetensors and fixture.json are ours
        "library_files": sorted(p.name for p in directory.iterdir() if p.name not in OUR_FILES),
        **versions(),
        **{k: v for k, v in fields.items() if v is not None},
    }
    write_json(directory / "fixture.json", record)
    return record


class Fixtures:
    def __init__(self, outdir: Path):
        self.outdir = outdir
        self.index = []
        self.failures = {}  # fixture directory -> the library's error saving it

    def fresh(self, family: str):
        """The saved base model, reloaded, with adapters.init applied (eval mode)."""
        import adapters

        model = base_class(family).from_pretrained(self.outdir / family / "base", attn_implementation=ATTN_IMPLEMENTATION)
        model.config.name_or_path = model_name(family)  # saved as "model_name": the same in every OUTDIR
        adapters.init(model)
        return model.eval()

    def save_both(self, save, directory: Path):
        """save(dir, use_safetensors) into directory/bin and directory/safetensors; returns the
        (format, dir) pairs saved. A safetensors save the library fails (prefix tuning: its tensors are
        shared between the pool and every layer) is recorded in index.json and its partial directory
        (the config is written before the weights) removed."""
        dirs = []
        for fmt, safe in (("bin", False), ("safetensors", True)):
            d = directory / fmt
            d.parent.mkdir(parents=True, exist_ok=True)  # the library's save uses os.mkdir (one level)
            try:
                save(d, safe)
            except RuntimeError as exc:
                if not safe:
                    raise
                shutil.rmtree(d, ignore_errors=True)
                message = " ".join(str(exc).split())
                self.failures[str(d.relative_to(self.outdir))] = {
                    "error": f"{type(exc).__name__}: {message.split(': [')[0].split('. ')[0]}",
                    "names": sorted(set(re.findall(r"'([^']+)'", message))),  # the shared tensors' keys (sorted: stable)
                }
                continue
            dirs.append((fmt, d))
        return dirs

    def base(self, family: str) -> torch.Tensor:
        torch.manual_seed(BASE_SEED[family])
        model = base_class(family)(base_config(family)).eval()
        d = self.outdir / family / "base"
        model.save_pretrained(d, safe_serialization=True)
        outputs = run(model, family)
        write_expected(d, outputs)
        fixture_record(self.outdir, d, family, kind="base", model_class=type(model).__name__, output="last_hidden_state")
        self.index.append(str(d.relative_to(self.outdir)))
        return outputs["last_hidden_state"]

    def adapter(self, family: str, config_name: str, config, description: str, base_out: torch.Tensor):
        name = config_name  # the adapter's name in the model (and in every saved key)
        model = self.fresh(family)
        model.add_adapter(name, config=config, set_active=True)
        seed = seed_of(f"{family}/{config_name}")
        changed = randomize(model, [adapter_selector(model, name)], seed)
        assert changed > 0, (family, config_name)
        model.set_active_adapters(name)
        outputs = run(model, family)
        diff = (outputs["last_hidden_state"] - base_out).abs().max().item()
        assert diff > 1e-3, f"{family}/{config_name}: the adapter does not change the output ({diff})"
        for fmt, d in self.save_both(lambda d, safe: model.save_adapter(str(d), name, use_safetensors=safe),
                                     self.outdir / family / config_name):
            write_expected(d, outputs)
            fixture_record(self.outdir, d, family, kind="adapter", model_class=type(model).__name__,
                           config_name=config_name, config_description=description, adapter_name=name,
                           active_setup=name, weights_format=fmt, weights_seed=seed, output="last_hidden_state")
            self.index.append(str(d.relative_to(self.outdir)))

    def fusion(self, family: str = "bert", adapter_config: str = "seq_bn", dirname: str = "fusion"):
        """Two adapters 'a', 'b' of ``adapter_config`` and a dynamic AdapterFusion over them, saved as
        a/, b/ (each with its own output, alone) and fusion/ (the output with Fuse('a', 'b') active)."""
        from adapters.composition import Fuse

        model = self.fresh(family)
        model.add_adapter("a", config=adapter_config)
        model.add_adapter("b", config=adapter_config)
        model.add_adapter_fusion(Fuse("a", "b"))
        fusion_name = "a,b"
        selectors = [adapter_selector(model, "a"), adapter_selector(model, "b"),
                     lambda n: f"adapter_fusion_layer.{fusion_name}." in n]
        seed = seed_of(f"{family}/{dirname}")
        assert randomize(model, selectors, seed) > 0
        outs = {}
        for setup_name, setup in (("a", "a"), ("b", "b"), ("fusion", Fuse("a", "b"))):
            model.set_active_adapters(setup)
            outs[setup_name] = run(model, family)
        model.set_active_adapters(Fuse("a", "b"))
        description = (f"two {adapter_config} adapters 'a', 'b' and add_adapter_fusion(Fuse('a', 'b')) "
                       "(the default 'dynamic' AdapterFusionConfig), saved by save_adapter / save_adapter_fusion")
        for fmt, safe in (("bin", False), ("safetensors", True)):
            root = self.outdir / family / dirname / fmt
            root.mkdir(parents=True, exist_ok=True)
            model.save_adapter(str(root / "a"), "a", use_safetensors=safe)
            model.save_adapter(str(root / "b"), "b", use_safetensors=safe)
            model.save_adapter_fusion(str(root / "fusion"), fusion_name, use_safetensors=safe)
            for sub, active in (("a", "a"), ("b", "b"), ("fusion", "Fuse('a', 'b')")):
                d = root / sub
                write_expected(d, outs[sub])
                fixture_record(self.outdir, d, family, kind="fusion" if sub == "fusion" else "adapter",
                               model_class=type(model).__name__, config_name=adapter_config,
                               config_description=description,
                               adapter_name=fusion_name if sub == "fusion" else sub,
                               adapter_names=["a", "b"] if sub == "fusion" else None,
                               requires=["../a", "../b"] if sub == "fusion" else None,
                               active_setup=active, weights_format=fmt, weights_seed=seed, output="last_hidden_state")
                self.index.append(str(d.relative_to(self.outdir)))

    def head(self, family: str = "bert"):
        """An AutoAdapterModel (flex heads) with a seq_bn adapter and a classification head of the same name."""
        import adapters

        model = adapters.AutoAdapterModel.from_pretrained(self.outdir / family / "base", attn_implementation=ATTN_IMPLEMENTATION)
        model.config.name_or_path = model_name(family)
        name = "cls"
        model.add_adapter(name, config="seq_bn")
        model.add_classification_head(name, num_labels=3)
        model.eval()
        selectors = [adapter_selector(model, name), lambda n: n.startswith(f"heads.{name}.")]
        seed = seed_of(f"{family}/head")
        assert randomize(model, selectors, seed) > 0
        model.set_active_adapters(name)
        outputs = run(model, family, head=True)
        for fmt, d in self.save_both(lambda d, safe: model.save_adapter(str(d), name, use_safetensors=safe),
                                     self.outdir / family / "head"):
            write_expected(d, outputs)
            fixture_record(self.outdir, d, family, kind="adapter+head", model_class=type(model).__name__,
                           config_name="seq_bn", config_description="AutoAdapterModel + add_adapter('cls', 'seq_bn') + "
                           "add_classification_head('cls', num_labels=3), saved by save_adapter (with_head=True)",
                           adapter_name=name, head_name=name, active_setup=name, weights_format=fmt, weights_seed=seed,
                           output="logits")
            self.index.append(str(d.relative_to(self.outdir)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="directory to write the fixtures to (created; must be empty or absent)")
    args = parser.parse_args(argv)
    outdir: Path = args.outdir
    if outdir.exists() and any(outdir.iterdir()):
        parser.error(f"{outdir} is not empty")
    outdir.mkdir(parents=True, exist_ok=True)

    import transformers

    transformers.logging.set_verbosity_error()
    # "There are adapters available but none are activated": logged by the ForwardContext set_active_adapters opens (reset_adapter).
    logging.getLogger("adapters").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    start = time.perf_counter()
    fx = Fixtures(outdir)
    for family in FAMILIES:
        base_out = fx.base(family)
        for config_name, (config, description) in adapter_configs(family).items():
            fx.adapter(family, config_name, config, description, base_out)
    fx.fusion("bert", "seq_bn", "fusion")
    fx.fusion("bert", "double_seq_bn", "fusion_double_seq_bn")
    fx.head("bert")

    files = sorted(p for p in outdir.rglob("*") if p.is_file())
    write_json(outdir / "index.json", {
        **versions(),
        "fixtures": fx.index,
        "library_failures": fx.failures,
        "files": {str(p.relative_to(outdir)): {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                  for p in files},
    })
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(fx.index)} fixture directories, {len(files)} files, {total / 1024:.0f} KiB to {outdir} "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
