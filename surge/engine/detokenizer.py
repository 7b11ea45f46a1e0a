"""Per-request text: incremental detokenization and stop-string matching on the decoded text."""

from __future__ import annotations

from surge.sampling_params import SamplingParams
from surge.tokenizer import IncrementalDetokenizer, Tokenizer


class RequestDetokenizer:
    """Accumulates a request's output text; finds stop strings even across token boundaries."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams):
        self.stream = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.stops = params.stop
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.text = ""

    def add(self, token_id: int) -> str | None:
        """Append a token; return the stop string it completed (text is cut before it), if any."""
        before = len(self.text)
        self.text += self.stream.add(token_id)
        if not self.stops or len(self.text) == before:
            return None
        # A stop string may start in text emitted earlier; look back just far enough.
        start = max(0, before - self.max_stop + 1)
        hits = [(idx, s) for s in self.stops if (idx := self.text.find(s, start)) != -1]
        if not hits:
            return None
        idx, stop = min(hits)
        self.text = self.text[:idx]
        return stop
