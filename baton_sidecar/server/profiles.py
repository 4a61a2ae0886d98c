"""The traffic profile: a bounded ring of the requests the sidecar answered, either arm, exported
as the bench's JSONL workload (``GET /baton/ab/profile``, replayed by ``baton-sidecar bench jsonl``).

Each answered request leaves a ``Profile``: wall-clock arrival, prompt and output token counts, SLA
class, priority, TTFT, e2e, arm and finish reason. The prompt itself is kept only with
``router.profile_text: true``; without it the export writes synthetic text of the recorded token
length (vocabulary words, one token each; see ``vocabulary_words``).

Prompt token counts come from the arm's own usage (Baton's engine; the incumbent's ``usage``, when
its answer carries one). Otherwise the prompt is counted with Baton's tokenizer on the tokenizer
worker thread, never on the event loop, and the count lands in the profile when done; it stays None
while the model loads or if the chat template refuses the messages.

Writes happen on the event loop only (``record``, the count callbacks). ``select`` copies the
matching profiles into a list, which the export then reads on a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import random
import re
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Sequence

from baton_sidecar.server.chat_template import render_tool_chat
from baton_sidecar.server.local import render_chat
from baton_sidecar.server.oai_request import ParsedRequest
from baton_sidecar.server.results import ArmResult

PROFILE_CAPACITY = 20_000  # profiles kept; each is ~200 bytes without text
# Prompt text kept in all (characters; a token-id prompt counts 4 per id). Past it the oldest
# profiles lose their text (and are exported with synthetic text), so memory stays bounded even
# with long prompts.
TEXT_BUDGET_CHARS = 32 << 20
WORDS_WANTED = 512  # distinct vocabulary words synthetic prompts are drawn from


@dataclass(slots=True)
class Profile:
    """One answered request. Latencies are seconds from its arrival at the sidecar."""

    arrival_unix: float
    kind: str  # "completion" or "chat"
    arm: str
    prompt_tokens: int | None
    output_tokens: int | None  # all choices together
    finish_reason: str
    sla_class: str | None = None
    priority: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    request: ParsedRequest | None = None  # the prompt itself: only with router.profile_text
    text_chars: int = 0  # the size ``request`` counts against TEXT_BUDGET_CHARS

    def fields(self) -> dict[str, Any]:
        """What the export writes of it besides the workload fields."""
        return {"arrival_unix": round(self.arrival_unix, 6), "arm": self.arm, "kind": self.kind,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "ttft_s": _round(self.ttft_s), "e2e_s": _round(self.e2e_s),
                "finish_reason": self.finish_reason}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def text_size(parsed: ParsedRequest) -> int:
    if parsed.kind == "chat":
        return sum(len(str(m.get("content") or "")) for m in parsed.messages or ())
    prompt = parsed.prompt or ""
    return len(prompt) if isinstance(prompt, str) else 4 * len(prompt)


class ProfileRing:
    """The last ``capacity`` profiles, in the order their requests finished (loop-only writes)."""

    def __init__(self, capacity: int = PROFILE_CAPACITY,
                 text_budget_chars: int = TEXT_BUDGET_CHARS) -> None:
        if capacity < 1:
            raise ValueError("capacity: must be >= 1")
        self._ring: deque[Profile] = deque(maxlen=capacity)
        self._with_text: deque[Profile] = deque()  # those still holding text, oldest first
        self._text_chars = 0
        self._text_budget = text_budget_chars

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def text_chars(self) -> int:
        return self._text_chars

    def record(self, profile: Profile) -> None:
        if len(self._ring) == self._ring.maxlen and self._ring[0].request is not None:
            self._drop_text(self._with_text.popleft())  # the oldest holder: about to leave
        self._ring.append(profile)
        if profile.request is not None:
            profile.text_chars = text_size(profile.request)
            self._with_text.append(profile)
            self._text_chars += profile.text_chars
            while self._text_chars > self._text_budget:
                self._drop_text(self._with_text.popleft())

    def _drop_text(self, profile: Profile) -> None:
        self._text_chars -= profile.text_chars
        profile.request, profile.text_chars = None, 0

    def select(self, since: float | None = None) -> list[Profile]:
        """The profiles of requests that arrived at or after ``since`` (unix seconds)."""
        return [p for p in self._ring if since is None or p.arrival_unix >= since]


def record_answer(ring: ProfileRing, arm: str, result: ArmResult, reason: str,
                  parsed: ParsedRequest, *, keep_text: bool, tokenizer: Any,
                  executor: Executor | None, template: str | None) -> Profile:
    """Profile one answered request (``generate.account``, on the loop). ``tokenizer`` (None while
    the model loads) counts the prompt on ``executor`` when the arm reported no count."""
    e2e = result.e2e_s
    profile = Profile(arrival_unix=time.time() - (e2e or 0.0), kind=parsed.kind, arm=arm,
                      prompt_tokens=result.prompt_tokens, output_tokens=result.completion_tokens,
                      finish_reason="cancelled" if result.cancelled else reason,
                      sla_class=parsed.sla_class, priority=parsed.priority,
                      ttft_s=result.ttft_s, e2e_s=e2e, request=parsed if keep_text else None)
    ring.record(profile)
    if profile.prompt_tokens is None:
        if isinstance(parsed.prompt, list):
            profile.prompt_tokens = len(parsed.prompt)
        elif tokenizer is not None and executor is not None:
            _count_later(profile, parsed, tokenizer, executor, template)
    return profile


def _count_later(profile: Profile, parsed: ParsedRequest, tokenizer: Any, executor: Executor,
                 template: str | None) -> None:
    try:
        future = asyncio.get_running_loop().run_in_executor(
            executor, prompt_token_ids, tokenizer, parsed, template)
    except RuntimeError:  # the worker is shut down (the app is closing): no count
        return

    def done(f: asyncio.Future) -> None:
        if not f.cancelled() and f.exception() is None and f.result() is not None:
            profile.prompt_tokens = len(f.result())
    future.add_done_callback(done)


def prompt_token_ids(tokenizer: Any, parsed: ParsedRequest,
                     template: str | None = None) -> list[int] | None:
    """The prompt as Baton's engine would see it (worker thread); None if it cannot be rendered."""
    try:
        if parsed.kind == "chat" and parsed.tool_template:
            tools = parsed.tools.openai_tools() if parsed.tools is not None else None
            return render_tool_chat(tokenizer, parsed.messages, tools, template)
        if parsed.kind == "chat":
            return render_chat(tokenizer, parsed.messages, template)
        if isinstance(parsed.prompt, list):
            return list(parsed.prompt)
        return list(tokenizer.encode(parsed.prompt))
    except Exception:  # a template that refuses the messages, a tokenizer error: no count
        return None


