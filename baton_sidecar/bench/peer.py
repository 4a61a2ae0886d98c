"""Any OpenAI-compatible server as a bench system: probe what it accepts, then replay the workload.

``OpenAIPeer.run`` first probes the server with a few one-token requests (before the clock) and
settles a ``PeerMode``:

- api     ``completions`` (``/v1/completions``) or ``chat`` (``/v1/chat/completions``, the prompt
          text as one user message, so the server's chat template adds its own tokens);
- prompt  ``ids`` (the workload's token ids, exactly the engine's prompt) when ``/v1/completions``
          takes a token-id list, else ``text`` (the ids decoded by the bench's tokenizer; the
          server re-tokenizes, and its own ``usage.prompt_tokens`` is recorded);
- length  ``ignore_eos`` if accepted, else ``min_tokens`` (= ``max_tokens``) if accepted, else
          ``natural``: the server stops at EOS and each request counts its own ``usage``.

A probe "accepts" a field when the server answers 200; a 4xx refuses it; anything else stops
the run. With ``ignore_eos`` or ``min_tokens`` an output shorter than ``max_tokens`` is an error
(the server took the field and did not honour it); with ``natural`` it is the answer's length.
The mode and every probe's status go into the run's ``info`` (the report's ``config``).

Every request streams (``stream_options.include_usage``); each SSE chunk carrying text is one
token event, stamped on arrival, and ``usage.completion_tokens`` is the count when given. Each
request opens its own connection: some servers (uvicorn after a 500) close a kept-alive one.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from .metrics import RequestRecord
from .systems import Progress, SystemRun, Timed, new_records
from .workloads import BenchRequest, Workload

APIS = ("completions", "chat")
PROMPTS = ("auto", "ids", "text")
LENGTHS = ("ignore_eos", "min_tokens", "natural")
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class ProbeError(RuntimeError):
    """The server failed a probe in a way that is not a refusal (5xx, no answer)."""


@dataclass(frozen=True)
class PeerMode:
    """How the requests reach one server (see the module docstring); ``probes``: field -> status."""

    api: str
    prompt: str  # "ids" | "text"
    length: str  # one of LENGTHS
    priority: bool = False  # the server took the request's ``priority``
    probes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api: {self.api!r} is not one of {', '.join(APIS)}")
        if self.prompt not in ("ids", "text") or (self.prompt == "ids" and self.api == "chat"):
            raise ValueError(f"prompt: {self.prompt!r} does not go with api {self.api!r}")
        if self.length not in LENGTHS:
            raise ValueError(f"length: {self.length!r} is not one of {', '.join(LENGTHS)}")

    def as_info(self) -> dict[str, Any]:
        return {"api": self.api, "prompt": self.prompt, "length": self.length,
                "priority": "sent" if self.priority else "not sent", "probes": dict(self.probes)}


def request_body(mode: PeerMode, model: str, ids: list[int], text: str, max_tokens: int,
                 priority: int | None = None, stream: bool = True) -> dict[str, Any]:
    """The JSON body of one request in ``mode``: greedy, ``max_tokens`` capped, the length field."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    if mode.api == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = ids if mode.prompt == "ids" else text
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    if mode.length == "ignore_eos":
        body["ignore_eos"] = True
    elif mode.length == "min_tokens":
        body["min_tokens"] = max_tokens
    if mode.priority and priority is not None:
        body["priority"] = priority
    return body


