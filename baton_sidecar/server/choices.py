"""The choices of one Baton answer in OpenAI's shapes: echo, logprobs and indices, whole or streamed.

The engine streams each choice's deltas (``RequestOutput.index``); ``ChoiceFormatter`` turns a
collected choice into a body's choice, or a delta into a chunk's, keeping per choice what a
stream needs (text offset for logprobs, whether the echo went out). With ``echo`` a completion
choice starts with the prompt's text, and with ``logprobs`` its logprobs start with the prompt
tokens' (the first token's ``null``: nothing precedes it), as OpenAI and vLLM answer; streamed,
the prompt goes out with each choice's first chunk.
"""

from __future__ import annotations

from typing import Any, Callable

from baton_sidecar.engine.request import RequestOutput, TokenLogprob
from baton_sidecar.server import oai_response as shapes
from baton_sidecar.server.oai_request import ParsedRequest


class ChoiceFormatter:
    def __init__(self, parsed: ParsedRequest, token_text: Callable[[int], str], echo_text: str | None) -> None:
        self.parsed = parsed
        self.kind = parsed.kind
        self.want_logprobs = parsed.logprobs is not None
        self.echo_text = echo_text  # None: no echo
        self._lp = shapes.LogprobFormatter(token_text)
        choices = parsed.params.num_sequences
        self._offsets = [0] * choices  # characters each streamed choice has sent (text_offset)
        self._echoed = [False] * choices

    # --- whole answers ------------------------------------------------------------------

    def choice(self, out: RequestOutput) -> dict[str, Any]:
        """A collected choice (``engine.request.collect``) as a body's choice."""
        if self.kind == "chat":
            lp = self._lp.chat(out.logprobs or ()) if self.want_logprobs else None
            return shapes.chat_choice(out.index, out.text, out.finish_reason, lp)
        text, items, unscored = self._echoed_start(out)
        lp = self._lp.completion(items, 0, unscored) if self.want_logprobs else None
        return shapes.completion_choice(out.index, text, out.finish_reason, lp)

    def _echoed_start(self, out: RequestOutput) -> tuple[str, tuple[TokenLogprob, ...], tuple[int, ...]]:
        """(text, logprob items, unscored leading ids) of a choice's first delta or whole
        output, the prompt put before them when echoing."""
        text, items = out.text, tuple(out.logprobs or ())
        if self.echo_text is None:
            return text, items, ()
        if out.prompt_logprobs is None:  # echo without logprobs
            return self.echo_text + text, items, ()
        return self.echo_text + text, out.prompt_logprobs + items, out.prompt_token_ids[:1]

    # --- streams ------------------------------------------------------------------------

    def opening(self) -> list[dict[str, Any]]:
        """Chat streams open each choice with the assistant's role (and no refusal), as OpenAI's."""
        if self.kind != "chat":
            return []
        delta = {"role": "assistant", "content": "", "refusal": None}
        return [shapes.chat_delta(i, dict(delta), None, None) for i in range(len(self._offsets))]

    def delta(self, out: RequestOutput) -> dict[str, Any] | None:
        """A delta's chunk choice, or None when it carries nothing to send."""
        i = out.index
        text, items, unscored = out.text, tuple(out.logprobs or ()), ()
        if not self._echoed[i] and self.echo_text is not None:
            self._echoed[i] = True
            text, items, unscored = self._echoed_start(out)
        items = items if self.want_logprobs else ()
        if not (text or items or unscored):
            return None
        if self.kind == "chat":
            return shapes.chat_delta(i, {"content": text}, None, self._lp.chat(items) if items else None)
        lp = self._lp.completion(items, self._offsets[i], unscored) if items or unscored else None
        self._offsets[i] += len(text)
        return shapes.completion_choice(i, text, None, lp)

    def finish(self, out: RequestOutput) -> dict[str, Any]:
        """The chunk choice that ends a choice: its finish reason, nothing else."""
        if self.kind == "chat":
            return shapes.chat_delta(out.index, {}, out.finish_reason, None)
        return shapes.completion_choice(out.index, "", out.finish_reason, None)