# -- ?since= ----------------------------------------------------------------------------------------

def parse_profile_since(value: str | None) -> float | None:
    """``?since=``: unix seconds (a finite number >= 0); ``ValueError`` names the field."""
    if value is None:
        return None
    try:
        since = float(value) if len(value) <= 40 else math.nan
    except ValueError:
        since = math.nan
    if not math.isfinite(since) or since < 0:
        raise ValueError(f"since: must be a time in unix seconds (a number >= 0), "
                         f"not {value[:40]!r}")
    return since


# -- the export: the bench's JSONL workload ---------------------------------------------------------

@functools.lru_cache(maxsize=4)
def vocabulary_words(tokenizer: Any) -> tuple[str, ...]:
    """Words of the vocabulary that are one token each, alone and after a space, so that
    ``" ".join(words)`` is exactly ``len(words)`` tokens for tokenizers that split at spaces
    (byte-level BPE, SentencePiece, word-level). Checked once, jointly, for the whole list."""
    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    words: list[str] = []
    seen: set[str] = set()
    for token_id in range(len(tokenizer)):
        word = tokenizer.decode([token_id]).strip()
        if word in seen or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{1,11}", word):
            continue
        seen.add(word)
        if count(f"{word} {word}") == 2:
            words.append(word)
            if len(words) == WORDS_WANTED:
                break
    if len(words) > 1 and count(" ".join(words)) != len(words):
        words = words[:1]  # a pair merged across the space: one word repeated stays exact
    return tuple(words)


def synthetic_prompt(words: Sequence[str], tokens: int, rng: random.Random) -> str:
    return " ".join(rng.choices(words, k=tokens))


def export_jsonl(profiles: Sequence[Profile], tokenizer: Any, template: str | None = None,
                 seed: int = 0) -> tuple[bytes, int]:
    """The profiles as the bench's JSONL workload (worker thread): one line per request, by
    arrival, ``arrival_s`` from the first line's arrival, ``max_tokens`` the recorded output
    tokens (at least 1), the prompt as recorded or synthetic, and the profile's own fields.
    Returns (the lines, how many profiles were left out for an unknown prompt length)."""
    rng = random.Random(seed)
    rows: list[tuple[Profile, dict[str, Any]]] = []
    skipped = 0
    for p in sorted(profiles, key=lambda p: p.arrival_unix):
        request = p.request  # read once: the ring may drop it meanwhile
        prompt = _recorded_prompt(request, tokenizer, template) if request is not None else None
        if prompt is None and p.prompt_tokens:
            prompt = {"prompt": _synthetic(tokenizer, p.prompt_tokens, rng),
                      "prompt_source": "synthetic"}
        if prompt is None:
            skipped += 1
            continue
        rows.append((p, prompt))
    if not rows:
        return b"", skipped
    t0 = rows[0][0].arrival_unix
    lines = []
    for p, prompt in rows:
        line = {"arrival_s": round(p.arrival_unix - t0, 6), **prompt,
                "max_tokens": max(1, p.output_tokens or 0), "priority": p.priority,
                "sla_class": p.sla_class, **p.fields()}
        lines.append(json.dumps(line, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode(), skipped


def _recorded_prompt(request: ParsedRequest, tokenizer: Any,
                     template: str | None) -> dict[str, Any] | None:
    if request.kind == "completion" and isinstance(request.prompt, str):
        return {"prompt": request.prompt, "prompt_source": "recorded"}
    if request.kind == "completion":
        return {"prompt_token_ids": list(request.prompt), "prompt_source": "recorded"}
    ids = prompt_token_ids(tokenizer, request, template) if tokenizer is not None else None
    if not ids:
        return None
    # The bench replays raw prompts: the chat as the template renders it, messages for reference.
    return {"prompt": tokenizer.decode(ids), "messages": request.messages,
            "prompt_source": "recorded"}


def _synthetic(tokenizer: Any, tokens: int, rng: random.Random) -> str:
    words = vocabulary_words(tokenizer)
    return synthetic_prompt(words or ("x",), tokens, rng)
