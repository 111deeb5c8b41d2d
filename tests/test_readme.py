"""Every ```python block of README.md runs as written, top to bottom, in a fresh Python process on a CPU.

Each block is one test (id: its index among the python blocks and the heading above it), run as a
script in a subprocess: cwd an empty temp dir (which must stay empty: a block writes only under
``tempfile.mkdtemp()``, here inside the test's own temp dir), ``TRITON_INTERPRET=1``,
``OMP_NUM_THREADS=1``, no hub access, and ``PYTHONPATH`` the checkout. The blocks build tiny
random-weight models from transformers configs: nothing is downloaded.

Two first-line markers:

* ``# needs the adapters library (.venv-adapterhub)``: the block runs in ``.venv-adapterhub/bin/python``
  (the AdapterHub ``adapters`` library pins transformers~=4.57 and lives in that venv, as for
  ``make test-adapterhub``); where that venv is missing the test skips, saying so (a failure with
  ADAPTERKERN_REQUIRE_ADAPTERS=1).
* ``# not run by the test suite: <why>``: the block is skipped; such blocks must be listed in NOT_RUN.

Fences of other languages (```bash, ```text, ...) are not Python and are not run; an untagged fence
or a Python-like tag other than ``python`` (``py``, ``pycon``, ...) fails, so that no Python block
slips past the suite.
"""
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ADAPTERHUB_PYTHON = ROOT / ".venv-adapterhub" / "bin" / "python"

NEEDS_ADAPTERS = "# needs the adapters library (.venv-adapterhub)"
NOT_RUN_MARKER = "# not run by the test suite:"
# The headings of the blocks marked NOT_RUN_MARKER (every block runs now). A marked block missing from
# this list, or a listed one no longer marked, fails test_not_run_blocks_are_listed.
NOT_RUN: list = []
# The number of python blocks README.md has now: deleting blocks fails test_readme_has_its_python_blocks.
MIN_PYTHON_BLOCKS = 5
PYTHON_LIKE_TAGS = {"py", "py3", "python3", "pycon", "ipython", "python-repl"}
TIMEOUT_S = 600  # generous: a block takes seconds; only a hung process should ever reach it

_FENCE = re.compile(r"^(\s*)```(.*)$")
_HEADING = re.compile(r"^#{1,6}\s+(.*)$")


@dataclass(frozen=True)
class Block:
    language: str
    heading: str
    line: int  # README.md line of the opening fence
    code: str

    @property
    def first_line(self) -> str:
        return next((ln.strip() for ln in self.code.splitlines() if ln.strip()), "")

    @property
    def needs_adapters(self) -> bool:
        return self.first_line == NEEDS_ADAPTERS

    @property
    def not_run_reason(self):
        first = self.first_line
        return first[len(NOT_RUN_MARKER):].strip() if first.startswith(NOT_RUN_MARKER) else None


def _fenced_blocks(text: str):
    """Every fenced block of ``text`` (markdown), in order; an unclosed fence is an error."""
    blocks, heading, opened = [], "(top)", None
    for number, line in enumerate(text.splitlines(), 1):
        fence = _FENCE.match(line)
        if opened is None:
            if fence:
                opened = (fence.group(2).strip(), number, [])
            elif _HEADING.match(line):
                heading = _HEADING.match(line).group(1).strip()
        elif fence and not fence.group(2).strip():
            language, start, lines = opened  # lines of an indented fence (a list item) are dedented
            blocks.append(Block(language, heading, start, textwrap.dedent("\n".join(lines)) + "\n"))
            opened = None
        else:
            opened[2].append(line)
    if opened is not None:
        raise ValueError(f"README.md: the fence opened on line {opened[1]} is never closed")
    return blocks


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")[:48].rstrip("-")


BLOCKS = _fenced_blocks(README.read_text(encoding="utf-8"))
PYTHON_BLOCKS = [b for b in BLOCKS if b.language == "python"]
IDS = [f"{i}-{_slug(b.heading)}" for i, b in enumerate(PYTHON_BLOCKS)]


def test_readme_has_its_python_blocks():
    assert len(PYTHON_BLOCKS) >= MIN_PYTHON_BLOCKS, (
        f"README.md has {len(PYTHON_BLOCKS)} ```python blocks, fewer than the {MIN_PYTHON_BLOCKS} it had"
    )


def test_every_fence_is_tagged_and_python_is_python():
    for block in BLOCKS:
        where = f"README.md line {block.line} (under {block.heading!r})"
        assert block.language, f"{where}: an untagged fence; tag it (```python runs in the suite; ```text, ```bash do not)"
        assert block.language.lower() not in PYTHON_LIKE_TAGS, f"{where}: ```{block.language}; write ```python so the suite runs it"


def test_not_run_blocks_are_listed():
    marked = [b.heading for b in PYTHON_BLOCKS if b.not_run_reason is not None]
    assert sorted(marked) == sorted(NOT_RUN), f"blocks marked {NOT_RUN_MARKER!r}: {marked}; NOT_RUN lists {NOT_RUN}"
    for block in PYTHON_BLOCKS:
        if block.not_run_reason is not None:
            assert block.not_run_reason, f"README.md line {block.line}: {NOT_RUN_MARKER!r} needs a reason after the colon"


def _interpreter(block: Block) -> str:
    if not block.needs_adapters:
        return sys.executable
    if ADAPTERHUB_PYTHON.exists():
        return str(ADAPTERHUB_PYTHON)
    reason = f"needs the adapters library: {ADAPTERHUB_PYTHON.relative_to(ROOT)} not found (make test creates it)"
    if os.environ.get("ADAPTERKERN_REQUIRE_ADAPTERS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _numbered(code: str) -> str:
    return "\n".join(f"{i:3d}  {line}" for i, line in enumerate(code.splitlines(), 1))


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=IDS)
def test_readme_block_runs(block, tmp_path):
    if block.not_run_reason is not None:
        pytest.skip(f"README.md line {block.line}: not run by the test suite: {block.not_run_reason}")
    python = _interpreter(block)
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    script = tmp_path / "readme_block.py"
    script.write_text(block.code, encoding="utf-8")
    env = dict(os.environ)
    env.update(
        TRITON_INTERPRET="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
        PYTHONDONTWRITEBYTECODE="1",
        TMPDIR=str(tmp),  # tempfile.mkdtemp() of a block lands in the test's temp dir
        HF_HOME=str(tmp / "hf"),
        HF_HUB_OFFLINE="1",
    )
    proc = subprocess.run([python, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (
        f"README.md block at line {block.line} (under {block.heading!r}) exited with {proc.returncode} "
        f"under {python}\n--- block ---\n{_numbered(block.code)}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
    left = sorted(p.name for p in cwd.iterdir())
    assert not left, f"README.md block at line {block.line} wrote {left} into its working directory; use tempfile.mkdtemp()"
