"""`minivllm run-batch`: OpenAI batch files through one engine (and N engine processes without
Ray): answers equal LLM.generate's, bad lines get error lines, a rerun resumes after a kill."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from batch_testing import (
    ENGINE_ARGS,
    bad_lines,
    expected_choices,
    keyed,
    read_output,
)
from engine_fixtures import make_llm
from minivllm.entrypoints.batch_file import BatchOutput, InputLine, Result, pending_lines
from minivllm.entrypoints.run_batch import run_batch

pytestmark = pytest.mark.timeout(300)


def test_results_equal_generate(tiny_qwen3, batch_file, one_engine_output):
    lines = batch_file.read_text().splitlines()
    lines_by_id = {json.loads(x).get("custom_id"): x for x in lines[::-1] if x.startswith("{")}
    output = read_output(one_engine_output)
    assert len(output) == 200
    keyed(output)  # every key once
    by_id = {o["custom_id"]: o for o in output if o["error"] is None}
    llm = make_llm(tiny_qwen3, **ENGINE_ARGS)
    expected = expected_choices(llm, lines)
    assert sorted(by_id) == sorted(expected) and len(expected) == 190
    for custom_id, choices in expected.items():
        response = by_id[custom_id]["response"]
        assert response["status_code"] == 200
        body = response["body"]
        is_chat = "chat" in json.loads(lines_by_id[custom_id])["url"]
        assert body["object"] == ("chat.completion" if is_chat else "text_completion")
        texts = [c["message"]["content"] if is_chat else c["text"] for c in body["choices"]]
        got = list(zip(texts, [c["finish_reason"] for c in body["choices"]]))
        assert got == choices, custom_id
        assert [c["index"] for c in body["choices"]] == list(range(len(choices)))
        assert body["usage"]["completion_tokens"] > 0
        assert body["model"] == str(tiny_qwen3)


def test_bad_lines_get_error_lines(tiny_qwen3, one_engine_output):
    errors = [o for o in read_output(one_engine_output) if o["error"] is not None]
    assert len(errors) == 10
    by_code = sorted((o["error"]["code"], o["custom_id"]) for o in errors)
    assert by_code == sorted((code, cid) for cid, _, code in bad_lines(str(tiny_qwen3)))
    for o in errors:
        assert o["error"]["message"] and isinstance(o["error"]["line"], int)
        code = o["error"]["code"]
        if code in ("invalid_request", "model_not_found"):
            assert o["response"]["status_code"] == (404 if code == "model_not_found" else 400)
            assert o["response"]["body"]["error"]["message"] == o["error"]["message"]
        else:
            assert o["response"] is None
    messages = {o["custom_id"]: o["error"]["message"] for o in errors}
    assert "temperature" in messages["bad-temp"]
    assert "frequency_penalty" in messages["bad-field"]
    assert "maximum context length is 256" in messages["bad-length"]
    assert "outside the vocabulary" in messages["bad-vocab"]


def _run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-P", "-m", "minivllm.cli", "run-batch", "--no-progress", *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def _engine_flags(engine_args: dict) -> list[str]:
    flags = []
    for name, value in engine_args.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_resume_after_a_kill(tiny_qwen3, batch_file, one_engine_output, tmp_path):
    """SIGKILL once the output has some lines; a rerun finishes the file: the same lines as an
    uninterrupted run, none twice."""
    out = tmp_path / "out.jsonl"
    # Four running sequences: the results trickle out, so the kill lands mid-file.
    args = ["-i", str(batch_file), "-o", str(out), "--model", str(tiny_qwen3)]
    slow = {**ENGINE_ARGS, "max_num_seqs": 4}
    proc = _run_cli(args + _engine_flags(slow))
    deadline = time.monotonic() + 120
    while _count_lines(out) < 40 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    num_before = _count_lines(out)
    assert 40 <= num_before < 200, "the kill should land mid-file"
    proc = _run_cli(args + _engine_flags(ENGINE_ARGS))
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    assert f"already in {out}" in stdout
    assert keyed(read_output(out)) == keyed(read_output(one_engine_output))


def test_rerun_of_a_finished_file_writes_nothing(
    tiny_qwen3, batch_file, one_engine_output, tmp_path
):
    out = tmp_path / "out.jsonl"
    out.write_bytes(one_engine_output.read_bytes())
    summary = run_batch(str(batch_file), str(out), str(tiny_qwen3), use_tqdm=False, **ENGINE_ARGS)
    assert (summary.num_resumed, summary.num_ok, summary.num_failed) == (200, 0, 0)
    assert out.read_bytes() == one_engine_output.read_bytes()


def test_a_torn_last_line_is_cut_and_rerun(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = json.dumps({"id": "x", "custom_id": "a", "response": None, "error": None})
    torn = json.dumps({"id": "y", "custom_id": "b", "response": None, "error": None})[:17]
    out.write_text(whole + "\n" + torn)
    with BatchOutput(out) as o:
        assert o.done == {"a"}
        o.write([Result(2, "b", '{"custom_id": "b", "error": null}')])
        o.write([Result(2, "b", '{"custom_id": "b", "error": null}')])  # dropped: written
    assert out.read_text() == whole + "\n" + '{"custom_id": "b", "error": null}\n'


def test_an_output_file_that_is_not_ours_is_refused(tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("my precious notes\n")
    with pytest.raises(ValueError, match="line 1.*refusing to append"):
        BatchOutput(out)
    assert out.read_text() == "my precious notes\n"


def test_pending_lines_skip_done_and_answer_keyless_lines():
    def line(n: int, custom_id: object) -> InputLine:
        return InputLine(n, json.dumps({"custom_id": custom_id, "url": "/v1/completions"}))

    lines = [
        line(1, "a"),
        line(2, "b"),
        InputLine(3, "{oops"),
        line(4, "a"),
        line(5, 7),
        line(6, "c"),
    ]
    written: list[Result] = []
    pending = list(pending_lines(lines, {"b", 4}, written.extend))
    assert [x.number for x in pending] == [1, 6]
    assert [(r.number, r.key) for r in written] == [(3, 3), (5, 5)]  # line 4's error is done
    assert [json.loads(r.text)["error"]["code"] for r in written] == [
        "invalid_json",
        "invalid_custom_id",
    ]


@pytest.mark.parametrize(
    "case, message",
    [
        ("no input", "the input file"),
        ("input is a folder", "is not a file"),
        ("no output folder", "the output file's folder"),
        ("output is a folder", "is a folder"),
        ("no model", "does not exist"),
        ("bad engine argument", "max_num_seqs"),
        ("bad ray batch size", "--ray-batch-size) must be >= 1, got 0"),
    ],
)
def test_bad_command_lines_fail_before_any_output(case, message, tiny_qwen3, tmp_path, capsys):
    from minivllm.cli import main

    inp, out, model = tmp_path / "in.jsonl", tmp_path / "out.jsonl", str(tiny_qwen3)
    inp.write_text("{}\n")
    extra = []
    if case == "no input":
        inp = tmp_path / "missing.jsonl"
    elif case == "input is a folder":
        inp = tmp_path
    elif case == "no output folder":
        out = tmp_path / "missing" / "out.jsonl"
    elif case == "output is a folder":
        out = tmp_path / "out"
        out.mkdir()
    elif case == "no model":
        model = str(tmp_path / "no-such-model")
    elif case == "bad ray batch size":
        extra = ["--ray-batch-size", "0"]
    else:
        extra = ["--max-num-seqs", "0"]
    argv = ["run-batch", "-i", str(inp), "-o", str(out), "--model", model, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.is_file()


def test_data_parallel_without_ray_installed_says_how(monkeypatch, tiny_qwen3, tmp_path, capsys):
    from minivllm.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    code = main(
        [
            "run-batch",
            "-i",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "out"),
            "--model",
            str(tiny_qwen3),
            "--data-parallel",
            "2",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "minivllm[ray]"' in err
    assert not (tmp_path / "out").exists()


# ---- data parallel without Ray: engine processes on this host ----------------------------------


def test_replica_processes_equal_one_engine(tiny_qwen3, batch_file, one_engine_output, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_batch(
        str(batch_file),
        str(out),
        str(tiny_qwen3),
        data_parallel_size=2,
        use_ray=False,
        use_tqdm=False,
        **ENGINE_ARGS,
    )
    assert summary.num_ok == 190 and summary.num_failed == 10
    assert keyed(read_output(out)) == keyed(read_output(one_engine_output))


def test_a_killed_replica_process_loses_nothing(
    tiny_qwen3, batch_file, one_engine_output, tmp_path
):
    """SIGKILL one replica mid-run: its unfinished lines run on the other, every line once."""
    out = tmp_path / "out.jsonl"
    args = {**ENGINE_ARGS, "max_num_seqs": 4}
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_batch(
                str(batch_file),
                str(out),
                str(tiny_qwen3),
                data_parallel_size=2,
                use_ray=False,
                use_tqdm=False,
                **args,
            )
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    driver = threading.Thread(target=run)
    driver.start()
    deadline = time.monotonic() + 120
    while _count_lines(out) < 30 and driver.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    victims = [p for p in multiprocessing.active_children() if p.name == "minivllm-replica-1"]
    assert len(victims) == 1
    os.kill(victims[0].pid, signal.SIGKILL)
    assert _count_lines(out) < 200, "the kill should land mid-file"
    driver.join(240)
    assert not driver.is_alive() and not errors, errors
    assert keyed(read_output(out)) == keyed(read_output(one_engine_output))
