"""The offline progress bar: finished prompts, with the current input and output token rates."""

from __future__ import annotations

import time
from collections import deque


class Progress:
    """tqdm bar over finished prompts; the rates are over the last few seconds, as vLLM shows
    them, so they follow the run instead of averaging it."""

    WINDOW_S = 2.0

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
        self.last_refresh = 0.0
        self.window: deque[tuple[float, int, int]] = deque([(time.perf_counter(), 0, 0)])
        self.prefill_tokens = 0
        self.output_tokens = 0

    def step(self, num_prefill_tokens: int, num_output_tokens: int, num_finished: int) -> None:
        self.prefill_tokens += num_prefill_tokens
        self.output_tokens += num_output_tokens
        if self.bar is None:
            return
        now = time.perf_counter()
        if now - self.last_refresh > 0.2 or num_finished:
            self.window.append((now, self.prefill_tokens, self.output_tokens))
            while len(self.window) > 2 and now - self.window[1][0] > self.WINDOW_S:
                self.window.popleft()
            t0, p0, o0 = self.window[0]
            elapsed = max(now - t0, 1e-9)
            self.bar.set_postfix_str(
                f"prefill {(self.prefill_tokens - p0) / elapsed:,.0f} tok/s, "
                f"decode {(self.output_tokens - o0) / elapsed:,.0f} tok/s",
                refresh=False,
            )
            self.last_refresh = now
        if num_finished:
            self.bar.update(num_finished)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