async def _status(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    async with session.post(url, json=body) as response:
        await response.read()
        if response.status >= 500:
            raise ProbeError(f"{url} answered {response.status} to a probe ({sorted(body)})")
        return response.status


async def probe(session: aiohttp.ClientSession, base_url: str, model: str, api: str, ids: list[int], text: str,
                prompt: str = "auto", want_priority: bool = False) -> PeerMode:
    """Settle a ``PeerMode`` with one-token requests built from one real prompt (``ids``, ``text``).

    ``prompt``: "auto" tries ids first on ``completions``; "ids" or "text" forces it.
    """
    if prompt not in PROMPTS:
        raise ValueError(f"prompt: {prompt!r} is not one of {', '.join(PROMPTS)}")
    url = base_url + PATHS[api]
    probes: dict[str, int] = {}
    chosen = "text"
    if api == "completions" and prompt in ("auto", "ids"):
        probes["prompt_ids"] = await _status(session, url, request_body(
            PeerMode(api, "ids", "natural"), model, ids, text, 1, stream=False))
        if probes["prompt_ids"] == 200:
            chosen = "ids"
        elif prompt == "ids":
            raise ProbeError(f"{url} refused a token-id prompt ({probes['prompt_ids']})")
    base = PeerMode(api, chosen, "natural")
    for name in ("ignore_eos", "min_tokens"):
        probes[name] = await _status(session, url, request_body(
            PeerMode(api, chosen, name), model, ids, text, 1, stream=False))
        if probes[name] == 200:
            base = PeerMode(api, chosen, name)
            break
    if base.length == "natural" and probes.get("prompt_ids") != 200:
        # Nothing accepted yet: a plain request must pass, or the refusals above say nothing.
        probes["plain"] = await _status(session, url, request_body(base, model, ids, text, 1, stream=False))
        if probes["plain"] != 200:
            raise ProbeError(f"{url} refused a plain one-token request ({probes['plain']})")
    priority = False
    if want_priority:
        body = {**request_body(base, model, ids, text, 1, stream=False), "priority": 0}
        probes["priority"] = await _status(session, url, body)
        priority = probes["priority"] == 200
    return PeerMode(api, base.prompt, base.length, priority, probes)


async def resolve_model(session: aiohttp.ClientSession, base_url: str) -> str:
    """The first model ``/v1/models`` lists."""
    async with session.get(f"{base_url}/v1/models") as response:
        response.raise_for_status()
        data = await response.json()
    models = data.get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model-name")
    return models[0]["id"]


def _chunk_tokens(chunk: dict[str, Any]) -> int:
    """Token events in one streamed chunk: its token ids when listed, else 1 per choice with text."""
    n = 0
    for choice in chunk.get("choices") or ():
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            n += len(ids)
        elif choice.get("text") or (choice.get("delta") or {}).get("content"):
            n += 1
    return n


class OpenAIPeer:
    """Load generator for an OpenAI-compatible server at ``url`` in the probed mode.

    ``tokenizer`` decodes the workload's prompts for the text mode (the model's own);
    ``cpu_clock`` measures the run's CPU seconds (default: this process, the load generator only,
    so ``local`` is False and the report leaves tokens per CPU-second out).
    """

    def __init__(self, url: str, tokenizer=None, model: str | None = None, name: str = "url", api: str = "completions",
                 prompt: str = "auto", timeout_s: float = 600.0,
                 cpu_clock: Callable[[], float] | None = None) -> None:
        if api not in APIS:
            raise ValueError(f"api: {api!r} is not one of {', '.join(APIS)}")
        self.name, self.url, self.tokenizer, self.model = name, url.rstrip("/"), tokenizer, model
        self.api, self.prompt, self.timeout_s = api, prompt, timeout_s
        self.cpu_clock = cpu_clock
        self.local = cpu_clock is not None
        self.mode: PeerMode | None = None

    def text(self, request: BenchRequest) -> str:
        if self.tokenizer is None:  # ids only (probe forces them)
            return ""
        return self.tokenizer.decode(list(request.prompt_token_ids), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def run(self, workload: Workload, progress: Progress) -> SystemRun:
        run = SystemRun(self.name, new_records(workload), info={"url": self.url})
        asyncio.run(self._run(workload, run, progress))
        run.info.update(model=self.model, mode=self.mode.as_info() if self.mode else None)
        return run

    async def _run(self, workload: Workload, run: SystemRun, progress: Progress) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            self.model = self.model or await resolve_model(session, self.url)
            if not workload.requests:
                return
            first = workload.requests[0]
            want_priority = any(r.priority is not None for r in workload.requests)
            prompt = "ids" if self.tokenizer is None else self.prompt
            self.mode = await probe(session, self.url, self.model, self.api, list(first.prompt_token_ids),
                                    self.text(first), prompt, want_priority)
            texts = [self.text(r) for r in workload.requests] if self.mode.prompt == "text" else None
            clock = self.cpu_clock or time.process_time
            with Timed(run, clock):
                t0 = time.perf_counter()
                await asyncio.gather(*(self._one(session, r, rec, texts[i] if texts else "", t0, progress)
                                       for i, (r, rec) in enumerate(zip(workload.requests, run.records))))

    async def _one(self, session: aiohttp.ClientSession, request: BenchRequest, record: RequestRecord, text: str,
                   t0: float, progress: Progress) -> None:
        mode = self.mode
        delay = t0 + request.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record.submitted_s = time.perf_counter() - t0
        body = request_body(mode, self.model, list(request.prompt_token_ids), text, request.max_tokens,
                            request.priority)
        usage: dict[str, Any] = {}
        try:
            async with session.post(self.url + PATHS[mode.api], json=body) as response:
                if response.status != 200:
                    record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                    return
                async for raw in response.content:  # one SSE line; the stream may end without [DONE]
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    if chunk.get("error"):
                        record.error = f"stream error: {str(chunk['error'])[:200]}"
                        return
                    now = time.perf_counter() - t0
                    usage = chunk.get("usage") or usage
                    n = _chunk_tokens(chunk)
                    record.token_times_s.extend([now] * n)
                    progress(n)
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as error:
            record.error = f"{type(error).__name__}: {error}"
            return
        record.finished_s = time.perf_counter() - t0
        record.output_tokens = usage.get("completion_tokens") or len(record.token_times_s)
        if mode.prompt == "text" and usage.get("prompt_tokens"):
            record.prompt_tokens = usage["prompt_tokens"]  # the server's own tokenization (and template)
        if mode.length != "natural" and record.output_tokens < request.max_tokens:
            record.error = f"short output ({record.output_tokens} < {request.max_tokens})"
