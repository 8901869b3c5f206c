"""The C++ core and its Python twin driven side by side on one random trace (test_core_differential.py's
machinery): the same requests, aborts and sampled tokens to both, every output, exception and
internal state compared after every call, DESIGN.md's invariants checked in both."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from minivllm._core import Scheduler as CppScheduler
from minivllm._core import StagingLayout
from minivllm.engine.reference import Scheduler as PyScheduler
from test_core_invariants import check_invariants

BATCH_ARRAYS = (
    "seq_ids",
    "input_ids",
    "positions",
    "slot_mapping",
    "query_start_loc",
    "seq_lens",
    "block_tables",
    "logits_indices",
    "sample_seq_ids",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "uniforms",
)
BATCH_SCALARS = (
    "num_decodes",
    "num_seqs",
    "num_tokens",
    "num_samples",
    "max_blocks",
    "all_greedy",
    "any_top_k_or_p",
    "any_min_p",
)
STAGED_ARRAYS = ("seq_ids", "sample_seq_ids", "query_start_loc")
EOS, STOP = 0, 1


@dataclass(frozen=True)
class Config:
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_prefix_caching: bool
    async_scheduling: bool = False

    def args(self) -> tuple:
        return (
            self.num_blocks,
            self.block_size,
            self.max_num_seqs,
            self.max_num_batched_tokens,
            self.max_model_len,
            self.enable_prefix_caching,
            self.async_scheduling,
        )


def both(py: Any, cpp: Any, call: Callable[[Any], Any]) -> Any:
    """Call on both; they must raise the same exception type or return equal values."""
    results = []
    for sched in (py, cpp):
        try:
            results.append(("ok", call(sched)))
        except (ValueError, RuntimeError, TypeError) as e:
            results.append((type(e), str(e)))
    (kind_py, value_py), (kind_cpp, value_cpp) = results
    assert kind_py == kind_cpp, (results, call)
    if kind_py == "ok":
        return value_py, value_cpp
    return None


def assert_same_batch(b_py: Any, b_cpp: Any) -> None:
    assert (b_py is None) == (b_cpp is None), (b_py, b_cpp)
    if b_py is None:
        return
    for name in BATCH_SCALARS:
        assert getattr(b_py, name) == getattr(b_cpp, name), name
    for name in BATCH_ARRAYS:
        a, b = getattr(b_py, name), getattr(b_cpp, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a, b)
        assert np.array_equal(a, b), (name, a, b)
    assert len(b_py.query_start_loc) == len(b_py.seq_ids) + 1
    assert b_py.num_decodes <= len(b_py.seq_ids)
    assert int(b_py.query_start_loc[-1]) == len(b_py.input_ids)


def staging_layout(cfg: Config, rng: np.random.Generator) -> tuple[StagingLayout, int]:
    """A schedule_into layout for `cfg`, with room to spare, the fields in a random order and
    random gaps; returns it and the host buffer size."""
    max_tokens = cfg.max_num_batched_tokens + int(rng.integers(0, 3))
    max_seqs = cfg.max_num_seqs + int(rng.integers(0, 3))
    max_blocks = -(-cfg.max_model_len // cfg.block_size) + int(rng.integers(0, 3))
    max_tiles = int(rng.integers(1, 4))
    packed = StagingLayout(max_tokens, max_seqs, max_blocks, max_tiles)
    offsets, pos = {}, 0
    for name in rng.permutation(packed.fields):
        pos += int(rng.integers(0, 4))
        offsets[str(name)] = pos
        pos += packed.size(str(name))
    layout = StagingLayout(max_tokens, max_seqs, max_blocks, max_tiles, offsets=offsets)
    assert layout.total == pos
    return layout, pos + 2


def assert_same_staged(b_py: Any, b_cpp: Any, host_py: np.ndarray, host_cpp: np.ndarray) -> None:
    """schedule_into: the twin returns its Batch, the core a StagedBatch; the staging buffers,
    the scalars and the small arrays must be equal."""
    assert (b_py is None) == (b_cpp is None), (b_py, b_cpp)
    assert np.array_equal(host_py, host_cpp)
    if b_py is None:
        return
    for name in BATCH_SCALARS:
        assert getattr(b_py, name) == getattr(b_cpp, name), name
    for name in STAGED_ARRAYS:
        a, b = getattr(b_py, name), getattr(b_cpp, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), (name, a, b)


def assert_same_state(py: Any, cpp: Any, cfg: Config) -> None:
    st_py = check_invariants(py, cfg.max_num_seqs)
    st_cpp = check_invariants(cpp, cfg.max_num_seqs)
    assert st_py == st_cpp
    assert py.stats == cpp.stats
    assert py.num_free_blocks == cpp.num_free_blocks
    assert py.has_unfinished() == cpp.has_unfinished()


class Trace:
    """A random workload from one numpy seed: arrivals with shared prefixes, aborts, samples."""

    def __init__(self, cfg: Config, seed: int) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.py = PyScheduler(*cfg.args())
        self.cpp = CppScheduler(*cfg.args())
        rng = self.rng
        self.vocab = int(rng.integers(3, 9))
        self.p_eos = float(rng.choice([0.0, 0.02, 0.1, 0.3]))
        self.arrival_rate = float(rng.choice([0.2, 0.5, 1.0, 2.0]))
        self.prefixes = [rng.integers(2, self.vocab, size=cfg.max_model_len) for _ in range(3)]
        self.next_seq_id = 0
        self.num_steps = 0
        self.num_placeholder_inputs = 0
        self.outstanding: list[np.ndarray] = []  # sample_seq_ids of Batches awaiting update()
        self.last_sampled: np.ndarray | None = None  # of the newest Batch with sampled rows
        self.layout, size = staging_layout(cfg, rng)
        self.host_py = rng.integers(-5, 5, size=size).astype(np.int32)
        self.host_cpp = self.host_py.copy()

    def request(self) -> dict[str, Any]:
        rng, cfg = self.rng, self.cfg
        mml = cfg.max_model_len
        length = (
            int(rng.integers(1, mml))
            if rng.random() < 0.5
            else int(rng.integers(1, min(mml, 3 * cfg.block_size + 2)))
        )
        prompt = self.prefixes[int(rng.integers(0, 3))][:length].copy()
        if rng.random() < 0.4:  # diverge somewhere
            cut = int(rng.integers(0, length))
            prompt[cut:] = rng.integers(2, self.vocab, size=length - cut)
        seq_id = self.next_seq_id
        self.next_seq_id += 1
        kwargs: dict[str, Any] = {
            "seq_id": seq_id,
            "prompt_token_ids": prompt.tolist() if rng.random() < 0.5 else prompt,
            "max_tokens": int(rng.integers(1, 2 * mml)),
            "ignore_eos": bool(rng.random() < 0.3),
            "eos_token_ids": (EOS,),
            "stop_token_ids": (STOP,) if rng.random() < 0.3 else (),
            "temperature": float(rng.choice([0.0, 0.7, 1.0])),
            "top_p": float(rng.choice([1.0, 0.9])),
            "top_k": int(rng.choice([0, 1, 5, 20])),
            "min_p": float(rng.choice([0.0, 0.05])),
            "seed": int(rng.choice([0, 7, 2**63, 2**64 - 1])),
        }
        if rng.random() < 0.3:
            kwargs["vocab_size"] = 20  # top_k 20 then filters nothing
        if rng.random() < 0.2:
            kwargs["temperature"] = 1e-50  # float32 0: greedy in both
        r = rng.random()  # sometimes invalid: both must reject it the same way
        if r < 0.03:
            kwargs["prompt_token_ids"] = []
        elif r < 0.06:
            kwargs["prompt_token_ids"] = [1, -3]
        elif r < 0.09:
            kwargs["vocab_size"] = 2
        elif r < 0.12:
            kwargs["prompt_token_ids"] = [2] * mml
        elif r < 0.14:
            kwargs["max_tokens"] = 0
        elif r < 0.16:
            kwargs["seq_id"] = max(0, seq_id - 1)  # maybe a duplicate
        elif r < 0.18:
            kwargs["top_p"] = math.nan
        elif r < 0.19:
            kwargs["seed"] = int(rng.choice([-1, 2**64]))
        elif r < 0.20:
            kwargs["seed"] = "7"
        return kwargs

    def sampled_tokens(self, n: int) -> np.ndarray:
        rng = self.rng
        tokens = rng.integers(1, self.vocab, size=n)
        tokens[rng.random(n) < self.p_eos] = EOS
        return tokens.astype(np.int64)

    def live_ids(self) -> list[int]:
        state = self.py.debug_state()
        return state["waiting"] + state["running"]

    def maybe_abort(self, p: float) -> None:
        if self.rng.random() < p:
            ids = self.live_ids()
            seq_id = int(self.rng.choice(ids)) if ids and self.rng.random() < 0.9 else 10**9
            both(self.py, self.cpp, lambda s: s.abort(seq_id))

    def step(self, arrivals: bool = True) -> bool:
        """One engine step; returns False when nothing could be scheduled."""
        if self.cfg.async_scheduling:
            return self.async_step(arrivals)
        py, cpp, cfg, rng = self.py, self.cpp, self.cfg, self.rng
        if arrivals:
            self.arrive()
        b_py = self.schedule_both()
        if b_py is None:
            assert not py.has_unfinished(), "schedule() returned None with work left"
            return False
        self.num_steps += 1
        num_sampled = b_py.num_samples
        if arrivals:
            self.maybe_abort(0.03)  # between schedule() and update()
        if rng.random() < 0.03:
            bad = np.zeros(num_sampled + 1, dtype=np.int64)
            assert both(py, cpp, lambda s: s.update(bad)) is None
        if num_sampled == 0 and rng.random() < 0.5:
            return True  # a Batch without samples needs no update()
        self.update_both(num_sampled)
        assert_same_state(py, cpp, cfg)
        return True

    def async_step(self, arrivals: bool) -> bool:
        """Schedule while up to one Batch awaits update(), then update the oldest one, or not."""
        py, cpp, cfg, rng = self.py, self.cpp, self.cfg, self.rng
        if arrivals:
            self.arrive()
        b_py = self.schedule_both()
        if b_py is None:
            if not self.outstanding:
                assert not py.has_unfinished(), "schedule() returned None with work left"
                return False
        else:
            self.num_steps += 1
            self.check_placeholder_inputs(b_py)
            if b_py.num_samples:
                self.outstanding.append(b_py.sample_seq_ids)
                self.last_sampled = b_py.sample_seq_ids
        if arrivals:
            self.maybe_abort(0.03)  # between schedule() and update()
        # A third schedule() with two Batches outstanding is refused.
        if rng.random() < 0.03 and len(self.outstanding) == 2:
            assert both(py, cpp, lambda s: s.schedule()) is None
        # Keep at most one Batch outstanding, sometimes none; always drain when idle.
        while self.outstanding and (
            len(self.outstanding) == 2 or b_py is None or rng.random() < 0.3
        ):
            self.update_both(len(self.outstanding.pop(0)))
        assert_same_state(py, cpp, cfg)
        return True

    def check_placeholder_inputs(self, batch: Any) -> None:
        """Input -(j + 1) is sampled row j of the newest Batch with sampled rows, and that row
        belongs to the same sequence; decode rows only."""
        ids = batch.input_ids
        if not (ids < 0).any():
            return
        assert self.cfg.async_scheduling and self.last_sampled is not None
        rows = np.flatnonzero(ids < 0)
        self.num_placeholder_inputs += len(rows)
        assert (rows < batch.num_decodes).all(), "a placeholder input outside the decode rows"
        for t in rows.tolist():
            j = -int(ids[t]) - 1
            assert 0 <= j < len(self.last_sampled)
            assert self.last_sampled[j] == batch.seq_ids[t]

    def arrive(self) -> None:
        for _ in range(int(self.rng.poisson(self.arrival_rate))):
            kwargs = self.request()
            both(self.py, self.cpp, lambda s, kw=kwargs: s.add_request(**kw))
        self.maybe_abort(0.05)

    def schedule_both(self) -> Any:
        py, cpp = self.py, self.cpp
        if self.rng.random() < 0.5:
            batches = both(py, cpp, lambda s: s.schedule())
            assert batches is not None
            assert_same_batch(*batches)
        else:
            batches = (
                py.schedule_into(self.host_py, self.layout),
                cpp.schedule_into(self.host_cpp, self.layout),
            )
            assert_same_staged(*batches, self.host_py, self.host_cpp)
        assert_same_state(py, cpp, self.cfg)
        return batches[0]

    def update_both(self, num_sampled: int) -> None:
        tokens = self.sampled_tokens(num_sampled)
        results = both(self.py, self.cpp, lambda s: s.update(tokens))
        assert results is not None
        f_py, f_cpp = results
        assert f_py == [tuple(f) for f in f_cpp]
        for _seq_id, reason, output in f_py:
            assert reason in ("stop", "length") and len(output) >= 1
            assert all(t is not None and t >= 0 for t in output)

    def run(self, num_steps: int) -> int:
        for _ in range(num_steps):
            self.step()
        for _ in range(100_000):  # drain: every request must finish and free its blocks
            if not self.step(arrivals=False):
                break
        assert not self.py.has_unfinished() and not self.cpp.has_unfinished()
        assert self.py.num_free_blocks == self.cpp.num_free_blocks == self.cfg.num_blocks
        return self.num_steps
