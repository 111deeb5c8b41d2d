"""load_adapterhub / save_adapterhub against files made by the real AdapterHub ``adapters`` library.

The fixtures are made by tests/adapterhub_fixtures/generate.py in ``.venv-adapterhub`` (transformers
4.57 and the library), once per checkout state of that script, into build/ (ignored): tiny random-weight
BERT / RoBERTa / GPT-2 / Llama models, every supported config with random weights, both weight formats,
and the library's outputs on fixed inputs. Here (the newest transformers, no library) each loads into
the same base model and gives those outputs; what cannot be expressed is refused before the model changes;
save_adapterhub's files are read back by the library itself, in its environment.
"""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import load_file  # noqa: E402

import adapterkern as ak  # noqa: E402

from test_integrations_all_or_nothing import assert_unchanged, snapshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "tests" / "adapterhub_fixtures" / "generate.py"
LIBRARY_PYTHON = ROOT / ".venv-adapterhub" / "bin" / "python"
MODEL_CLASSES = {"bert": "BertModel", "roberta": "RobertaModel", "gpt2": "GPT2Model", "llama": "LlamaModel"}
TOL = 1e-5  # float32, against the library's float32 outputs (the bound)
# config directory -> "loads", or the words of the refusal
EXPECTED = {
    "seq_bn": "loads", "double_seq_bn": "loads", "custom_houlsby": "loads",
    "par_bn": {"bert": "loads", "roberta": "loads", "gpt2": "pre-LN model", "llama": "pre-LN model"},
    "scaled_par_bn": {"bert": "loads", "roberta": "loads", "gpt2": "pre-LN model", "llama": "pre-LN model"},
    "custom_par": {"bert": "loads", "roberta": "loads", "gpt2": "pre-LN model", "llama": "pre-LN model"},
    "mam": {"bert": "loads", "roberta": "loads", "gpt2": "pre-LN model", "llama": "pre-LN model"},
    "custom_seq": "original_ln_after=false", "custom_post_add": "residual_before_ln='post_add'",
}


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The generated fixtures (made once per version of the generator; a skip where the library's
    environment is missing, a failure under ADAPTERKERN_REQUIRE_ADAPTERHUB_VENV=1, as in make test)."""
    if not LIBRARY_PYTHON.is_file():
        why = f"{LIBRARY_PYTHON} not found: the adapters library's environment makes the fixtures (make test creates it)"
        if os.environ.get("ADAPTERKERN_REQUIRE_ADAPTERHUB_VENV") == "1":
            pytest.fail(why)
        pytest.skip(why)
    digest = hashlib.sha256(GENERATOR.read_bytes()).hexdigest()[:12]
    target = ROOT / "build" / f"adapterhub-fixtures-{digest}"
    if not (target / "index.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".fixtures-"))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([str(LIBRARY_PYTHON), str(GENERATOR), str(work / "out")], capture_output=True, text=True,
                              env=env, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        try:
            os.replace(work / "out", target)  # atomic: a parallel worker that got there first wins
        except OSError:
            assert (target / "index.json").is_file()
        shutil.rmtree(work, ignore_errors=True)
    return target


def _fixture_dirs(root: Path):
    index = json.loads((root / "index.json").read_text())
    return [d for d in index["fixtures"] if d.split("/")[1] in EXPECTED]


def _base(root: Path, family: str, head_labels: int = 0):
    path = root / family / "base"
    if head_labels:
        return transformers.BertForSequenceClassification.from_pretrained(path, num_labels=head_labels,
                                                                           attn_implementation="eager").eval()
    return getattr(transformers, MODEL_CLASSES[family]).from_pretrained(path, attn_implementation="eager").eval()


def _run(model, fixture: dict):
    ids, mask = torch.tensor(fixture["input_ids"]), torch.tensor(fixture["attention_mask"])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if fixture["output"] == "logits" else out.last_hidden_state


def _close(out, expected, mask):
    keep = mask.bool() if out.dim() == 3 else torch.ones(out.shape[0], dtype=torch.bool)
    diff = (out[keep] - expected[keep]).abs().max() / expected[keep].abs().max()
    return diff.item()


def test_every_fixture_loads_with_the_librarys_numbers_or_is_refused(fixtures):
    loaded, refused = [], []
    for rel in _fixture_dirs(fixtures):
        family, config_name, _ = rel.split("/")
        directory = fixtures / rel
        fixture = json.loads((directory / "fixture.json").read_text())
        expected = EXPECTED[config_name]
        expected = expected[family] if isinstance(expected, dict) else expected
        model = _base(fixtures, family)
        before = snapshot(model)
        if expected == "loads":
            result = ak.load_adapterhub(model, directory)
            assert result.name == fixture["adapter_name"]
            out = _run(model, fixture)
            diff = _close(out, load_file(str(directory / "expected_outputs.safetensors"))["last_hidden_state"],
                          torch.tensor(fixture["attention_mask"]))
            assert diff <= TOL, (rel, diff)
            loaded.append(rel)
        else:
            with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")) as info:
                ak.load_adapterhub(model, directory)
            assert "the model was not changed" in str(info.value), rel
            assert_unchanged(model, before)
            assert ak.list_adapters(model) == []
            refused.append(rel)
    families = {r.split("/")[0] for r in loaded}
    assert families == {"bert", "roberta", "gpt2", "llama"}
    assert len(loaded) >= 30 and len(refused) >= 10, (len(loaded), len(refused))
    assert {r.split("/")[2] for r in loaded} == {"bin", "safetensors"}


def test_seq_bn_is_not_adapterkerns_plain_pfeiffer(fixtures):
    """The library's default (seq_bn) adapts the stream after the residual add; loading it as the plain
    pfeiffer placement would give other numbers: the test above would not tell the two apart otherwise."""
    directory = fixtures / "bert" / "seq_bn" / "safetensors"
    fixture = json.loads((directory / "fixture.json").read_text())
    model = _base(fixtures, "bert")
    result = ak.load_adapterhub(model, directory)
    assert result.config.original_ln_before is True and result.config.placement == "pfeiffer"
    expected = load_file(str(directory / "expected_outputs.safetensors"))["last_hidden_state"]
    other = _base(fixtures, "bert")
    ak.add_adapter(other, "seq_bn", ak.AdapterConfig.pfeiffer(bottleneck_size=2))
    other.load_state_dict(model.state_dict(), strict=False)
    for name, p in other.named_parameters():
        if "bottleneck_adapters" in name:
            src = dict(model.named_parameters())[name.replace(".output.dense.", ".output.LayerNorm.")]
            with torch.no_grad():
                p.copy_(src)
    assert _close(_run(other, fixture), expected, torch.tensor(fixture["attention_mask"])) > 1e-2


def test_a_loaded_adapter_trains(fixtures):
    directory = fixtures / "llama" / "seq_bn" / "bin"
    model = _base(fixtures, "llama")
    ak.load_adapterhub(model, directory)
    ak.train_adapter(model, "seq_bn")
    model.train()
    out = model(input_ids=torch.tensor([[5, 17, 42, 8]])).last_hidden_state
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 4 and all(".bottleneck_adapters.seq_bn." in n for n in grads)  # 2 layers x (down, up) x (w, b)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(grads[n].abs().sum() > 0 for n in grads if n.endswith("adapter_up.bias"))  # (r = 2: a ReLU may be dead)


def test_the_classification_head_maps_onto_bert_for_sequence_classification(fixtures):
    directory = fixtures / "bert" / "head" / "safetensors"
    fixture = json.loads((directory / "fixture.json").read_text())
    model = _base(fixtures, "bert", head_labels=3)
    result = ak.load_adapterhub(model, directory)
    assert result.head.startswith("loaded")
    diff = _close(_run(model, fixture), load_file(str(directory / "expected_outputs.safetensors"))["logits"], None)
    assert diff <= TOL
    bare = _base(fixtures, "bert")
    assert ak.load_adapterhub(bare, directory).head.startswith("not loaded")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_is_refused_and_never_run(fixtures, tmp_path):
    directory = tmp_path / "hostile"
    shutil.copytree(fixtures / "bert" / "seq_bn" / "bin", directory)
    marker = tmp_path / "pwned"
    weights = load_file(str(fixtures / "bert" / "seq_bn" / "safetensors" / "adapter.safetensors"))
    with open(directory / "pytorch_adapter.bin", "wb") as f:
        pickle.dump({**weights, "x": _Payload(marker)}, f)
    model = _base(fixtures, "bert")
    before = snapshot(model)
    with pytest.raises(ValueError, match="weights_only"):
        ak.load_adapterhub(model, directory)
    assert not marker.exists() and ak.list_adapters(model) == []
    assert_unchanged(model, before)


@pytest.mark.parametrize("damage", ["truncate-bin", "truncate-safetensors", "shape", "extra-key", "missing-key"])
def test_damaged_files_leave_the_model_unchanged(fixtures, tmp_path, damage):
    fmt = "safetensors" if damage != "truncate-bin" else "bin"
    directory = tmp_path / "damaged"
    shutil.copytree(fixtures / "gpt2" / "double_seq_bn" / fmt, directory)
    name = "adapter.safetensors" if fmt == "safetensors" else "pytorch_adapter.bin"
    path = directory / name
    if damage.startswith("truncate"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        from safetensors.torch import save_file

        tensors = load_file(str(path))
        key = sorted(tensors)[0]
        if damage == "shape":
            tensors[key] = torch.zeros(tuple(s + 1 for s in tensors[key].shape))
        elif damage == "extra-key":
            tensors["h.0.output_adapters.adapters.double_seq_bn.gate.weight"] = torch.zeros(1, 32)
        else:
            del tensors[key]
        save_file(tensors, str(path))
    model = _base(fixtures, "gpt2")
    before = snapshot(model)
    with pytest.raises(ValueError, match="the model was not changed"):
        ak.load_adapterhub(model, directory)
    assert ak.list_adapters(model) == []
    assert_unchanged(model, before)


_LIBRARY_READS = r"""
import json, sys, torch, adapters, transformers
from safetensors.torch import save_file
classes = {"bert": "BertModel", "roberta": "RobertaModel", "gpt2": "GPT2Model", "llama": "LlamaModel"}
for job in json.load(open(sys.argv[1])):
    model = getattr(transformers, classes[job["family"]]).from_pretrained(job["base"], attn_implementation="eager").eval()
    adapters.init(model)
    name = model.load_adapter(job["directory"], use_safetensors=True)
    model.set_active_adapters(name)
    fixture = json.load(open(job["fixture"]))
    with torch.no_grad():
        y = model(input_ids=torch.tensor(fixture["input_ids"]), attention_mask=torch.tensor(fixture["attention_mask"]))
    save_file({"last_hidden_state": y.last_hidden_state.contiguous()}, job["out"])
