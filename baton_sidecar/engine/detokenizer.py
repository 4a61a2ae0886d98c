"""Incremental detokenization with stop strings.

Decoding only a short window of recent tokens per step (the TGI/vLLM technique) keeps
streaming O(1) per token and never emits half of a multi-byte character. When stop
strings are set, text that could still become the start of a stop string is held back
until it can't, so a client never sees part of a stop string.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = 0  # tokens before this are already in `text`
        self.text = ""  # all decoded text so far (stop string cut off once found)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Add one generated token; sets ``stopped`` when a stop string appears."""
        self.token_ids.append(token_id)
        window = self.token_ids[self.prefix_offset:]
        prefix = self.tokenizer.decode(self.token_ids[self.prefix_offset: self.read_offset],
                                       skip_special_tokens=True)
        full = self.tokenizer.decode(window, skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete character: wait for more tokens
        previous_len = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        if self.stop:
            self._cut_at_stop(search_from=max(0, previous_len - self.max_stop_len + 1))

    def _cut_at_stop(self, search_from: int) -> None:
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def take_delta(self, final: bool) -> str:
        """New text since the last call; holds back a possible stop-string prefix unless final."""
        limit = len(self.text)
        if self.stop and not final and not self.stopped:
            limit = max(self.emitted, limit - (self.max_stop_len - 1))
        delta = self.text[self.emitted: limit]
        self.emitted = limit
        return delta
