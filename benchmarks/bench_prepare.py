"""Host cost of one decode step outside the forward pass, on whatever device is given (the CPU
works: no model is run): schedule + stage + upload + build the device views + update, for

  * copy:   the scheduler builds its Batch arrays, the runner copies them into the staging buffer
            (`scheduler.schedule()` + `runner.prepare(batch)`), and
  * staged: the scheduler writes straight into the staging buffer
            (`runner.schedule(scheduler)` + `runner.prepare(batch, staged=True)`), the engine's path.

    python benchmarks/bench_prepare.py --running 256 --device cpu
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from minivllm import LLM
from minivllm.demo import make_demo_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--running", type=int, default=256)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--scheduler", default="cpp", choices=["cpp", "python"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_demo_checkpoint(Path(tmp) / "m", "tiny")
        llm = LLM(str(model_dir), device=args.device, max_model_len=4096,
                  max_num_seqs=max(args.running, 1), num_kv_blocks=40000,
                  max_num_batched_tokens=8192, scheduler=args.scheduler)
    sched, runner = llm.scheduler, llm.model_runner
    prompt = list(range(3, 3 + args.context))
    for i in range(args.running):
        sched.add_request(i, prompt, 3000, ignore_eos=True, temperature=0.6, seed=i)
    while True:  # run the prefill so the next Batches are decode-only
        batch = runner.schedule(sched)
        sched.update(runner.execute(batch, staged=True))
        if batch.num_decodes == batch.num_seqs:
            break
    tokens = np.full(args.running, 5, dtype=np.int64)

    def copy_step() -> None:
        batch = sched.schedule()
        runner.prepare(batch)
        sched.update(tokens)

    def staged_step() -> None:
        batch = runner.schedule(sched)
        runner.prepare(batch, staged=True)
        sched.update(tokens)

    results = {}
    for name, step in (("copy", copy_step), ("staged", staged_step)) * 2:
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        results[name] = float(np.median(times)) * 1e6  # the second round, warm, is kept
    print(f"host per decode step outside the forward, {args.running} running, {args.scheduler} "
          f"scheduler, {args.device}: copy {results['copy']:.1f} us, staged "
          f"{results['staged']:.1f} us (median of {args.steps} steps)")


if __name__ == "__main__":
    main()
