"""OpenAI's response shapes: completion and chat bodies with their choices, SSE chunks, logprobs,
model lists.

A body carries every choice (``index`` 0 .. n-1, each with its own ``finish_reason``); a streamed
chunk carries one choice, so the choices of an ``n`` > 1 answer interleave chunk by chunk.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping, Sequence

from baton_sidecar.engine.request import TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    """Engine reasons in OpenAI's vocabulary (a cancelled request never reaches a client)."""
    return {"stop": "stop", "length": "length"}.get(reason or "", reason)


class LogprobFormatter:
    """Engine ``TokenLogprob``s as OpenAI's completion or chat logprobs objects."""

    def __init__(self, token_text: Callable[[int], str]) -> None:
        self._text = token_text

    def completion(self, items: Sequence[TokenLogprob], text_offset: int,
                   unscored: Sequence[int] = ()) -> dict[str, Any]:
        """``unscored``: leading token ids with no logprob (an echoed prompt's first token:
        nothing precedes it), answered as ``null`` as OpenAI and vLLM do."""
        entries = [(t, None, None) for t in unscored] + [
            (i.token_id, i.logprob, {self._text(t): lp for t, lp in i.top}) for i in items]
        tokens, offsets = [], []
        for token_id, _, _ in entries:
            tokens.append(self._text(token_id))
            offsets.append(text_offset)
            text_offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [top for _, _, top in entries], "text_offset": offsets}

    def chat(self, items: Sequence[TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, lp: float) -> dict[str, Any]:
            tok = self._text(token_id)
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

        return {"content": [dict(entry(i.token_id, i.logprob),
                                 top_logprobs=[entry(t, lp) for t, lp in i.top]) for i in items],
                "refusal": None}


OBJECTS = {"completion": ("text_completion", "text_completion"),  # kind -> (body, chunk)
           "chat": ("chat.completion", "chat.completion.chunk")}


def completion_choice(index: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(reason)}


def chat_choice(index: int, text: str | None, reason: str | None, logprobs: dict | None,
                tool_calls: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason(reason)}


def chat_delta(index: int, delta: dict, reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason(reason)}


def body(kind: str, rid: str, created: int, model: str, choices: list[dict], prompt_tokens: int,
         completion_tokens: int) -> dict:
    """A whole answer: its choices by index, usage (prompt counted once, choices summed)."""
    return {"id": rid, "object": OBJECTS[kind][0], "created": created, "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chunk(kind: str, rid: str, created: int, model: str, choice: dict, with_usage: bool) -> dict:
    """One streamed chunk with one choice."""
    out = {"id": rid, "object": OBJECTS[kind][1], "created": created, "model": model, "choices": [choice]}
    if with_usage:  # every chunk says "usage": null; the last one carries it (usage_chunk)
        out["usage"] = None
    return out


def usage_chunk(rid: str, created: int, model: str, kind: str, prompt_tokens: int,
                completion_tokens: int) -> dict:
    return {"id": rid, "object": OBJECTS[kind][1], "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def model_list(name: str, created: int, max_model_len: int | None) -> dict:
    entry = {"id": name, "object": "model", "created": created, "owned_by": "baton"}
    if max_model_len:
        entry["max_model_len"] = max_model_len
    return {"object": "list", "data": [entry]}


def now() -> int:
    return int(time.time())


def sse(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
