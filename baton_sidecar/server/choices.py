"""The choices of one Baton answer in OpenAI's shapes: echo, logprobs and indices, whole or streamed.

The engine streams each choice's deltas (``RequestOutput.index``); ``ChoiceFormatter`` turns a
collected choice into a body's choice, or a delta into a chunk's, keeping per choice what a
stream needs (text offset for logprobs, whether the echo went out). With ``echo`` a completion
choice starts with the prompt's text, and with ``logprobs`` its logprobs start with the prompt
tokens' (the first token's ``null``: nothing precedes it), as OpenAI and vLLM answer; streamed,
the prompt goes out with each choice's first chunk. A chat with ``tools`` reads each choice's
text as tool calls (``tools.ToolRequest.parse`` whole, ``tool_stream.ToolCallStream`` streamed).
"""

from __future__ import annotations

from typing import Any, Callable

from baton_sidecar.engine.request import RequestOutput, TokenLogprob
from baton_sidecar.server import oai_response as shapes
from baton_sidecar.server.oai_request import ParsedRequest
from baton_sidecar.server.tool_stream import ToolCallStream


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
        # Chat with tools: each choice's text read as tool calls while it streams.
        self._tool_streams = [ToolCallStream(parsed.tools) for _ in range(choices)] if parsed.tools else []
        self._pending_lp: list[tuple[TokenLogprob, ...]] = [()] * choices  # logprobs of held-back text

    # --- whole answers ------------------------------------------------------------------

    def choice(self, out: RequestOutput) -> dict[str, Any]:
        """A collected choice (``engine.request.collect``) as a body's choice."""
        if self.kind == "chat":
            lp = self._lp.chat(out.logprobs or ()) if self.want_logprobs else None
            tools = self.parsed.tools
            if tools is None:
                return shapes.chat_choice(out.index, out.text, out.finish_reason, lp)
            answer = tools.parse(out.text)
            return shapes.chat_choice(out.index, answer.content, tools.finish_reason(
                out.finish_reason, bool(answer.tool_calls)), lp, answer.tool_calls)
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

    def delta(self, out: RequestOutput) -> list[dict[str, Any]]:
        """A delta's chunk choices (none when it carries nothing to send yet)."""
        i = out.index
        text, items, unscored = out.text, tuple(out.logprobs or ()), ()
        if not self._echoed[i] and self.echo_text is not None:
            self._echoed[i] = True
            text, items, unscored = self._echoed_start(out)
        items = items if self.want_logprobs else ()
        if self.kind == "chat" and self.parsed.tools is not None:
            return self._tool_deltas(i, self._tool_streams[i].feed(text), items)
        if not (text or items or unscored):
            return []
        if self.kind == "chat":
            return [shapes.chat_delta(i, {"content": text}, None, self._lp.chat(items) if items else None)]
        lp = self._lp.completion(items, self._offsets[i], unscored) if items or unscored else None
        self._offsets[i] += len(text)
        return [shapes.completion_choice(i, text, None, lp)]

    def finish(self, out: RequestOutput) -> list[dict[str, Any]]:
        """The chunk choices that end a choice: what tool parsing held back, then its finish reason."""
        i, reason = out.index, out.finish_reason
        if self.kind == "chat" and self.parsed.tools is not None:
            stream = self._tool_streams[i]
            held = self._tool_deltas(i, stream.finish(), ())
            reason = self.parsed.tools.finish_reason(reason, stream.called)
            lp, self._pending_lp[i] = self._pending_lp[i], ()  # tokens whose text never went out
            return held + [shapes.chat_delta(i, {}, reason, self._lp.chat(lp) if lp else None)]
        if self.kind == "chat":
            return [shapes.chat_delta(i, {}, reason, None)]
        return [shapes.completion_choice(i, "", reason, None)]

    def _tool_deltas(self, i: int, deltas: list[dict[str, Any]], items: tuple[TokenLogprob, ...]
                     ) -> list[dict[str, Any]]:
        """Chunk choices for a tool stream's deltas. Text may be held back (a tag being read), so
        a token's logprobs go out with the next chunk that carries anything."""
        pending = self._pending_lp[i] + items
        if not deltas:
            self._pending_lp[i] = pending
            return []
        self._pending_lp[i] = ()
        chunks = [shapes.chat_delta(i, d, None, None) for d in deltas]
        if pending:
            chunks[0]["logprobs"] = self._lp.chat(pending)
        return chunks
