"""minivllm on Ray Data: the predictors on their own, and run-batch's data-parallel path on a
local Ray cluster of 2 CPUs (skipped when Ray is not installed): 2 replicas answer as one
engine does, and a replica killed mid-run costs nothing but time."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from batch_testing import ENGINE_ARGS, keyed, read_output
from engine_fixtures import make_llm
from minivllm import SamplingParams
from minivllm.entrypoints.ray_data import BatchLinePredictor, LLMPredictor

pytestmark = [
    pytest.mark.timeout(300),
    # Ray Data's own DataContext warns about its deprecated fields when it is built.
    pytest.mark.filterwarnings("ignore:.*is deprecated.*:DeprecationWarning"),
]

GREEDY = {"temperature": 0.0, "max_tokens": 5, "ignore_eos": True}
PROMPTS = ["Hello there", "the sea cat", "paged cache prime", "a poem"]
CHAT = [{"role": "user", "content": "Write a haiku."}]


def _expected(tiny_qwen3: Path) -> list[str]:
    llm = make_llm(tiny_qwen3, **ENGINE_ARGS)
    sp = SamplingParams(**GREEDY)
    texts = [o.outputs[0].text for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    return texts + [llm.chat(CHAT, sp, use_tqdm=False)[0].outputs[0].text]


def test_llm_predictor_on_a_batch(tiny_qwen3):
    """Text and chat rows through the map_batches callable, called directly; a bad row gets
    its error and the others their text."""
    predictor = LLMPredictor(str(tiny_qwen3), sampling_params=GREEDY, **ENGINE_ARGS)
    batch = {
        "prompt": np.array([*PROMPTS, None, ""], dtype=object),
        "messages": np.array([None] * len(PROMPTS) + [CHAT, None], dtype=object),
    }
    out = predictor(batch)
    assert list(out["generated_text"][:-1]) == _expected(tiny_qwen3)
    assert out["error"][-1] == "prompt 5 is empty" and out["generated_text"][-1] is None
    assert list(out["error"][:-1]) == [None] * 5
    assert list(out["num_generated_tokens"]) == [5] * 5 + [0]
    assert list(out["finish_reason"][:-1]) == ["length"] * 5
    assert list(out["prompt"]) == list(batch["prompt"])  # input columns pass through


def test_batch_line_predictor_on_a_batch(tiny_qwen3, batch_file, one_engine_output):
    predictor = BatchLinePredictor(str(tiny_qwen3), **ENGINE_ARGS)
    lines = batch_file.read_text().splitlines()[:30]
    numbers = np.arange(1, 31)
    out = predictor({"line": numbers, "text": np.array(lines, dtype=object)})
    assert sorted(out["line"]) == list(numbers)
    expected = keyed(read_output(one_engine_output))
    got = keyed([__import__("json").loads(t) for t in out["output"]])
    assert got == {k: expected[k] for k in got}
    assert out["is_ok"].sum() == sum('"error": null' in expected[k] for k in got)


# ---- on a local Ray cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _run(tiny_qwen3: Path, batch_file: Path, out: Path) -> None:
    from minivllm.entrypoints.run_batch import run_batch

    summary = run_batch(
        str(batch_file),
        str(out),
        str(tiny_qwen3),
        data_parallel_size=2,
        ray_batch_size=20,
        use_tqdm=False,
        **ENGINE_ARGS,
    )
    assert summary.num_ok + summary.num_failed == 200


def test_two_ray_replicas_equal_one_engine(
    ray_cluster, tiny_qwen3, batch_file, one_engine_output, tmp_path
):
    out = tmp_path / "out.jsonl"
    _run(tiny_qwen3, batch_file, out)
    assert keyed(read_output(out)) == keyed(read_output(one_engine_output))


def _replica_pids() -> list[int]:
    """Ray's actors name their process after the class they run."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"MapBatches(BatchLinePredictor)" in cmdline:
            pids.append(int(entry))
    return pids


def test_a_killed_ray_replica_is_retried(
    ray_cluster, tiny_qwen3, batch_file, one_engine_output, tmp_path
):
    """SIGKILL one replica once results flow: Ray restarts it and reruns its batch; every line
    is written once, with the answer one engine gives."""
    out = tmp_path / "out.jsonl"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _run(tiny_qwen3, batch_file, out)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    driver = threading.Thread(target=run)
    driver.start()

    def num_lines() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    # The driver writes the 3 lines that own no custom_id itself, before any replica runs.
    deadline = time.monotonic() + 180
    while num_lines() < 23 and driver.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = _replica_pids()
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    assert num_lines() < 200, "the kill should land mid-file"
    driver.join(240)
    assert not driver.is_alive() and not errors, errors
    assert keyed(read_output(out)) == keyed(read_output(one_engine_output))
