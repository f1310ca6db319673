"""The README cannot drift: every ```bash and ```python block in it runs (issue 12, item 2).

Convention (also stated in the README's Development section):

* ```bash and ```python blocks run in document order, all in one temporary folder, so a file one
  block writes (a checkpoint from `reparam init`) is there for the next. bash blocks run with
  `set -e` (any failing command fails the test), the virtual environment's bin first on PATH;
  each python block runs in its own interpreter.
* A block right after an `<!-- file: NAME -->` line is written to NAME in that folder instead of
  being run (spec files the next blocks use).
* Not run: ```text, ```console, ```yaml (without a file marker) and any other fence, and blocks right
  after an `<!-- illustrative -->` line (commands that need the network or build virtual environments,
  like scripts/demo.sh and scripts/test.sh).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^(?P<marker><!-- (?P<what>illustrative|file: (?P<name>[\w.\-]+)) -->\n)?"
                   r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$", re.M | re.S)


@dataclass
class Block:
    line: int
    lang: str
    body: str
    file: str | None  # write the body to this file instead of running it
    illustrative: bool


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for m in FENCE.finditer(text):
        blocks.append(Block(text.count("\n", 0, m.start("lang")) + 1, m["lang"], m["body"], m["name"],
                            m["what"] == "illustrative"))
    return blocks


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.file or (not b.illustrative and b.lang in ("bash", "python"))]


def test_the_convention_finds_what_it_should():
    text = ("x\n<!-- illustrative -->\n```bash\nnope\n```\n```bash\nyes\n```\n```text\nno\n```\n"
            "<!-- file: s.py -->\n```python\nX = 1\n```\n```python\nprint(1)\n```\n")
    picked = runnable(readme_blocks(text))
    assert [(b.lang, b.body, b.file) for b in picked] == [("bash", "yes\n", None), ("python", "X = 1\n", "s.py"),
                                                         ("python", "print(1)\n", None)]


def test_readme_build_scripts_are_not_run():
    for block in runnable(readme_blocks(README.read_text())):
        assert "scripts/demo.sh" not in block.body and "scripts/test.sh" not in block.body, block.line


def test_every_readme_code_block_runs(tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "YOLO_CONFIG_DIR": str(tmp_path / ".yolo"),
           "COLUMNS": "100"}
    blocks = runnable(readme_blocks(README.read_text()))
    assert len(blocks) >= 10
    for block in blocks:
        where = f"README.md line {block.line}"
        if block.file:
            (tmp_path / block.file).write_text(block.body)
            continue
        if block.lang == "bash":
            cmd = ["bash", "-c", "set -e\n" + block.body]
        else:
            cmd = [sys.executable, "-c", block.body]
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{where} failed:\n{block.body}\n--- stderr:\n{result.stderr[-3000:]}"


def test_readme_links_to_its_own_sections_resolve():
    text = README.read_text()
    # GitHub's anchors: lower case, punctuation dropped, spaces to hyphens.
    anchors = {re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", h.strip().lower()))
               for h in re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```$", "", text, flags=re.M | re.S), re.M)}
    links = set(re.findall(r"\]\(#([\w-]+)\)", text))
    assert links and links <= anchors, links - anchors
    for path in re.findall(r"!\[[^\]]*\]\(([^)#]+)\)", text):  # pictures
        assert (ROOT / path).is_file(), path
