"""Every code block of README.md runs, as written, so that the examples cannot rot.

The blocks run in README order in one scratch folder, each in a fresh process (```python blocks
with this interpreter, ```bash blocks with bash, `minivllm` on PATH). The folder starts with the
checkpoints the README tells the reader to download, made here instead: `Qwen3-0.6B` (a tiny
random Qwen3 with the demo tokenizer and chat template) and `Qwen3-8B` (the same without weights,
as `hf download --exclude "*.safetensors"` gives). Blocks the README makes (say `demo-model`) are
made by the blocks themselves.

Not run here:
- a block whose first line is a comment `# not run in tests: REASON` (a download, a GPU, a server
  that does not exit): the test is skipped with that reason;
- `pip install ...` commands: tests/test_first_hour_install.py resolves the install lines with
  pip's --dry-run, and CI (.ci/run) runs the test line, which this file checks.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from minivllm.demo import make_demo_checkpoint

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NOT_RUN = "# not run in tests:"
# One block may take this long; the slowest (the demo) takes well under a minute on a CPU.
BLOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # 1-based line of the opening fence
    code: str

    @property
    def id(self) -> str:
        return f"{self.language}-line{self.line}"

    @property
    def not_run_reason(self) -> str | None:
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        return first[len(NOT_RUN) :].strip() if first.startswith(NOT_RUN) else None


def readme_blocks() -> list[Block]:
    """The fenced code blocks of README.md, in order."""
    blocks = []
    fence = re.compile(r"^```(\S*)\s*$")
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = fence.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append(Block(m.group(1), start + 1, "\n".join(lines[start + 1 : end]) + "\n"))
        i = end + 1
    return blocks


def bash_commands(code: str) -> list[str]:
    """The commands of a bash block: backslash continuations joined, comments left out."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


def pip_install_lines() -> list[str]:
    """README's command lines that start with `pip install` (install and test lines)."""
    return [
        cmd
        for b in readme_blocks()
        if b.language == "bash"
        for cmd in bash_commands(b.code)
        if cmd.startswith("pip install")
    ]


def test_readme_blocks_are_python_or_bash():
    blocks = readme_blocks()
    assert len(blocks) >= 8
    assert {b.language for b in blocks} <= {"python", "bash"}, [b.id for b in blocks]


def test_ci_runs_the_readme_test_line():
    test_lines = [line for line in pip_install_lines() if "pytest" in line]
    assert len(test_lines) == 1, test_lines
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_lines[0] in ci


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    make_demo_checkpoint(folder / "Qwen3-0.6B", size="tiny")
    make_demo_checkpoint(folder / "Qwen3-8B", size="tiny", write_weights=False)
    return folder


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.mark.parametrize("block", readme_blocks(), ids=lambda b: b.id)
def test_readme_block_runs(block: Block, scratch: Path):
    reason = block.not_run_reason
    if reason is not None:
        pytest.skip(f"README line {block.line}: not run in tests: {reason}")
    if block.language == "python":
        script = scratch / f"block_{block.line}.py"
        script.write_text(block.code)
        argv = [sys.executable, "-P", str(script)]
    else:
        commands = [c for c in bash_commands(block.code) if not c.startswith("pip install")]
        if not commands:
            pytest.skip(f"README line {block.line}: pip install lines, see test_first_hour_install")
        argv = ["bash", "-euo", "pipefail", "-c", "\n".join(commands)]
    proc = subprocess.run(
        argv,
        cwd=scratch,
        env=_env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    assert proc.returncode == 0, (
        f"README line {block.line} ({shlex.join(argv[:2])}) exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    assert proc.stdout.strip(), "every README example prints something"
