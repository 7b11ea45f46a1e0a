"""Per-request text: incremental detokenization and stop strings, never emitted in part."""

from __future__ import annotations

from surge.sampling_params import SamplingParams
from surge.tokenizer import IncrementalDetokenizer, Tokenizer


class RequestDetokenizer:
    """Accumulates a request's output text; finds stop strings even across token boundaries.

    While a request runs, the last len(longest stop) - 1 characters are held back from
    `emittable()`: they might be the start of a stop string that the next token completes.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams):
        self.stream = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.stops = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.text = ""

    def add(self, token_id: int) -> str | None:
        """Append a token; return the stop string it completed (text is cut there), if any."""
        before = len(self.text)
        self.text += self.stream.add(token_id)
        if not self.stops or len(self.text) == before:
            return None
        start = max(0, before - self.max_stop + 1)  # a stop may begin in earlier text
        hits = [(idx, s) for s in self.stops if (idx := self.text.find(s, start)) != -1]
        if not hits:
            return None
        idx, stop = min(hits)
        self.text = self.text[: idx + len(stop)] if self.include_stop else self.text[:idx]
        return stop

    def finish(self) -> None:
        """The request ended without a stop string: release any held-back bytes."""
        self.text += self.stream.flush()

    def emittable(self, finished: bool) -> str:
        if finished or self.max_stop <= 1:
            return self.text
        return self.text[: max(0, len(self.text) - (self.max_stop - 1))]
