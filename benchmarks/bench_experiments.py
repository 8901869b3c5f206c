"""Does an opt-in kernel path (minivllm.experiments) make a request faster end to end?

Runs bench_latency.py (and with --throughput bench_throughput.py) once per experiment set, each in
a process of its own with MINIVLLM_EXPERIMENTS set, in the order given, and prints one table: per
set, the per-token time at each running count, the TTFT of each prompt length (the first step of
that size, and the median after it), and the workload's seconds, each beside the baseline "none"
measured in the same call. The default sets are: none, each experiment alone, all, and none again
(the second "none" shows how far the card drifted over the call). JSON per set beside --out.

    python benchmarks/bench_experiments.py [--sets none gated_mlp all none] \
        [--latency-args "--prompt-lens 1024 8192 --running 1 8 64"] [--throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from minivllm.experiments import ENV_VAR, EXPERIMENTS, enabled_experiments

HERE = Path(__file__).resolve().parent
DEFAULT_LATENCY_ARGS = "--prompt-lens 1024 8192 --running 1 8 32 64 --decode-tokens 64"


def default_sets() -> list[str]:
    return ["none", *sorted(EXPERIMENTS), "all", "none"]


def run_set(name: str, script: str, out: Path, extra: str, smoke: bool) -> dict[str, Any] | None:
    """The JSON `script` wrote with the experiments of set `name` on, or None if it failed."""
    env = {**os.environ, ENV_VAR: "" if name == "none" else name}
    cmd = [sys.executable, str(HERE / script), "--out", str(out), *shlex.split(extra)]
    if smoke:
        cmd.append("--smoke")
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    out.with_suffix(".log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        print(f"{script} with {ENV_VAR}={name!r} failed (rc {done.returncode}):")
        print("\n".join((done.stdout + done.stderr).splitlines()[-12:]))
        return None
    return json.loads(out.read_text())


def row(name: str, latency: dict | None, throughput: dict | None) -> dict[str, Any]:
    cells: dict[str, Any] = {"set": name}
    for r in (latency or {}).get("per_token", []):
        cells[f"ms/tok@{r['running']}"] = r["ms_per_token"]
    for r in (latency or {}).get("first_token", []):
        cells[f"ttft{r['prompt_len']} first"] = r["first_ttft_ms"]
        cells[f"ttft{r['prompt_len']}"] = r["ttft_ms"]
    if throughput:
        cells["workload s"] = throughput["cpp"]["seconds"]
        steps = throughput["cpp"].get("steps") or {}
        slowest = steps.get("slowest_steps") or []
        if slowest:
            cells["slowest step ms"] = slowest[0]["ms"]
    return cells


def print_rows(rows: list[dict[str, Any]]) -> None:
    """Each value, and in brackets its ratio to the first "none" row's (below 1: faster)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    base = next((r for r in rows if r["set"] == "none"), rows[0])
    text = [columns]
    for r in rows:
        line = [r["set"]]
        for c in columns[1:]:
            v, b = r.get(c), base.get(c)
            line.append("-" if v is None else f"{v:.3f}" + (f" ({v / b:.3f})" if b else ""))
        text.append(line)
    widths = [max(len(str(line[i])) for line in text) for i in range(len(columns))]
    for line in text:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out/experiments.json")
    ap.add_argument("--sets", nargs="+", default=None, help="experiment sets (default: see doc)")
    ap.add_argument("--latency-args", default=DEFAULT_LATENCY_ARGS)
    ap.add_argument("--throughput", action="store_true", help="also bench_throughput per set")
    ap.add_argument("--throughput-args", default="--no-peer --no-python")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (a check)")
    args = ap.parse_args()
    sets = args.sets or default_sets()
    for name in sets:
        if name != "none":
            enabled_experiments(name)  # an unknown name fails here, before any run
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(sets):
        stem = f"{out.stem}-{i}-{name.replace(',', '+')}"
        latency = run_set(
            name,
            "bench_latency.py",
            out.with_name(f"{stem}-latency.json"),
            args.latency_args,
            args.smoke,
        )
        throughput = None
        if args.throughput:
            throughput = run_set(
                name,
                "bench_throughput.py",
                out.with_name(f"{stem}-throughput.json"),
                args.throughput_args,
                args.smoke,
            )
        rows.append(row(name, latency, throughput))
        cells = ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if k != "set")
        print(f"done: {name}: {cells}", flush=True)  # a call cut short keeps what it measured
    out.write_text(json.dumps(rows, indent=2))
    print()
    print_rows(rows)


if __name__ == "__main__":
    main()
