"""Detokenise one sequence's output and decide when it stops.

A `StopChecker` receives each generated token and returns the text that may be sent to the
client now. Stop strings are matched on the decoded text, so a stop string split across
several tokens is still found. The matched string and anything after it are cut from the
output unless `include_stop_str_in_output` is set. To make that possible while streaming,
the last `len(longest stop string) - 1` characters are held back until they can no longer
start a match. Characters whose UTF-8 bytes span tokens are emitted whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmisvc.engine.sequence import FinishReason
from llmisvc.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from llmisvc.protocol.openai import SamplingOptions


@dataclass
class StopResult:
    """The outcome of one token: text to send and, when the sequence ends, why.

    `stop_reason` is the matched stop string or stop token id (None for EOS and length).
    """

    text: str
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class StopChecker:
    """Stop criteria and text of one sequence.

    `max_tokens` is the output cap already resolved against the context length.
    `eos_token_ids` end the sequence unless `ignore_eos`; `stop_token_ids` always do (once
    `min_tokens` are generated). `text` is everything decoded so far (held-back text included).
    """

    def __init__(self, tokenizer: Tokenizer, options: SamplingOptions, max_tokens: int, eos_token_ids: list[int]):
        self._detokenizer = IncrementalDetokenizer(tokenizer, options.skip_special_tokens)
        self._options = options
        self._max_tokens = max_tokens
        self._eos = frozenset(() if options.ignore_eos else eos_token_ids)
        self._stop_ids = frozenset(options.stop_token_ids)
        self._stops = options.stop
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self._num_tokens = 0
        self._sent = 0
        self.text = ""

    def add_token(self, token_id: int) -> StopResult:
        """Account for one generated token and return the text to send and the finish state."""
        self._num_tokens += 1
        past_min = self._num_tokens > self._options.min_tokens

        if past_min and (token_id in self._eos or token_id in self._stop_ids):
            # The stop token's own text is never part of the output (vLLM drops it too).
            self.text += self._detokenizer.finish()
            reason = token_id if token_id in self._stop_ids and token_id not in self._eos else None
            return StopResult(self._take(final=True), FinishReason.STOP, reason)

        search_from = max(0, len(self.text) - self._holdback)
        self.text += self._detokenizer.add([token_id])
        if past_min and self._stops:
            matched = self._find_stop(search_from)
            if matched is not None:
                return StopResult(self._take(final=True), FinishReason.STOP, matched)

        if self._num_tokens >= self._max_tokens:
            self.text += self._detokenizer.finish()
            return StopResult(self._take(final=True), FinishReason.LENGTH)
        return StopResult(self._take(final=False))

    def finish_text(self) -> str:
        """Return the unsent text of a sequence ended from outside (abort, remote decode)."""
        self.text += self._detokenizer.finish()
        return self._take(final=True)

    def _find_stop(self, search_from: int) -> str | None:
        """Cut `text` at the earliest stop string found since `search_from`; return it or None."""
        best_at, best = -1, None
        for stop in self._stops:
            at = self.text.find(stop, search_from)
            if at != -1 and (best_at == -1 or at < best_at):
                best_at, best = at, stop
        if best is None:
            return None
        end = best_at + len(best) if self._options.include_stop_str_in_output else best_at
        self.text = self.text[:end]
        return best

    def _take(self, final: bool) -> str:
        """Return the text not yet sent, minus the hold-back window unless `final`."""
        limit = len(self.text) if final or not self._stops else max(self._sent, len(self.text) - self._holdback)
        piece = self.text[self._sent : limit]
        self._sent = limit
        return piece
