"""What a newcomer meets in the first hour: the errors name the bad value and the fix, MinivLLM's
`LLMEngine` shows every sampled id in its text, and the CPU path runs without triton installed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from minivllm import LLM, LLMEngine, SamplingParams

placeholder_token = lambda i: f"<|id_{i}|>"


def test_model_none_names_the_fix():
    with pytest.raises(ValueError, match=r"model must be the path of a local .* got None"):
        LLM(None)


def test_triton_backend_on_the_cpu_names_the_fix(tiny_qwen3, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(
        ValueError, match=r"attention_backend='triton' needs a CUDA GPU.*attention_backend='torch'"
    ):
        LLM(str(tiny_qwen3), device="cpu", attention_backend="triton")


def test_tokenizer_folder_that_does_not_exist(tiny_qwen3, tmp_path):
    missing = str(tmp_path / "no-such-folder")  # not a fixed path some machine may hold
    with pytest.raises(ValueError, match=f"tokenizer='{missing}' is not a folder"):
        LLM(str(tiny_qwen3), device="cpu", tokenizer=missing)


def test_tokenizer_folder_is_used(tiny_qwen3, tmp_path):
    """A tokenizer folder apart from the model folder is the one the engine encodes with."""
    from minivllm.demo import save_demo_tokenizer

    save_demo_tokenizer(tmp_path, vocab_size=300)
    llm = LLM(str(tiny_qwen3), device="cpu", tokenizer=str(tmp_path), max_model_len=64)
    assert len(llm.get_tokenizer()) == 300


def test_demo_checkpoint_decodes_every_id(tmp_path):
    """`minivllm demo` on a GPU runs Qwen3-0.6B's vocabulary over the small demo tokenizer: every
    id the model can sample decodes to text that names it."""
    from minivllm.demo import make_demo_checkpoint
    from transformers import AutoTokenizer

    path = make_demo_checkpoint(tmp_path, "tiny", write_weights=False, vocab_size=4096)
    assert len(AutoTokenizer.from_pretrained(path)) == 512
    make_demo_checkpoint(
        tmp_path, "tiny", write_weights=False, vocab_size=4096, decode_every_id=True
    )
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 4096
    assert tok.decode([4095, 1000, 2], skip_special_tokens=True) == "<|id_4095|><|id_1000|>"
    assert tok.decode(tok.encode("Hello there")) == "Hello there"


# MinivLLM's Qwen3-0.6B dictionary, narrowed to one small layer: the vocabulary (151936 ids) is
# what matters here, far larger than the demo tokenizer's.
SEED_CONFIG = {
    "max_num_sequences": 4, "max_num_batched_tokens": 256, "max_cached_blocks": 64,
    "block_size": 16, "world_size": 1, "model_name_or_path": "Qwen/Qwen3-0.6B",
    "vocab_size": 151936, "hidden_size": 64, "num_heads": 4, "head_dim": 16, "num_kv_heads": 2,
    "intermediate_size": 64, "num_layers": 1, "tie_word_embeddings": True, "base": 1000000,
    "max_model_length": 128, "eos": 151645,
}  # fmt: skip


def test_minivllm_shim_without_a_tokenizer_says_so_once_and_shows_every_id(caplog):
    with caplog.at_level(logging.WARNING):
        engine = LLMEngine(config=SEED_CONFIG)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "model_name_or_path='Qwen/Qwen3-0.6B'" in warnings[0] and "demo tokenizer" in warnings[0]
    assert "<|id_N|>" in warnings[0] and "151936" in warnings[0]

    tok = engine.tokenizer
    assert len(tok) == SEED_CONFIG["vocab_size"]
    assert tok.decode([SEED_CONFIG["eos"]], skip_special_tokens=True) == ""  # eos: special
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=3)
    out = engine.generate(["Hello, my name is"], params, use_tqdm=False)
    ids, text = out["token_ids"][0], out["text"][0]
    assert len(ids) == 24
    assert text == tok.decode(ids, skip_special_tokens=True)
    # Random weights draw almost every id from past the small trained vocabulary: each one
    # shows in the text as its placeholder, in order.
    first = next(i for i in range(len(tok)) if tok.convert_ids_to_tokens(i) == placeholder_token(i))
    special = set(tok.all_special_ids)
    placeholders = [placeholder_token(i) for i in ids if i >= first and i not in special]
    assert len(placeholders) > 12
    position = 0
    for token in placeholders:
        position = text.index(token, position) + len(token)


def test_minivllm_shim_with_a_folder_without_tokenizer(tmp_path, caplog):
    config = {**SEED_CONFIG, "vocab_size": 4096, "model_name_or_path": str(tmp_path)}
    with caplog.at_level(logging.WARNING):
        engine = LLMEngine(config=config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"{str(tmp_path)!r} holds no usable tokenizer" in warnings[0]
    assert len(engine.tokenizer) == 4096


def test_minivllm_shim_with_a_local_tokenizer_warns_nothing(tiny_qwen3, caplog):
    config = {**SEED_CONFIG, "vocab_size": 512, "model_name_or_path": str(tiny_qwen3)}
    with caplog.at_level(logging.WARNING):
        engine = LLMEngine(config=config)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert engine.tokenizer.decode(engine.tokenizer.encode("Hello there")) == "Hello there"


# Runs in a fresh interpreter in which `import triton` fails as it does where triton is not
# installed: the path finder no longer sees it (so importlib.util.find_spec says None too).
_WITHOUT_TRITON = """
import importlib.machinery
import sys


class HideTriton(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            return None
        return super().find_spec(name, path, target)


sys.meta_path = [
    HideTriton if f is importlib.machinery.PathFinder else f for f in sys.meta_path
]
try:
    import triton  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("triton is still importable: the test would prove nothing")

from minivllm import LLM, SamplingParams

llm = LLM(sys.argv[1], device="cpu", max_model_len=128)
params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
out = llm.generate(["Hello, my name is", [5, 6, 7]], params, use_tqdm=False)
assert [len(o.outputs[0].token_ids) for o in out] == [6, 6], out
assert "triton" not in sys.modules
print("ran without triton")
"""


def test_cpu_path_runs_without_triton(tiny_qwen3: Path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-P", "-c", textwrap.dedent(_WITHOUT_TRITON), str(tiny_qwen3)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ran without triton" in proc.stdout
