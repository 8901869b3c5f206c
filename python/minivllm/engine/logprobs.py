"""Log-probabilities for the requests that ask for them, computed on the device.

What vLLM reports by default: log_softmax of the model's raw logits (float32, before temperature
or any filter). For a sampled row, the sampled token's logprob and rank and the top-N; for a
prompt (`prompt_logprobs`), the same for every prompt token after the first, from the logits at
the position before it. The loop plans which rows of a step need them (`plan`); nothing is
computed, and the step costs nothing extra, when no request in it asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Prompt positions' logits are computed in pieces of this many rows (a vocabulary of 150k
# float32 logits is 600 KB a row).
PROMPT_CHUNK = 256


@dataclass(frozen=True)
class LogprobsPlan:
    """Which rows of one step need logprobs."""

    sample_rows: np.ndarray  # int64 [n]: sampled rows (indices into the step's samples)
    num_top_sample: int
    prompt_token_idx: np.ndarray  # int64 [m]: token rows of the step whose logits score...
    prompt_targets: np.ndarray  # int64 [m]: ...this next prompt token
    num_top_prompt: int
    prompt_spans: list[tuple[int, int, int]]  # (seq_id, first prompt position, count), in order


@dataclass(frozen=True)
class TokenLogprobs:
    """For each scored row: the chosen token's logprob and rank, the top-N ids and logprobs."""

    logprob: np.ndarray  # float32 [n]
    rank: np.ndarray  # int64 [n], 1 = the most likely token
    top_ids: np.ndarray  # int64 [n, k]
    top_logprobs: np.ndarray  # float32 [n, k]


@dataclass(frozen=True)
class StepLogprobs:
    """The host copies of one step's logprobs."""

    sample_rows: np.ndarray
    sample: TokenLogprobs | None
    prompt_spans: list[tuple[int, int, int]]
    prompt: TokenLogprobs | None


def plan(
    batch: Any,
    seq_lens: np.ndarray,
    sample_top: dict[int, int],
    prompt_top: dict[int, tuple[int, list[int], list[int]]],
) -> LogprobsPlan | None:
    """The rows of `batch` that need logprobs. sample_top: seq_id -> top-N of sampled tokens;
    prompt_top: seq_id -> (top-N, prompt ids, [first prompt position not yet scored]) (the
    position is advanced here). seq_lens: the Batch's seq_lens (from the staging buffer)."""
    sample_rows: list[int] = []
    num_top_sample = 0
    if sample_top:
        for k, seq_id in enumerate(batch.sample_seq_ids.tolist()):
            top = sample_top.get(seq_id)
            if top is not None:
                sample_rows.append(k)
                num_top_sample = max(num_top_sample, top)
    idx: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    spans: list[tuple[int, int, int]] = []
    num_top_prompt = 0
    if prompt_top:
        nd, qsl = batch.num_decodes, batch.query_start_loc
        for r in range(nd, batch.num_seqs):
            entry = prompt_top.get(int(batch.seq_ids[r]))
            if entry is None:
                continue
            top, prompt, next_pos = entry
            q_start, q_len = int(qsl[r]), int(qsl[r + 1] - qsl[r])
            start = int(seq_lens[r]) - q_len  # position of the row's first new token
            # Position p's logits score prompt token p + 1; positions below next_pos are done.
            first, stop = max(start, next_pos[0]), min(start + q_len, len(prompt) - 1)
            if first >= stop:
                continue
            idx.append(np.arange(first, stop) - start + q_start)
            targets.append(np.asarray(prompt[first + 1 : stop + 1], dtype=np.int64))
            spans.append((int(batch.seq_ids[r]), first + 1, stop - first))
            next_pos[0] = stop
            num_top_prompt = max(num_top_prompt, top)
    if not sample_rows and not spans:
        return None
    return LogprobsPlan(
        sample_rows=np.asarray(sample_rows, dtype=np.int64),
        num_top_sample=num_top_sample,
        prompt_token_idx=np.concatenate(idx) if idx else np.zeros(0, np.int64),
        prompt_targets=np.concatenate(targets) if targets else np.zeros(0, np.int64),
        num_top_prompt=num_top_prompt,
        prompt_spans=spans,
    )


def score(logits: torch.Tensor, chosen: torch.Tensor, num_top: int) -> list[torch.Tensor]:
    """[logprob, rank, top ids, top logprobs] of `chosen` ([n] ids) under `logits` ([n, V])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = lp.gather(1, chosen.view(-1, 1))  # [n, 1]
    rank = (lp > chosen_lp).sum(dim=-1) + 1
    if num_top:
        top_lp, top_ids = lp.topk(num_top, dim=-1)
    else:
        top_lp, top_ids = lp[:, :0], chosen.view(-1, 1)[:, :0]
    return [chosen_lp.squeeze(1), rank, top_ids, top_lp]


def compute(
    p: LogprobsPlan,
    logits: torch.Tensor | None,  # [S, V]: the step's sampled rows (None: the step samples none)
    sampled: torch.Tensor | None,  # [S] int64
    hidden: torch.Tensor,  # [T, hidden]: the step's tokens
    lm_head: Any,  # hidden [n, hidden] -> logits [n, V]
) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """The device tensors of one step's logprobs (sample part, prompt part)."""
    sample = None
    device = hidden.device
    if len(p.sample_rows) and logits is not None:
        rows = torch.from_numpy(p.sample_rows).to(device, non_blocking=True)
        sample = score(logits[rows], sampled[rows], p.num_top_sample)
    prompt = None
    if len(p.prompt_token_idx):
        idx = torch.from_numpy(p.prompt_token_idx).to(device, non_blocking=True)
        targets = torch.from_numpy(p.prompt_targets).to(device, non_blocking=True)
        pieces = [
            score(
                lm_head(hidden[idx[i : i + PROMPT_CHUNK]]),
                targets[i : i + PROMPT_CHUNK],
                p.num_top_prompt,
            )
            for i in range(0, len(p.prompt_token_idx), PROMPT_CHUNK)
        ]
        prompt = [torch.cat(parts) for parts in zip(*pieces)]
    return sample, prompt


def start_copy(parts: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    """Start copying the tensors to (pinned) host memory without waiting: the step's read-back
    event, recorded after this, says when they have landed."""
    if parts is None:
        return None
    if parts[0].device.type != "cuda":
        return parts
    hosts = []
    for t in parts:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        hosts.append(host)
    return hosts


def as_numpy(parts: list[torch.Tensor] | None) -> TokenLogprobs | None:
    if parts is None:
        return None
    lp, rank, ids, top = (t.numpy() for t in parts)
    return TokenLogprobs(lp, rank.astype(np.int64), ids.astype(np.int64), top)
