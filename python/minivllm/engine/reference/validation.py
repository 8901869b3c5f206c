"""What the core refuses: argument conversion as its bindings do it (csrc/bindings/
core_bindings.cc: the same types are accepted and the same exception is raised first, argument
by argument), then the checks of the constructor and add_request in csrc/scheduler.cc."""

from __future__ import annotations

import operator
from collections.abc import Container
from typing import Any

import numpy as np

from minivllm.engine.reference.sequence import Sequence

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The smallest float that rounds to float32 infinity: halfway between float32's max and 2**128.
_FLOAT32_OVERFLOW = float.fromhex("0x1.ffffffp+127")


def describe(value: Any) -> str:
    return str(value.dtype) if isinstance(value, np.ndarray) else type(value).__name__


def int64_arg(value: Any, name: str) -> int:
    """`value` as an int: TypeError unless operator.index accepts it, ValueError naming `name`
    and the value when it does not fit int64."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} {value} does not fit int64")
    return value


def float_arg(value: Any, name: str) -> float:
    """`value` as a float, as float() takes a number: TypeError for anything else (strings
    too), ValueError naming `name` for an int too large for a float."""
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} {value} does not fit a float") from None
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float, got {value!r}") from None


def seed_arg(value: Any) -> int:
    try:
        seed = operator.index(value)
    except TypeError:
        raise TypeError(f"seed must be an int, got {value!r}") from None
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def int_list_arg(values: Any, name: str, item: str) -> list[int]:
    """A 1-D integer array or an iterable of ints, as ints that fit int64; `item` names one
    element in errors."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "iu" or values.ndim != 1:
            raise ValueError(
                f"{name} must be a 1-D integer array, got {values.dtype} of shape {values.shape}"
            )
        ints = values.tolist()
        if values.dtype == np.uint64:  # the one integer dtype int64 cannot hold
            for v in ints:
                if v > INT64_MAX:
                    raise ValueError(f"{item} {v} does not fit int64")
        return ints
    return [int64_arg(v, item) for v in values]


def check_config(
    num_blocks: Any,
    block_size: Any,
    max_num_seqs: Any,
    max_num_batched_tokens: Any,
    max_model_len: Any,
) -> tuple[int, int, int, int, int]:
    """The constructor's sizes as ints, or ValueError / TypeError naming the bad one."""
    num_blocks = int64_arg(num_blocks, "num_blocks")
    block_size = int64_arg(block_size, "block_size")
    max_num_seqs = int64_arg(max_num_seqs, "max_num_seqs")
    max_num_batched_tokens = int64_arg(max_num_batched_tokens, "max_num_batched_tokens")
    max_model_len = int64_arg(max_model_len, "max_model_len")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if num_blocks * block_size > INT32_MAX:
        raise ValueError(
            f"num_blocks * block_size = {num_blocks} * {block_size} does not fit int32 slots"
        )
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    if max_num_batched_tokens < max_num_seqs:
        raise ValueError(
            f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
            f"({max_num_seqs})"
        )
    if max_model_len < 2 or max_model_len > INT32_MAX:
        raise ValueError(f"max_model_len must be in [2, 2**31 - 1], got {max_model_len}")
    return num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len


def new_sequence(
    seq_id: Any,
    prompt_token_ids: Any,
    max_tokens: Any,
    ignore_eos: Any,
    eos_token_ids: Any,
    stop_token_ids: Any,
    temperature: Any,
    top_p: Any,
    top_k: Any,
    min_p: Any,
    vocab_size: Any,
    seed: Any,
    skip_prefix_cache: Any,
    *,
    in_use: Container[int],
    num_blocks: int,
    block_size: int,
    max_model_len: int,
) -> Sequence:
    """add_request's arguments, converted and checked, as a waiting Sequence; ValueError (or
    TypeError for a wrong type) naming the bad value. `in_use`: the unfinished seq_ids."""
    seq_id = int64_arg(seq_id, "seq_id")
    seed = seed_arg(seed)
    max_tokens = int64_arg(max_tokens, "max_tokens")
    top_k = int64_arg(top_k, "top_k")
    temperature = float_arg(temperature, "temperature")
    top_p = float_arg(top_p, "top_p")
    min_p = float_arg(min_p, "min_p")
    eos = tuple(int_list_arg(eos_token_ids, "eos_token_ids", "eos token id"))
    stop = tuple(int_list_arg(stop_token_ids, "stop_token_ids", "stop token id"))
    if vocab_size is not None:
        vocab_size = int64_arg(vocab_size, "vocab_size")
    prompt = int_list_arg(prompt_token_ids, "prompt_token_ids", "prompt token id")

    if seq_id in in_use:
        raise ValueError(f"seq_id {seq_id} is already in use by an unfinished request")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    # The Batch carries float32: a temperature that rounds to infinity or a top_p that rounds to
    # 0 is refused, and the float32 casts stay in range.
    if not (0.0 <= temperature < _FLOAT32_OVERFLOW):
        raise ValueError(f"temperature must be finite and >= 0 (as float32), got {temperature}")
    if not (0.0 < top_p <= 1.0 and np.float32(top_p) > 0):
        raise ValueError(f"top_p must be in (0, 1] (and > 0 as float32), got {top_p}")
    if not (0 <= top_k <= INT32_MAX):
        raise ValueError(f"top_k must be in [0, 2**31 - 1] (0 = off), got {top_k}")
    if not (0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if not prompt:
        raise ValueError("prompt_token_ids is empty")
    limit = INT32_MAX if vocab_size is None else vocab_size - 1
    for i, t in enumerate(prompt):
        if t < 0 or t > limit:
            bound = "2**31 - 1" if vocab_size is None else f"vocab_size {vocab_size}"
            raise ValueError(f"prompt token id {t} at index {i} is out of range [0, {bound})")
    if len(prompt) >= max_model_len:
        raise ValueError(f"prompt length {len(prompt)} >= max_model_len {max_model_len}")
    max_total = min(len(prompt) + max_tokens, max_model_len)
    # The last token is never fed back, so max_total - 1 tokens ever need a KV slot.
    max_blocks = -(-(max_total - 1) // block_size)
    if max_blocks > num_blocks:
        raise ValueError(
            f"request {seq_id} can grow to {max_total} tokens = {max_blocks} KV blocks, "
            f"more than the pool's num_blocks {num_blocks}"
        )
    return Sequence(
        seq_id,
        prompt,
        max_tokens,
        bool(ignore_eos),
        eos,
        stop,
        temperature,
        top_p,
        top_k,
        min_p,
        seed,
        vocab_size,
        bool(skip_prefix_cache),
    )
