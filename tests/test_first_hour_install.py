"""The README's CPU install line downloads no CUDA: resolved with pip's --dry-run --report in a fresh
virtual environment made here, with this machine's pip configuration switched off (only PyPI and
the indexes the line names).

The line has two commands: torch's CPU build from torch's own index, then `pip install .`. The
first is resolved only where that index answers (skipped otherwise); the second runs wherever
PyPI answers, on top of a CPU torch: the one the first command installs, or else a CPU torch wheel
found on this machine's disk.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import socket
import subprocess
import venv
from pathlib import Path
from urllib.parse import urlparse

import pytest
from test_readme import ROOT, pip_install_lines

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Where this project's machines keep a CPU torch wheel (torch's own index is out of their reach).
LOCAL_TORCH_WHEELS = "/opt/wheels/torch-*+cpu-*.whl"


def _cpu_install_commands() -> list[list[str]]:
    """The README's CPU install line, as argv lists: [torch from the CPU index], [pip install .]."""
    lines = [
        line
        for line in pip_install_lines()
        if "download.pytorch.org/whl/cpu" in line and "pytest" not in line
    ]
    assert len(lines) == 1, lines
    commands = [shlex.split(part) for part in lines[0].split("&&")]
    assert [c[:2] for c in commands] == [["pip", "install"]] * 2, commands
    assert "--index-url" in commands[0] and commands[1][2:] == ["."], commands
    return commands


def _reachable(url: str) -> bool:
    host = urlparse(url).hostname
    try:
        with socket.create_connection((host, 443), timeout=5):
            return True
    except OSError:
        return False


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


class FreshVenv:
    def __init__(self, path: Path):
        venv.create(path, with_pip=True, clear=True)
        self.path = path
        self.pip = [str(path / "bin" / "python"), "-m", "pip"]

    def run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.pip, *args],
            cwd=ROOT,
            env=_pip_env(),
            check=False,
            capture_output=True,
            text=True,
            timeout=540,
        )
        assert proc.returncode == 0, f"pip {shlex.join(args)}:\n{proc.stderr[-4000:]}"
        return proc

    def dry_run(self, command: list[str], report: Path) -> list[dict]:
        """`command` (`pip install ...`) with --dry-run --report: what it would install."""
        self.run([*command[1:], "--dry-run", "--quiet", "--report", str(report)])
        return json.loads(report.read_text())["install"]


def _names(install: list[dict]) -> list[str]:
    return sorted(item["metadata"]["name"].lower() for item in install)


def _assert_no_cuda(names: list[str]) -> None:
    cuda = [n for n in names if n.startswith(("nvidia-", "cuda-")) or n == "triton"]
    assert cuda == [], f"the CPU install would download {cuda}"


@pytest.fixture(scope="module")
def pypi_online() -> None:
    if not _reachable("https://pypi.org/simple/"):
        pytest.skip("offline: PyPI does not answer")


def test_cpu_torch_line_resolves_the_cpu_build(tmp_path, pypi_online):
    torch_command, _ = _cpu_install_commands()
    index = torch_command[torch_command.index("--index-url") + 1]
    if not _reachable(index):
        pytest.skip(f"offline: torch's CPU index {index} does not answer")
    env = FreshVenv(tmp_path / "venv")
    install = env.dry_run(torch_command, tmp_path / "report.json")
    torch = [item for item in install if item["metadata"]["name"] == "torch"]
    assert len(torch) == 1 and torch[0]["metadata"]["version"].endswith("+cpu"), torch
    _assert_no_cuda(_names(install))


def test_project_line_on_cpu_torch_pulls_no_cuda(tmp_path, pypi_online):
    torch_command, project_command = _cpu_install_commands()
    env = FreshVenv(tmp_path / "venv")
    index = torch_command[torch_command.index("--index-url") + 1]
    wheels = sorted(glob.glob(LOCAL_TORCH_WHEELS))
    if _reachable(index):
        env.run(torch_command[1:])
    elif wheels:
        env.run(["install", wheels[-1]])
    else:
        pytest.skip(f"offline: torch's CPU index {index} does not answer and no CPU torch wheel")
    install = env.dry_run(project_command, tmp_path / "report.json")
    names = _names(install)
    assert "minivllm" in names and "transformers" in names, names
    assert "torch" not in names  # the CPU torch already installed satisfies the project
    _assert_no_cuda(names)
