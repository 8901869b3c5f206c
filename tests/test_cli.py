"""The `minivllm` command: --help, --version and argument errors answer without importing torch;
errors are one line with exit code 2 that names the value and the fix."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import minivllm
import pytest
from minivllm.cli import main

# Runs the CLI in a fresh interpreter and reports its exit code and which heavy modules it loaded.
_PROBE = """
import json, sys
from minivllm.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = [m for m in ("torch", "transformers", "triton", "numpy") if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["--version"], 0),
        (["demo", "--help"], 0),
        (["generate", "--max-tokens", "0"], 2),
        (["bench", "--num-prompts", "x"], 2),
        (["no-such-command"], 2),
    ],
)
def test_answers_without_importing_torch(argv, code):
    proc = subprocess.run(
        [sys.executable, "-P", "-c", _PROBE, *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report == {"code": code, "heavy": []}, proc.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"minivllm {minivllm.__version__}\n"
    # The package metadata reads its version from __init__.py: one place.
    assert importlib.metadata.version("minivllm") == minivllm.__version__


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


def test_demo_needs_at_least_one_prompt(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--num-prompts", "0"])
    assert e.value.code == 2
    err = _error_line(capsys)
    assert "--num-prompts" in err and "must be >= 1, got 0" in err and "minivllm demo --help" in err


def test_bench_low_length_above_high_length(capsys):
    argv = ["bench", "--min-input", "600", "--max-input", "100", "--no-progress"]
    assert main(argv) == 2
    err = _error_line(capsys)
    assert "--min-input=600 is greater than --max-input=100" in err
    assert "give --min-input <= --max-input" in err
    argv = ["bench", "--min-output", "9", "--max-output", "8", "--no-progress"]
    assert main(argv) == 2
    assert "--min-output=9 is greater than --max-output=8" in _error_line(capsys)


@pytest.mark.parametrize("port", ["99999", "-5"])
def test_serve_port_out_of_range(port, capsys):
    """Refused before the engine starts (uvicorn bound a random port for 99999)."""
    assert main(["serve", "somewhere", "--port", port]) == 2
    assert f"--port must be in [0, 65535], got {port}" in _error_line(capsys)


def test_bench_fixed_lengths(capsys, monkeypatch):
    """Equal low and high lengths are a fixed length, not an error; the warm-up prompt is none
    of the timed ones (one of those would be a prefix-cache hit)."""
    from minivllm import LLM

    calls = []
    real = LLM.generate

    def spy(self, prompts, *args, **kwargs):
        calls.append(list(prompts))
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(LLM, "generate", spy)
    argv = ["bench", "--device", "cpu", "--num-prompts", "3", "--no-progress", "--min-input",
            "16", "--max-input", "16", "--min-output", "4", "--max-output", "4"]  # fmt: skip
    assert main(argv) == 0
    assert "3 requests, 48 prompt + 12 output tokens" in capsys.readouterr().out
    (warmup,), timed = calls
    assert len(timed) == 3 and all(p[:16] != warmup[:16] for p in timed)


def test_demo_keep_says_how_to_load_the_checkpoint(tmp_path, capsys):
    folder = tmp_path / "demo-model"
    argv = ["demo", "--device", "cpu", "--num-prompts", "1", "--max-tokens", "4", "--no-progress",
            "--keep", str(folder)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 request," in out
    assert f"The checkpoint stays in {folder}: LLM({str(folder)!r}) loads it." in out
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_bench_tensor_parallel_with_async_scheduling(capsys):
    """-tp / --tensor-parallel-size and --async-scheduling reach the engine (2 ranks on gloo)."""
    argv = ["bench", "--device", "cpu", "--num-prompts", "3", "--no-progress", "--min-input",
            "8", "--max-input", "8", "--min-output", "4", "--max-output", "4", "-tp", "2",
            "--async-scheduling"]  # fmt: skip
    assert main(argv) == 0
    assert "3 requests, 24 prompt + 12 output tokens" in capsys.readouterr().out


def test_tensor_parallel_size_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "somewhere", "--tensor-parallel-size", "0"])
    assert e.value.code == 2
    assert "--tensor-parallel-size" in _error_line(capsys)


def test_engine_flags_become_engine_arguments():
    import argparse

    from minivllm.cli_args import add_engine_args, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert "tensor_parallel_size" not in engine_kwargs(p.parse_args([]))
    assert "async_scheduling" not in engine_kwargs(p.parse_args([]))  # the engine's default
    kwargs = engine_kwargs(p.parse_args(["-tp", "4", "--no-async-scheduling"]))
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["async_scheduling"] is False
    kwargs = engine_kwargs(p.parse_args(["--tensor-parallel-size", "2", "--async-scheduling"]))
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["async_scheduling"] is True
