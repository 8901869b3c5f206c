"""The `minivllm serve` subprocess bench_serving.py measures: its command line, a free port,
waiting for /health, and the CPU seconds of it and its engine process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

SERVED_NAME = "bench"


def serve_command(model: str, port: int, args: dict[str, Any]) -> list[str]:
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "minivllm.cli",
        "serve",
        model,
        "--port",
        str(port),
        "--served-model-name",
        SERVED_NAME,
        "--log-level",
        "warning",
    ]
    for name, value in args.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def wait_healthy(base_url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not start in {timeout_s} s:\n{log.read_text()[-4000:]}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(server: subprocess.Popen | None) -> dict[str, float]:
    """User + system CPU seconds so far of this client, the server's process and its children
    (the engine process), from /proc where there is one."""
    out: dict[str, float] = {}
    if server is None or not Path("/proc").is_dir():
        return out
    tick = os.sysconf("SC_CLK_TCK")

    def stat(pid: int) -> list[str] | None:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None

    fields = stat(server.pid)
    if fields is None:
        return out
    out["server"] = (int(fields[11]) + int(fields[12])) / tick
    children = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            f = stat(int(entry.name))
            if f is not None and int(f[1]) == server.pid:
                children += (int(f[11]) + int(f[12])) / tick
    out["engine"] = children
    return out
