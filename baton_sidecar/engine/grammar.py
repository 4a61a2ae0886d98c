"""Structured outputs: grammars compiled by llguidance, one matcher per constrained request.

::

    StructuredOutput(kind, spec)  --GrammarCompiler.compile-->  Grammar (cached per (kind, spec))
        on the compile thread (AsyncEngine.compile_grammar) or the caller's; never the engine thread
    Grammar.matcher()  -->  RowGrammar (a deep copy of the compiled matcher, ~1 us), at submit
    each step (engine thread):  fill_bitmasks -> apply_bitmask -> sample -> RowGrammar.advance

llguidance (the grammar engine vLLM uses) compiles JSON schemas, regexes, choices and Lark/GBNF
grammars into a matcher that, given the tokens so far, answers the set of allowed next tokens
as a bitmask ``[W = ceil(V / 32)]`` of int32, and advances one sampled token at a time. A
matcher is *stopped* when nothing but EOS may follow; the engine then ends the row at once.

A request's matcher lives with its request (not its row), so a preempted request keeps it:
swap and recompute resume with no token consumed twice or lost.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from .request import RequestValidationError, StructuredOutput

CACHE_SIZE = 256  # compiled grammars kept (most recently used); a bad spec's error is kept too
# Compact, deterministic JSON: no free whitespace, so a small model cannot ramble in blanks.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_BITS = torch.arange(32, dtype=torch.int32)  # [32]: bit j of word w is token 32 w + j


def grammar_text(structured: StructuredOutput) -> str:
    """llguidance's serialized grammar for a spec (errors surface when it is compiled)."""
    kind, spec = structured.kind, structured.spec
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        # One quoted literal per choice; json.dumps escapes them as Lark strings need.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in json.loads(spec)))
    return llguidance.grammar_from("grammar", spec)  # Lark, or GBNF converted to Lark


class Grammar:
    """A compiled grammar; ``matcher()`` hands each request its own state."""

    def __init__(self, template: llguidance.LLMatcher) -> None:
        self._template = template  # never advanced: only copied

    def matcher(self) -> RowGrammar:
        return RowGrammar(self._template.deep_copy())


class RowGrammar:
    """One request's matcher: which tokens may come next, advanced by each sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def fork(self) -> RowGrammar:
        """An independent copy in the same state (another choice of an ``n`` > 1 request)."""
        return RowGrammar(self.matcher.deep_copy())

    def advance(self, token_id: int) -> None:
        """Consume a sampled token (it was allowed by the mask, so this cannot fail but for EOS
        after a stop, which the engine never feeds)."""
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        """Nothing but EOS may follow (or the matcher failed): the row ends."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer. Thread-safe; compiling drops the GIL.

    The llguidance tokenizer (its view of the vocabulary, ~0.3 s to build) is made on first use.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], Grammar | str] = OrderedDict()  # value: grammar or error
        # The compile thread: AsyncEngine.compile_grammar runs here, off the loop and the engine.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-grammar")
        # Fills several rows' masks at once on llguidance's own threads (engine thread calls it).
        self.mask_executor = llguidance.LLExecutor()

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos)
            return self._ll_tokenizer

    def cached(self, structured: StructuredOutput) -> bool:
        with self._lock:
            return (structured.kind, structured.spec) in self._cache

    def compile(self, structured: StructuredOutput) -> Grammar:
        """The compiled grammar, from the cache or compiled now; ``RequestValidationError``
        naming ``structured.field`` for a spec llguidance refuses."""
        key = (structured.kind, structured.spec)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
        if found is None:
            found = self._build(structured)
            with self._lock:
                self._cache[key] = found
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        if isinstance(found, str):
            raise RequestValidationError(structured.field, found)
        return found

    def _build(self, structured: StructuredOutput) -> Grammar | str:
        tokenizer = self._tokenizer()
        try:
            text = grammar_text(structured)
        except (ValueError, TypeError) as exc:
            return f"is not a valid {structured.kind}: {exc}"
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tokenizer)
        if is_error:
            return f"is not a valid {structured.kind}: {messages[0]}"
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0)
        if matcher.is_error():
            return f"is not a valid {structured.kind}: {matcher.get_error()}"
        return Grammar(matcher)

    def fill_bitmasks(self, grammars: list[RowGrammar]) -> torch.Tensor:
        """Allowed next tokens of each row: int32 ``[g, W]`` (bit set = allowed)."""
        bitmask = llguidance.torch.allocate_token_bitmask(len(grammars), self.vocab_size)
        llguidance.torch.fill_next_token_bitmask_par(
            self.mask_executor, [(g.matcher, i) for i, g in enumerate(grammars)], bitmask)
        return bitmask

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits [g, V]`` with every token whose bit is clear set to -inf (a new tensor)."""
    vocab = logits.shape[-1]
    bits = (bitmask.to(logits.device)[:, :, None] >> _BITS.to(logits.device)) & 1  # [g, W, 32]
    allowed = bits.reshape(bits.shape[0], -1)[:, :vocab].bool()  # [g, V]
    return logits.masked_fill(~allowed, float("-inf"))