"""


def test_save_adapterhub_is_read_back_by_the_library(fixtures, tmp_path):
    """Load each mappable kind, save it back with save_adapterhub, and let the library itself (its own
    environment, transformers 4.57; one process for every case) load the files and compute: the library's
    original outputs."""
    cases = [("bert", "seq_bn"), ("roberta", "custom_par"), ("gpt2", "custom_houlsby"), ("llama", "seq_bn"),
             ("bert", "double_seq_bn")]
    jobs = []
    for family, config_name in cases:
        source = fixtures / family / config_name / "bin"
        model = _base(fixtures, family)
        ak.load_adapterhub(model, source)
        saved = ak.save_adapterhub(model, config_name, tmp_path / f"{family}-{config_name}")
        meta = json.loads((saved / "adapter_config.json").read_text())
        assert meta["version"].startswith("adapters.") and meta["name"] == config_name
        jobs.append({"family": family, "base": str(fixtures / family / "base"), "directory": str(saved),
                     "fixture": str(source / "fixture.json"), "out": str(tmp_path / f"{family}-{config_name}.safetensors"),
                     "expected": str(source / "expected_outputs.safetensors")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(LIBRARY_PYTHON), "-c", _LIBRARY_READS, str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    for (family, config_name), job in zip(cases, jobs):
        fixture = json.loads(Path(job["fixture"]).read_text())
        diff = _close(load_file(job["out"])["last_hidden_state"], load_file(job["expected"])["last_hidden_state"],
                      torch.tensor(fixture["attention_mask"]))
        assert diff <= TOL, (family, config_name, diff)


def test_save_adapterhub_refuses_what_the_library_cannot_hold(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=64, vocab_size=100)
    model = transformers.LlamaModel(cfg).eval()
    ak.add_adapter(model, "par", ak.AdapterConfig.parallel())
    with pytest.raises(ValueError, match="pre-LN"):
        ak.save_adapterhub(model, "par", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["fusion", "fusion_double_seq_bn"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_fusions_load_with_the_librarys_numbers(fixtures, kind, fmt):
    root = fixtures / "bert" / kind / fmt
    model = _base(fixtures, "bert")
    for adapter in ("a", "b"):
        ak.load_adapterhub(model, root / adapter, set_active=False)
    name = ak.load_adapterhub_fusion(model, root / "fusion")
    assert name == "a_b" and ak.get_active_adapter(model) == "a_b"
    fixture = json.loads((root / "fusion" / "fixture.json").read_text())
    expected = load_file(str(root / "fusion" / "expected_outputs.safetensors"))["last_hidden_state"]
    assert _close(_run(model, fixture), expected, torch.tensor(fixture["attention_mask"])) <= TOL
    alone = _base(fixtures, "bert")
    ak.load_adapterhub(alone, root / "a")
    before = snapshot(alone)
    with pytest.raises(ValueError, match=r"load those adapters first"):
        ak.load_adapterhub_fusion(alone, root / "fusion")
    assert_unchanged(alone, before)


def test_a_static_head_loads_into_the_same_model_class(fixtures, tmp_path):
    """A static-head model's head file (FORMAT.md 7: "config": null, the weights outside the base model)."""
    directory = tmp_path / "static"
    shutil.copytree(fixtures / "bert" / "seq_bn" / "safetensors", directory)
    head = {"classifier.weight": torch.randn(3, 32), "classifier.bias": torch.randn(3)}
    from safetensors.torch import save_file

    save_file(head, str(directory / "model_head.safetensors"))
    (directory / "head_config.json").write_text(json.dumps(
        {"config": None, "name": None, "num_labels": 3, "model_class": "BertForSequenceClassification",
         "model_type": "bert", "hidden_size": 32, "version": "adapters.1.3.0"}))
    model = _base(fixtures, "bert", head_labels=3)
    result = ak.load_adapterhub(model, directory)
    assert result.head.startswith("loaded") and torch.equal(model.classifier.weight, head["classifier.weight"])
    assert ak.load_adapterhub(_base(fixtures, "bert"), directory).head.startswith("not loaded")
    wrong = _base(fixtures, "bert", head_labels=2)
    before = snapshot(wrong)
    with pytest.raises(ValueError, match=r"classifier\.(weight|bias).* has \(2"):
        ak.load_adapterhub(wrong, directory)
    assert ak.list_adapters(wrong) == []
    assert_unchanged(wrong, before)


def test_copies_of_the_shared_prefix_mlp_must_agree(fixtures, tmp_path):
    directory = tmp_path / "mam"
    shutil.copytree(fixtures / "bert" / "mam" / "bin", directory)
    tensors = torch.load(directory / "pytorch_adapter.bin", weights_only=True)
    key = next(k for k in tensors if k.startswith("encoder.layer.1.") and k.endswith("wte.weight"))
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors[key] += 1.0
    torch.save(tensors, directory / "pytorch_adapter.bin")
    model = _base(fixtures, "bert")
    before = snapshot(model)
    with pytest.raises(ValueError, match="copies of one shared tensor"):
        ak.load_adapterhub(model, directory)
    assert_unchanged(model, before)


def test_a_hub_id_goes_through_snapshot_download(fixtures, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(fixtures / "bert" / "double_seq_bn" / "safetensors")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    result = ak.load_adapterhub(_base(fixtures, "bert"), "AdapterHub/bert-tiny-double_seq_bn")
    assert calls and calls[0][0] == "AdapterHub/bert-tiny-double_seq_bn" and "adapter_config.json" in calls[0][1]
    assert result.name == "double_seq_bn"
