"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shape (standalone only: with an incumbent
these paths are the incumbent's, relayed like any other).

::

    /tokenize    {"prompt": str, "add_special_tokens": true}                     -> {"count", "max_model_len",
                 {"messages": [...], "add_generation_prompt": true,                  "tokens", "token_strs"}
                  "add_special_tokens": false}
                 either with "return_token_strs": bool, "model"
    /detokenize  {"tokens": [int, ...], "model"}                                 -> {"prompt": str}

Chat messages are rendered with the same template (and worker thread) as chat completions, so
the count is exactly the prompt a chat request would send.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from baton_sidecar.engine.request import is_int64
from baton_sidecar.server.body import read_whole_body
from baton_sidecar.server.errors import APIError, bad_request
from baton_sidecar.server.json_body import decode_json_body
from baton_sidecar.server.oai_request import parse_messages
from baton_sidecar.server.state import EXECUTOR, STATE


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(name, "must be a boolean", code="invalid_type")
    return value


async def _checked_body(request: web.Request) -> tuple[Any, dict[str, Any]]:
    """(engine, JSON body) after the checks both routes share: a loaded model, the served name."""
    state = request.app[STATE]
    if state.engine is None or not state.engine.is_ready:
        raise APIError(503, "the model is still loading", type="service_unavailable", code="not_ready",
                       headers={"Retry-After": "1"})
    body = decode_json_body(await read_whole_body(request, state.config.max_body_bytes, state.config.body_timeout_s))
    model = body.get("model")
    if model is not None and model != state.config.served_model_name:
        raise APIError(404, f"model '{model}' does not exist; this server serves "
                            f"'{state.config.served_model_name}'", type="not_found_error",
                       param="model", code="model_not_found")
    return state.engine, body


def _render(tokenizer: Any, body: dict[str, Any], template: str | None) -> list[int]:
    """The request's token ids (worker thread: templates and long texts take time). ``template``:
    the server's ``--chat-template``, as chat completions use it."""
    if "messages" in body:
        messages = parse_messages(body)
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=_flag(body, "add_generation_prompt", True))
        return list(tokenizer.encode(text, add_special_tokens=_flag(body, "add_special_tokens", False)))
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise bad_request("prompt", "is required (a string), or give messages", code="missing_field"
                          if prompt is None else "invalid_type")
    return list(tokenizer.encode(prompt, add_special_tokens=_flag(body, "add_special_tokens", True)))


async def tokenize(request: web.Request) -> web.Response:
    engine, body = await _checked_body(request)
    want_strs = _flag(body, "return_token_strs", False)
    loop = asyncio.get_running_loop()
    try:
        ids = await loop.run_in_executor(request.app[EXECUTOR], _render, engine.tokenizer, body,
                                         request.app[STATE].config.chat_template)
    except APIError:
        raise
    except Exception as exc:  # a template that refuses the conversation
        raise bad_request("messages", f"the model's chat template refused them: {exc}") from None
    strs = engine.tokenizer.convert_ids_to_tokens(ids) if want_strs else None
    return web.json_response({"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                              "token_strs": strs})


async def detokenize(request: web.Request) -> web.Response:
    engine, body = await _checked_body(request)
    tokens = body.get("tokens")
    if tokens is None:
        raise bad_request("tokens", "is required", code="missing_field")
    vocab = len(engine.tokenizer)
    if not isinstance(tokens, list) or not all(is_int64(t) and 0 <= t < vocab for t in tokens):
        raise bad_request("tokens", f"must be a list of token ids in [0, {vocab})", code="invalid_type")
    return web.json_response({"prompt": engine.tokenizer.decode(tokens)})
