"""OpenAI's response shapes: completion and chat bodies, SSE chunks, logprobs, model lists."""

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

    def completion(self, items: Sequence[TokenLogprob], text_offset: int) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        for item in items:
            tok = self._text(item.token_id)
            tokens.append(tok)
            lps.append(item.logprob)
            tops.append({self._text(t): lp for t, lp in item.top})
            offsets.append(text_offset)
            text_offset += len(tok)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}

    def chat(self, items: Sequence[TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, lp: float) -> dict[str, Any]:
            tok = self._text(token_id)
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

        return {"content": [dict(entry(i.token_id, i.logprob),
                                 top_logprobs=[entry(t, lp) for t, lp in i.top]) for i in items],
                "refusal": None}


def _response(obj: str, rid: str, created: int, model: str, choice: dict[str, Any],
              reason: str | None, logprobs: dict | None) -> dict:
    """The envelope every body and chunk shares, with its one choice."""
    choice = {"index": 0, **choice, "logprobs": logprobs, "finish_reason": finish_reason(reason)}
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def _chunk(body: dict, with_usage: bool) -> dict:
    if with_usage:  # every chunk says "usage": null; the last one carries it (usage_chunk)
        body["usage"] = None
    return body


def completion_body(rid: str, created: int, model: str, text: str, reason: str | None,
                    logprobs: dict | None, prompt_tokens: int, completion_tokens: int) -> dict:
    body = _response("text_completion", rid, created, model, {"text": text}, reason, logprobs)
    body["usage"] = usage(prompt_tokens, completion_tokens)
    return body


def completion_chunk(rid: str, created: int, model: str, text: str, reason: str | None,
                     logprobs: dict | None, with_usage: bool) -> dict:
    return _chunk(_response("text_completion", rid, created, model, {"text": text}, reason,
                            logprobs), with_usage)


def chat_body(rid: str, created: int, model: str, text: str, reason: str | None,
              logprobs: dict | None, prompt_tokens: int, completion_tokens: int) -> dict:
    message = {"role": "assistant", "content": text, "refusal": None}
    body = _response("chat.completion", rid, created, model, {"message": message}, reason,
                     logprobs)
    body["usage"] = usage(prompt_tokens, completion_tokens)
    return body


def chat_chunk(rid: str, created: int, model: str, delta: dict, reason: str | None,
               logprobs: dict | None, with_usage: bool) -> dict:
    return _chunk(_response("chat.completion.chunk", rid, created, model, {"delta": delta},
                            reason, logprobs), with_usage)


def usage_chunk(rid: str, created: int, model: str, kind: str, prompt_tokens: int,
                completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
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
