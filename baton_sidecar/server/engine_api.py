"""What the server needs of an engine: ``baton_sidecar.engine.AsyncEngine`` is one.

A ``Protocol``, so tests may hand the app a stand-in (a failing engine, say) without subclassing,
and so the server never reaches into the engine beyond these members.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol

if TYPE_CHECKING:
    from baton_sidecar.config import PolicyConfig
    from baton_sidecar.engine.core import EngineStats
    from baton_sidecar.engine.request import RequestOutput, SamplingParams, StructuredOutput


class Stream(Protocol):
    """One request's deltas; the last has ``finished=True``. ``cancel`` frees its row."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def cancel(self) -> None: ...


class Engine(Protocol):
    tokenizer: Any  # a transformers tokenizer: chat templates, encode, decode, len() = vocab
    max_model_len: int

    @property
    def is_ready(self) -> bool: ...

    def submit(self, prompt: str | list[int], params: SamplingParams, *,
               request_id: str | None = None, priority: int | None = None,
               sla_class: str | None = None) -> Stream:
        """Admit a request or raise ``RequestValidationError`` / ``AdmissionError``."""
        ...

    async def compile_grammar(self, structured: StructuredOutput) -> None:
        """Compile a structured-output grammar before ``submit`` (off the event loop); raise
        ``RequestValidationError`` naming its field when it does not compile."""
        ...

    def apply_policy(self, policy: PolicyConfig) -> None: ...

    def stats(self) -> EngineStats: ...
