"""From the loop's token ids to what users get: completions, text, stop strings, RequestOutputs.

The engine loop deals in sequences and token ids; this side deals in requests. A request with
`n` completions becomes n sequences (seed + i each); the first is scheduled at once and the rest
once it has its first token, so their prompts hit the prefix cache the first one filled. Per step
only the sequences that need it are looked at: those whose text must be followed as it grows
(streams, stop strings). Everything else is decoded once, when it finishes.

`process` returns what the caller must act on: sequences to abort (a stop string ended them),
sequences to add (a request's further completions), finished requests, and for streams the
deltas (new token ids and text since the last delta, with a tail that could still become a stop
string held back).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minivllm.engine.detokenizer import IncrementalDetokenizer, find_stop, safe_end
from minivllm.engine.logprobs import StepLogprobs, TokenLogprobs
from minivllm.engine.loop import EngineLoop, EngineRequest, StepOutput
from minivllm.engine.requests import Request
from minivllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from minivllm.sampling_params import SamplingParams


@dataclass(eq=False)
class _Completion:
    request: _RequestState
    index: int
    engine_request: EngineRequest
    tracked: bool  # tokens followed step by step (a stream or stop strings)
    detokenizer: IncrementalDetokenizer | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str | None = None  # the final text, once finished
    num_sent_tokens: int = 0  # what a stream has emitted
    num_sent_chars: int = 0
    chars_before_last: int = 0  # the incremental text's length before the last token
    logprobs: list[dict[int, Logprob]] | None = None  # one per token, when asked for

    @property
    def seq_id(self) -> int:
        return self.engine_request.seq_id


@dataclass(eq=False)
class _RequestState:
    request: Request
    stream: bool
    completions: list[_Completion] = field(default_factory=list)
    waiting_children: list[EngineRequest] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_finished: int = 0
    error: str | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.num_finished == len(self.completions)


@dataclass
class ProcessedStep:
    """What the caller acts on after one step."""

    to_abort: list[int] = field(default_factory=list)  # seq ids: stop strings ended them
    to_add: list[EngineRequest] = field(default_factory=list)  # further completions of requests
    finished: list[str] = field(default_factory=list)  # request ids that ended this step
    updated: list[str] = field(default_factory=list)  # streams with new output: see delta()
    num_output_tokens: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._next_seq_id = 0
        self._requests: dict[str, _RequestState] = {}
        self._seqs: dict[int, _Completion] = {}  # unfinished sequences
        self._tracked: dict[int, _Completion] = {}  # the unfinished ones followed step by step

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    @property
    def num_unfinished(self) -> int:
        return sum(not st.finished for st in self._requests.values())

    def add(self, request: Request, stream: bool = False) -> list[EngineRequest]:
        """Register a request; returns the sequences to hand to the loop now."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        st = _RequestState(request, stream)
        sp = request.params
        track = stream or bool(sp.stop_strings) or sp.logprobs is not None
        if sp.prompt_logprobs is not None:
            st.prompt_logprobs = [None] * len(request.prompt_token_ids)
        for i in range(sp.n):
            er = EngineRequest(
                seq_id=self._next_seq_id,
                prompt_token_ids=request.prompt_token_ids,
                max_tokens=request.max_tokens,
                temperature=float(sp.temperature),
                top_p=float(sp.top_p),
                top_k=int(sp.top_k),
                min_p=float(sp.min_p),
                seed=(request.seed + i) % 2**64,
                ignore_eos=sp.ignore_eos,
                stop_token_ids=tuple(sp.stop_token_ids or ()),
                logprobs=sp.logprobs,
                # The prompt is scored once, by the first completion.
                prompt_logprobs=sp.prompt_logprobs if i == 0 else None,
            )
            self._next_seq_id += 1
            c = _Completion(st, i, er, track)
            if sp.logprobs is not None:
                c.logprobs = []
            if track and self.tokenizer is not None:
                c.detokenizer = IncrementalDetokenizer(self.tokenizer, sp.skip_special_tokens)
            st.completions.append(c)
            self._seqs[er.seq_id] = c
            if track:
                self._tracked[er.seq_id] = c
        self._requests[request.request_id] = st
        first, *rest = (c.engine_request for c in st.completions)
        st.waiting_children = rest
        return [first]

    def abort(self, request_id: str) -> list[int]:
        """Forget a request; returns its sequences for the loop to abort."""
        st = self._requests.pop(request_id, None)
        if st is None:
            return []
        seq_ids = [c.seq_id for c in st.completions]
        for s in seq_ids:
            self._seqs.pop(s, None)
            self._tracked.pop(s, None)
        return seq_ids

    def fail(self, request_id: str, message: str) -> list[int]:
        """End a request with an error (it stays, finished, for `output`)."""
        st = self._requests.get(request_id)
        if st is None:
            return []
        st.error = message
        st.finished_time = time.perf_counter()
        seq_ids = [c.seq_id for c in st.completions]
        for s in seq_ids:
            self._seqs.pop(s, None)
            self._tracked.pop(s, None)
        return seq_ids

    def request_id_of(self, seq_id: int) -> str | None:
        c = self._seqs.get(seq_id)
        return None if c is None else c.request.request.request_id

    def error(self, request_id: str) -> str | None:
        return self._requests[request_id].error

    def run_step(self, loop: EngineLoop) -> tuple[StepOutput, ProcessedStep]:
        """One step of `loop` in this thread, processed; the sequences stop strings ended are
        aborted and further completions (n > 1) handed to the loop."""
        out = loop.step()
        done = self.process(out)
        for seq_id in done.to_abort:
            loop.abort(seq_id)
        for er in done.to_add:
            loop.add(er)
        return out, done

    def process(self, out: StepOutput, now: float | None = None) -> ProcessedStep:
        now = time.perf_counter() if now is None else now
        res = ProcessedStep(num_output_tokens=len(out.token_ids))
        updated: dict[int, _RequestState] = {}
        for seq_id, why in out.rejected:
            c = self._seqs.get(seq_id)
            if c is not None:  # (fail() forgets the request's other sequences)
                request_id = c.request.request.request_id
                self.fail(request_id, why)
                res.finished.append(request_id)
        for seq_id in out.launched_prefill_seq_ids.tolist():
            c = self._seqs.get(seq_id)
            if c is not None and c.request.first_scheduled_time is None:
                c.request.first_scheduled_time = now
        # Rows past the decodes ended a prefill: a first token (or one after a preemption).
        for seq_id in out.sampled_seq_ids[out.num_decodes :].tolist():
            c = self._seqs.get(seq_id)
            if c is None or c.request.first_token_time is not None:
                continue
            c.request.first_token_time = now
            res.to_add.extend(c.request.waiting_children)
            c.request.waiting_children = []
        for lp in out.logprobs:
            if lp.prompt is not None:
                self._prompt_logprobs(lp)
        if self._tracked:
            self._follow(out, res, updated)
        for seq_id, reason, output_ids in out.finished:
            c = self._seqs.get(seq_id)
            if c is None:
                continue
            c.token_ids = list(output_ids)
            stop_ids = c.request.request.params.stop_token_ids or ()
            stop_reason = output_ids[-1] if reason == "stop" and output_ids else None
            self._finish(c, reason, stop_reason if stop_reason in stop_ids else None, now, res)
            updated[id(c.request)] = c.request
        res.updated = [st.request.request_id for st in updated.values() if st.stream]
        return res

    def _follow(self, out: StepOutput, res: ProcessedStep, updated: dict[int, Any]) -> None:
        """Append each followed sequence's token, grow its text, end it at a stop string."""
        tracked = self._tracked
        now = time.perf_counter()
        # The read-back step's sampled-token logprobs (the last entry, if it scored any rows).
        lp = out.logprobs[-1] if out.logprobs else None
        lp_row: dict[int, int] = {}  # sampled row -> its row in lp.sample
        if lp is not None and lp.sample is not None:
            lp_row = {int(k): j for j, k in enumerate(lp.sample_rows.tolist())}
        for k, (seq_id, token) in enumerate(
            zip(out.sampled_seq_ids.tolist(), out.token_ids.tolist())
        ):
            c = tracked.get(seq_id)
            if c is None:
                continue
            c.token_ids.append(token)
            if c.logprobs is not None and k in lp_row:
                num_top = c.request.request.params.logprobs
                c.logprobs.append(self._logprob_dict(lp.sample, lp_row[k], token, num_top))
            updated[id(c.request)] = c.request
            d = c.detokenizer
            stops = c.request.request.params.stop_strings
            if d is None:
                continue
            before = c.chars_before_last = len(d.text)
            d.push(token)
            if stops and len(d.text) > before:
                hit = find_stop(d.text, stops, before)
                if hit is not None:
                    pos, stop = hit
                    c.text = d.text[: _stop_end(pos, stop, c.request.request.params)]
                    self._finish(c, "stop", stop, now, res)
                    res.to_abort.append(seq_id)

    def _logprob_dict(
        self, t: TokenLogprobs, j: int, token: int, num_top: int
    ) -> dict[int, Logprob]:
        """{token: its Logprob} and the top num_top's, for scored row j (the step scored the
        most any of its rows asked for)."""
        entry = {token: Logprob(float(t.logprob[j]), int(t.rank[j]), self._token_text(token))}
        top_ids, top_lps = t.top_ids[j, :num_top].tolist(), t.top_logprobs[j, :num_top].tolist()
        for r, (tid, value) in enumerate(zip(top_ids, top_lps)):
            if tid not in entry:
                entry[tid] = Logprob(float(value), r + 1, self._token_text(tid))
        return entry

    def _token_text(self, token_id: int) -> str | None:
        if self.tokenizer is None or token_id >= len(self.tokenizer):
            return None
        return self.tokenizer.decode([token_id])

    def _prompt_logprobs(self, lp: StepLogprobs) -> None:
        pos = 0
        for seq_id, first, count in lp.prompt_spans:
            c = self._seqs.get(seq_id)
            if c is not None and c.request.prompt_logprobs is not None:
                prompt = c.request.request.prompt_token_ids
                num_top = c.request.request.params.prompt_logprobs
                for i in range(count):
                    entry = self._logprob_dict(lp.prompt, pos + i, prompt[first + i], num_top)
                    c.request.prompt_logprobs[first + i] = entry
            pos += count

    def _finish(
        self, c: _Completion, reason: str, stop_reason: int | str | None, now: float,
        res: ProcessedStep,
    ) -> None:  # fmt: skip
        if c.finish_reason is not None:
            return
        c.finish_reason, c.stop_reason = reason, stop_reason
        if c.text is None:
            c.text = self._final_text(c)
        self._seqs.pop(c.seq_id, None)
        self._tracked.pop(c.seq_id, None)
        st = c.request
        st.num_finished += 1
        if st.num_finished == len(st.completions):
            st.finished_time = now
            res.finished.append(st.request.request_id)

    def _final_text(self, c: _Completion) -> str:
        """The completion's text; a stop string found in it ends it there. A stop token id or
        EOS that ended it stays in its token ids but adds no text (vLLM's rule), unless
        include_stop_str_in_output."""
        sp = c.request.request.params
        drop_last = (
            c.finish_reason == "stop"
            and not isinstance(c.stop_reason, str)
            and not sp.include_stop_str_in_output
        )
        ids = c.token_ids[:-1] if drop_last else c.token_ids
        text = self.decode(ids, sp.skip_special_tokens)
        # The incremental text lacks the bytes of a character the completion ended halfway
        # through (the full decode shows them as U+FFFD, as LLM.generate does). What a stream
        # already sent must stay a prefix of the final text.
        if c.detokenizer is not None:
            incremental = c.detokenizer.text
            if drop_last:  # the last token was pushed too (followed step by step)
                incremental = incremental[: c.chars_before_last]
            if not text.startswith(incremental):
                text = incremental
        if sp.stop_strings:
            hit = find_stop(text, sp.stop_strings, 0)
            if hit is not None:
                c.stop_reason, text = hit[1], text[: _stop_end(*hit, sp)]
                c.finish_reason = "stop"
        return text

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        # Random-weight models may sample ids past the tokenizer's vocabulary: they have no text.
        limit = len(self.tokenizer)
        ids = np.asarray(token_ids, dtype=np.int64)
        return self.tokenizer.decode(
            ids[ids < limit].tolist(), skip_special_tokens=skip_special_tokens
        )

    def output(self, request_id: str, pop: bool = True) -> RequestOutput:
        """The request's whole output so far (finished or not)."""
        st = self._requests.pop(request_id) if pop else self._requests[request_id]
        return self._output(st, delta=False)

    def delta(self, request_id: str, pop: bool = False) -> RequestOutput:
        """A stream's output since its last delta (the last one, finished, pops it)."""
        st = self._requests.pop(request_id) if pop else self._requests[request_id]
        return self._output(st, delta=True)

    def _output(self, st: _RequestState, delta: bool) -> RequestOutput:
        r = st.request
        completions = []
        for c in st.completions:
            text = c.text
            if text is None:
                text = c.detokenizer.text if c.detokenizer is not None else ""
                if c.detokenizer is not None and delta:
                    text = text[: safe_end(text, r.params.stop_strings)]
                elif c.detokenizer is None:
                    text = self.decode(c.token_ids, r.params.skip_special_tokens)
            if delta:  # slices are copies
                token_ids, text = c.token_ids[c.num_sent_tokens :], text[c.num_sent_chars :]
                logprobs = None if c.logprobs is None else c.logprobs[c.num_sent_tokens :]
                c.num_sent_tokens += len(token_ids)
                c.num_sent_chars += len(text)
            else:
                token_ids = list(c.token_ids)
                logprobs = None if c.logprobs is None else list(c.logprobs)
            completions.append(
                CompletionOutput(
                    index=c.index,
                    text=text,
                    token_ids=token_ids,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    logprobs=logprobs,
                )
            )
        metrics = None  # a stream's deltas carry the metrics once, at the end
        if not delta or st.finished:
            metrics = RequestMetrics(
                arrival_time=r.arrival_time,
                first_scheduled_time=st.first_scheduled_time,
                first_token_time=st.first_token_time,
                finished_time=st.finished_time,
            )
        return RequestOutput(
            request_id=r.request_id,
            prompt=r.prompt,
            prompt_token_ids=r.prompt_token_ids,
            outputs=completions,
            finished=st.finished,
            metrics=metrics,
            prompt_logprobs=st.prompt_logprobs,
        )


def _stop_end(pos: int, stop: str, params: SamplingParams) -> int:
    """Where a completion's text ends at a stop string found at `pos`: before it, or after it
    with include_stop_str_in_output."""
    return pos + len(stop) if params.include_stop_str_in_output else pos
