"""LLM: the offline engine users call (vLLM's API): tokenizer, request intake, step loop, outputs.

One generate call: validate every prompt and SamplingParams first (a bad one raises before anything
is scheduled), hand all requests to the scheduler, then loop schedule -> ModelRunner.launch ->
read back -> update until all finish; with async scheduling the next step is scheduled and
launched before the previous one's ids are read back, so the host works while the GPU does. Per
step the Python side only looks at what the scheduler returns; text is decoded once at the end,
except for requests with stop strings, which are detokenized as they grow.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minivllm.config import EngineConfig
from minivllm.engine import RuntimeInfo, make_scheduler, scheduler_class
from minivllm.engine.model_runner import ModelRunner, StepResult
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from minivllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | Sequence[int] | dict
_SEED_LIMIT = 2**63
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class _Request:
    """One validated prompt, ready for the scheduler."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # after the per-request max_model_length cap
    seed: int
    seq_id: int = -1
    output_token_ids: list[int] = field(default_factory=list)  # only tracked for stop strings
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str | None = None  # set when a stop string was found


def load_tokenizer(path: str, *, warn: bool = True) -> Any:
    """The tokenizer in a folder (or a name in the local Hugging Face cache) through
    transformers, local files only; None if there is none, with a warning unless warn=False."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json's model type.
        if warn:
            logger.warning("no tokenizer files in %s; only token-id prompts will work", path)
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        if warn:
            logger.warning(
                "no usable tokenizer in %s (%s); only token-id prompts will work", path, e
            )
        return None


class LLM:
    """An offline LLM engine for a local Hugging Face Qwen3 checkpoint folder.

    Engine arguments (see EngineConfig): dtype, device, max_model_len, max_num_seqs,
    max_num_batched_tokens, block_size, num_kv_blocks, gpu_memory_utilization,
    enable_prefix_caching, enforce_eager, tensor_parallel_size, scheduler, attention_backend,
    load_format, seed, tokenizer.

    With tensor_parallel_size > 1 the engine owns worker processes: `close()` ends them (also a
    context manager, on garbage collection, and at interpreter exit).
    """

    def __init__(self, model: str, **engine_args: Any):
        self.config = EngineConfig.create(model, **engine_args)
        scheduler_class(self.config.scheduler)  # fail before loading weights if it is missing
        self.tokenizer = load_tokenizer(self.config.tokenizer_path)
        self.model_runner = ModelRunner(self.config)
        try:
            num_blocks = self.model_runner.kv_cache_info.num_blocks
            self.runtime = RuntimeInfo(
                num_kv_blocks=num_blocks,
                eos_token_ids=self._find_eos_token_ids(),
                vocab_size=self.config.model_config.vocab_size,
            )
            self.scheduler = make_scheduler(self.config, num_blocks)
        except BaseException:
            self.model_runner.close()
            raise
        self._next_seq_id = 0
        self._seed_rng = np.random.default_rng(self.config.seed)
        logger.info(
            "minivllm ready: %s (%s, %s), %d KV blocks, scheduler=%s, eos ids %s",
            self.config.model,
            self.config.torch_dtype,
            self.model_runner.device,
            num_blocks,
            self.config.scheduler,
            list(self.runtime.eos_token_ids),
        )

    # ---- public API ----------------------------------------------------------------------

    def close(self) -> None:
        """End the tensor-parallel workers; the engine cannot generate afterwards. Idempotent."""
        runner = self.__dict__.get("model_runner")
        if runner is not None:
            runner.close()

    def __enter__(self) -> LLM:  # noqa: PYI034 - py310 has no typing.Self
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - nothing useful to do during collection
            pass

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    @property
    def num_free_blocks(self) -> int:
        return int(self.scheduler.num_free_blocks)

    @property
    def stats(self) -> dict[str, int]:
        """Scheduler counters: num_preemptions, prefix_cache_queries, prefix_cache_hits."""
        return dict(self.scheduler.stats)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete each prompt (a string, a list of token ids, or a list of either).

        `sampling_params` is one SamplingParams for all prompts or one per prompt. Outputs come
        back in prompt order.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = self._as_params_list(sampling_params, len(prompt_list))
        requests = [
            self._make_request(i, p, sp) for i, (p, sp) in enumerate(zip(prompt_list, params_list))
        ]
        return self._run(requests, use_tqdm)

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        **chat_template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them, then
        generate. Each conversation is a list of {"role": ..., "content": ...} dicts."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer, and this model folder has none")
        if not messages:
            raise ValueError("chat needs at least one message")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts: list[dict[str, Any]] = []
        for conv in conversations:
            if not conv or not all(isinstance(m, dict) for m in conv):
                raise ValueError("each conversation must be a non-empty list of message dicts")
            text = self.tokenizer.apply_chat_template(
                list(conv),
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                **chat_template_kwargs,
            )
            # The template already wrote any special tokens: do not add them twice.
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # ---- intake and validation -----------------------------------------------------------

    def _find_eos_token_ids(self) -> tuple[int, ...]:
        import json

        ids: list[int] = list(self.config.model_config.eos_token_ids)
        gen_file = Path(self.config.model) / "generation_config.json"
        if gen_file.is_file():
            try:
                eos = json.loads(gen_file.read_text()).get("eos_token_id")
            except json.JSONDecodeError:
                eos = None
            ids.extend(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        vocab = self.config.model_config.vocab_size
        return tuple(sorted({int(i) for i in ids if 0 <= int(i) < vocab}))

    def _as_params_list(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            params = [SamplingParams()] * n
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * n
        else:
            params = list(sampling_params)
            if len(params) != n:
                raise ValueError(
                    f"got {len(params)} SamplingParams for {n} prompts; pass one or one per prompt"
                )
        for i, sp in enumerate(params):
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"sampling_params[{i}] is {type(sp).__name__}, not SamplingParams")
            try:
                sp.validate()
            except ValueError as e:
                raise ValueError(f"sampling_params[{i}]: {e}") from None
        return params

    def _make_request(self, index: int, prompt: PromptType, sp: SamplingParams) -> _Request:
        """Tokenize and check one prompt; ValueError names the prompt and the problem."""
        text: str | None
        if isinstance(prompt, dict):
            text = prompt.get("prompt")
            ids = prompt.get("prompt_token_ids")
            if ids is None:
                if not isinstance(text, str):
                    raise ValueError(
                        f"prompt {index}: a dict prompt needs 'prompt' or 'prompt_token_ids'"
                    )
                ids = self._encode(index, text)
        elif isinstance(prompt, str):
            text, ids = prompt, self._encode(index, prompt)
        else:
            text, ids = None, prompt
        try:
            arr = np.asarray(ids)
        except (TypeError, ValueError):
            raise ValueError(f"prompt {index}: token ids must be a flat list of ints") from None
        if arr.size == 0:
            raise ValueError(f"prompt {index} is empty")
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"prompt {index}: token ids must be a flat list of ints")
        vocab = self.config.model_config.vocab_size
        bad = (arr < 0) | (arr >= vocab)
        if bad.any():
            raise ValueError(
                f"prompt {index}: token id {int(arr[bad][0])} is outside the vocabulary "
                f"[0, {vocab})"
            )
        num = int(arr.size)
        limit = self.config.max_model_len
        if num >= limit:
            raise ValueError(
                f"prompt {index} has {num} tokens; max_model_len={limit} leaves no room to "
                "generate (the prompt must be shorter than max_model_len)"
            )
        max_tokens = sp.max_tokens
        if sp.max_model_length is not None:
            if num >= sp.max_model_length:
                raise ValueError(
                    f"prompt {index} has {num} tokens, not less than its SamplingParams "
                    f"max_model_length={sp.max_model_length}"
                )
            max_tokens = min(max_tokens, sp.max_model_length - num)
        seed = sp.seed if sp.seed is not None else int(self._seed_rng.integers(0, _SEED_LIMIT))
        return _Request(
            prompt=text,
            prompt_token_ids=arr.astype(np.int64).tolist(),
            params=sp,
            max_tokens=max_tokens,
            seed=seed % _SEED_LIMIT,
        )

    def _encode(self, index: int, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(
                f"prompt {index} is text, but this model folder has no tokenizer; pass token ids"
            )
        if not text:
            raise ValueError(f"prompt {index} is empty")
        return self.tokenizer.encode(text)

    # ---- the step loop -------------------------------------------------------------------

    def _run(self, requests: list[_Request], use_tqdm: bool) -> list[RequestOutput]:
        n = len(requests)
        if n == 0:
            return []
        base = self._next_seq_id
        self._next_seq_id += n
        arrival = time.perf_counter()
        has_stop = np.array([bool(r.params.stop_strings) for r in requests])
        first_scheduled = np.full(n, math.nan)
        first_token = np.full(n, math.nan)
        finished_time = np.full(n, math.nan)
        done = np.zeros(n, dtype=bool)
        pbar = _Progress(n, enabled=use_tqdm)
        eos = self.runtime.eos_token_ids
        vocab = self.runtime.vocab_size
        # Launched steps with sampled rows whose ids are not yet passed to update(), oldest first:
        # with async scheduling step N+1 is planned and launched before step N's ids are read.
        in_flight: deque[tuple[Any, StepResult | None]] = deque()
        depth = 2 if self.config.async_scheduling else 1
        runner = self.model_runner
        try:
            for i, r in enumerate(requests):
                r.seq_id = base + i
                sp = r.params
                self.scheduler.add_request(
                    r.seq_id,
                    r.prompt_token_ids,
                    r.max_tokens,
                    ignore_eos=sp.ignore_eos,
                    eos_token_ids=eos,
                    stop_token_ids=tuple(sp.stop_token_ids or ()),
                    temperature=float(sp.temperature),
                    top_p=float(sp.top_p),
                    top_k=int(sp.top_k),
                    min_p=float(sp.min_p),
                    vocab_size=vocab,
                    seed=r.seed,
                )
            num_done = 0
            while num_done < n or in_flight:
                batch = None
                if num_done < n:
                    # The core writes the step's arrays straight into the staging buffer.
                    batch = runner.schedule(self.scheduler)
                    if batch is None and not in_flight:
                        raise RuntimeError(
                            "the scheduler has unfinished requests but scheduled none"
                        )
                if batch is not None:
                    rows = batch.seq_ids - base
                    first_scheduled[rows[np.isnan(first_scheduled[rows])]] = time.perf_counter()
                    if batch.num_samples:
                        in_flight.append((batch, None))  # awaits update() from here on
                        in_flight[-1] = (batch, runner.launch(batch, staged=True))
                    else:  # nothing to deliver: such a Batch needs no update()
                        runner.launch(batch, staged=True)
                        pbar.step(batch.num_tokens - batch.num_decodes, 0, 0)
                if not in_flight or (batch is not None and len(in_flight) < depth):
                    continue
                # Read back the oldest step (the GPU works on the newer one meanwhile).
                done_batch, result = in_flight.popleft()
                token_ids = result.result()
                finished = self.scheduler.update(token_ids)
                now = time.perf_counter()
                sampled_rows = done_batch.sample_seq_ids - base
                live = ~done[sampled_rows]  # rows of requests that ended earlier are wasted
                first_token[sampled_rows[live & np.isnan(first_token[sampled_rows])]] = now
                newly_done = self._finish(
                    requests, base, finished, token_ids, sampled_rows, has_stop & ~done
                )
                for i in newly_done:
                    done[i] = True
                    finished_time[i] = now
                num_done += len(newly_done)
                num_prefill = done_batch.num_tokens - done_batch.num_decodes
                pbar.step(num_prefill, int(live.sum()), len(newly_done))
        except BaseException:
            # Leave the engine usable: drop every request of this call that is still running,
            # then close the steps in flight (all their rows are aborted: tokens ignored).
            for r in requests:
                if r.seq_id >= 0 and not done[r.seq_id - base]:
                    try:
                        self.scheduler.abort(r.seq_id)
                    except (ValueError, KeyError):
                        pass
            for b, _ in in_flight:
                self.scheduler.update(np.zeros(b.num_samples, dtype=np.int64))
            raise
        finally:
            pbar.close()
        return [
            self._output(r, arrival, first_scheduled[i], first_token[i], finished_time[i])
            for i, r in enumerate(requests)
        ]

    def _finish(
        self,
        requests: list[_Request],
        base: int,
        finished: list[tuple[int, str, list[int]]],
        token_ids: np.ndarray,
        sampled_rows: np.ndarray,
        has_stop: np.ndarray,
    ) -> list[int]:
        """Record what finished this step, and end requests whose text hit a stop string."""
        newly_done: list[int] = []
        finished_rows: set[int] = set()
        for seq_id, reason, output_ids in finished:
            i = int(seq_id) - base
            r = requests[i]
            r.output_token_ids = list(output_ids)
            r.finish_reason = reason
            if (
                reason == "stop"
                and output_ids
                and output_ids[-1] in (r.params.stop_token_ids or ())
            ):
                r.stop_reason = int(output_ids[-1])
            if has_stop[i]:
                self._check_stop_strings(r)
            finished_rows.add(i)
            newly_done.append(i)
        stop_rows = np.flatnonzero(has_stop[sampled_rows])
        for k in stop_rows:  # only requests with stop strings are detokenized as they grow
            i = int(sampled_rows[k])
            if i in finished_rows:
                continue
            r = requests[i]
            r.output_token_ids.append(int(token_ids[k]))
            if self._check_stop_strings(r, only_tail=True):
                self.scheduler.abort(r.seq_id)
                newly_done.append(i)
        return newly_done

    def _check_stop_strings(self, r: _Request, only_tail: bool = False) -> bool:
        """End `r` at the first stop string in its text. With only_tail, look only at the last
        tokens (enough for the longest stop string even at 4 byte tokens per character): earlier
        text was already checked in earlier steps, so each step costs O(stop length)."""
        skip = r.params.skip_special_tokens
        if only_tail:
            window = 4 * max(len(s) for s in r.params.stop_strings) + 4
            tail = self._decode(r.output_token_ids[-window:], skip)
            if not any(s in tail for s in r.params.stop_strings):
                return False
        text = self._decode(r.output_token_ids, skip)
        hits = [(text.find(s), s) for s in r.params.stop_strings if s in text]
        if not hits:
            return False
        pos, stop = min(hits)
        r.text = text[:pos]
        r.finish_reason = "stop"
        r.stop_reason = stop
        return True

    def _decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        if self.tokenizer is None:
            return ""
        # Random-weight models may sample ids past the tokenizer's vocabulary: they have no text.
        limit = len(self.tokenizer)
        ids = [t for t in token_ids if t < limit]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _output(
        self, r: _Request, arrival: float, scheduled: float, first_token: float, done: float
    ) -> RequestOutput:
        text = r.text
        if text is None:
            text = self._decode(r.output_token_ids, r.params.skip_special_tokens)
        metrics = RequestMetrics(
            arrival_time=arrival,
            first_scheduled_time=None if math.isnan(scheduled) else float(scheduled),
            first_token_time=None if math.isnan(first_token) else float(first_token),
            finished_time=None if math.isnan(done) else float(done),
        )
        completion = CompletionOutput(
            index=0,
            text=text,
            token_ids=list(r.output_token_ids),
            finish_reason=r.finish_reason,
            stop_reason=r.stop_reason,
        )
        return RequestOutput(
            request_id=str(r.seq_id),
            prompt=r.prompt,
            prompt_token_ids=r.prompt_token_ids,
            outputs=[completion],
            finished=r.finish_reason is not None,
            metrics=metrics,
        )


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    """A single prompt (string, token ids, dict) or a list of them -> a list of prompts."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        return [prompts] if prompts.ndim == 1 else list(prompts)
    if not isinstance(prompts, Sequence):
        raise ValueError(
            f"prompts must be a string, token ids, or a list of them; got {type(prompts).__name__}"
        )
    prompts = list(prompts)
    if prompts and all(
        isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in prompts
    ):
        return [prompts]  # one prompt given as token ids
    return prompts


class _Progress:
    """tqdm bar over finished prompts with live prefill and decode throughput."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
        self.start = time.perf_counter()
        self.last_refresh = 0.0
        self.prefill_tokens = 0
        self.output_tokens = 0

    def step(self, num_prefill_tokens: int, num_output_tokens: int, num_finished: int) -> None:
        self.prefill_tokens += num_prefill_tokens
        self.output_tokens += num_output_tokens
        if self.bar is None:
            return
        now = time.perf_counter()
        if now - self.last_refresh > 0.2 or num_finished:
            elapsed = max(now - self.start, 1e-9)
            self.bar.set_postfix_str(
                f"prefill {self.prefill_tokens / elapsed:,.0f} tok/s, "
                f"decode {self.output_tokens / elapsed:,.0f} tok/s",
                refresh=False,
            )
            self.last_refresh = now
        if num_finished:
            self.bar.update(num_finished)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
