"""Helpers for the run-batch tests: a mixed OpenAI batch file, the answers LLM.generate gives
for the same requests, and output lines reduced to what must not change between runs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from engine_fixtures import have_cpp_scheduler
from minivllm import LLM, SamplingParams

WORDS = ["the", "sea", "cat", "paged", "cache", "hello", "prime", "poem", "GPU", "jazz", "tree"]

# Engine arguments every run-batch test uses (and the reference LLM).
ENGINE_ARGS: dict[str, Any] = {
    "device": "cpu",
    "scheduler": "cpp" if have_cpp_scheduler() else "python",
    "max_model_len": 256,
    "max_num_seqs": 32,
    "max_num_batched_tokens": 512,
}


def bad_lines(model: str) -> list[tuple[str | None, str, str]]:
    """(custom_id, line, the error code it must get) for 10 bad lines."""

    def line(custom_id: str, url: str = "/v1/completions", method: str = "POST", **body: Any):
        body = {"model": model, **body}
        return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})

    return [
        (None, "this is not json", "invalid_json"),
        (None, json.dumps({"method": "POST", "url": "/v1/completions"}), "invalid_custom_id"),
        ("good-0", line("good-0", prompt="a duplicate"), "duplicate_custom_id"),
        ("bad-url", line("bad-url", url="/v1/embeddings", input="x"), "invalid_url"),
        ("bad-method", line("bad-method", method="GET", prompt="x"), "invalid_method"),
        ("bad-temp", line("bad-temp", prompt="x", temperature=5), "invalid_request"),
        ("bad-field", line("bad-field", prompt="x", frequency_penalty=1.0), "invalid_request"),
        ("bad-model", line("bad-model", prompt="x", model="gpt-4o"), "model_not_found"),
        ("bad-vocab", line("bad-vocab", prompt=[3, 99999]), "invalid_request"),
        ("bad-length", line("bad-length", prompt=[5] * 200, max_tokens=100), "invalid_request"),
    ]


def make_batch(model: str, num_good: int = 190, seed: int = 0) -> list[str]:
    """`num_good` valid lines mixing text, token-id and multi-prompt completions (some with n=2
    or a stop string) and chats, with the 10 bad lines spread among them."""
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(num_good):
        kind = i % 4
        body: dict[str, Any] = {"model": model, "temperature": 0}
        url = "/v1/completions"
        if kind == 0:
            body["prompt"] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
            body["max_tokens"] = rng.randint(1, 8)
            if i % 3 == 0:
                body["stop"] = ["e"]
        elif kind == 1:
            body["prompt"] = [rng.randint(3, 511) for _ in range(rng.randint(1, 40))]
            body["max_tokens"] = rng.randint(1, 8)
            body["ignore_eos"] = True
        elif kind == 2:
            url = "/v1/chat/completions"
            body["messages"] = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(5))},
            ]
            body["max_completion_tokens"] = rng.randint(1, 8)
        else:
            body["prompt"] = [
                [rng.randint(3, 511) for _ in range(rng.randint(1, 9))] for _ in range(2)
            ]
            body["max_tokens"] = rng.randint(1, 6)
            body["n"] = 2
        lines.append(
            json.dumps({"custom_id": f"good-{i}", "method": "POST", "url": url, "body": body})
        )
    for j, (_, text, _) in enumerate(bad_lines(model)):
        lines.insert(1 + j * (len(lines) // 10), text)
    return lines


def write_batch(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def expected_choices(llm: LLM, lines: list[str]) -> dict[str, list[tuple[str, str]]]:
    """custom_id -> [(text, finish_reason) per choice], from one LLM.generate over every
    prompt of the valid lines (chats through the same chat template)."""
    owners: list[str] = []
    prompts: list[Any] = []
    params: list[SamplingParams] = []
    for text in lines:
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        cid = obj.get("custom_id", "")
        if not isinstance(cid, str) or not cid.startswith("good-") or cid in owners:
            continue
        body = obj["body"]
        sp = SamplingParams(
            temperature=0.0,
            max_tokens=body.get("max_tokens") or body.get("max_completion_tokens") or 16,
            n=body.get("n", 1),
            stop=body.get("stop"),
            ignore_eos=body.get("ignore_eos", False),
        )
        if obj["url"] == "/v1/chat/completions":
            group = [llm.inputs.chat_prompt(body["messages"])]
        else:
            prompt = body["prompt"]
            many = isinstance(prompt, list) and prompt and isinstance(prompt[0], list)
            group = prompt if many else [prompt]
        owners += [cid] * len(group)
        prompts += group
        params += [sp] * len(group)
    out: dict[str, list[tuple[str, str]]] = {}
    for cid, r in zip(owners, llm.generate(prompts, params, use_tqdm=False)):
        out.setdefault(cid, []).extend((c.text, c.finish_reason) for c in r.outputs)
    return out


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def normalized(line: dict[str, Any]) -> str:
    """An output line without what differs between runs (ids and timestamps)."""
    line = json.loads(json.dumps(line))
    line.pop("id")
    if line["response"] is not None:
        line["response"].pop("request_id")
        body = line["response"]["body"]
        body.pop("id", None)
        body.pop("created", None)
    return json.dumps(line, sort_keys=True)


def keyed(lines: list[dict[str, Any]]) -> dict[Any, str]:
    """Output lines by their key (custom_id, or the line number of a line that owns none);
    fails on a key seen twice."""
    out: dict[Any, str] = {}
    for line in lines:
        error = line["error"] or {}
        owns = error.get("code") not in ("invalid_json", "invalid_custom_id", "duplicate_custom_id")
        key = line["custom_id"] if owns else error["line"]
        assert key not in out, f"{key!r} written twice"
        out[key] = normalized(line)
    return out


@pytest.fixture(scope="session")
def batch_file(tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 lines: 190 valid (make_batch) and the 10 bad_lines."""
    return write_batch(tmp_path_factory.mktemp("batch") / "in.jsonl", make_batch(str(tiny_qwen3)))


@pytest.fixture(scope="session")
def one_engine_output(tiny_qwen3: Path, batch_file: Path) -> Path:
    """`batch_file` through one engine, in this process: what every other way must match."""
    from minivllm.entrypoints.run_batch import run_batch

    out = batch_file.parent / "one_engine.jsonl"
    summary = run_batch(str(batch_file), str(out), str(tiny_qwen3), use_tqdm=False, **ENGINE_ARGS)
    assert summary.num_ok + summary.num_failed == 200 and summary.num_resumed == 0
    return out
