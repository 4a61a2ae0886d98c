"""Tool calls while the answer streams: text deltas in, OpenAI chat ``delta`` dicts out.

::

    stream = ToolCallStream(tool_request)
    for text in engine deltas:  deltas = stream.feed(text)   # zero or more dicts per piece
    deltas = stream.finish()                                  # what was held back
    finish_reason = tool_request.finish_reason(engine_reason, stream.called)

The deltas are ``{"content": str}``, a call's first ``{"tool_calls": [{"index", "id", "type",
"function": {"name", "arguments": ""}}]}`` once its name is known, then its ``{"tool_calls":
[{"index", "function": {"arguments": piece}}]}``. For an answer ``ToolRequest.parse`` reads as
calls, the pieces concatenate to its content and arguments exactly (arguments re-written as
``json.dumps`` writes them, by ``json_stream.JsonRewriter``).

Auto answers hold back text that may be the start of ``<tool_call>``. A block that turns out not
to be a call, before any call was sent, makes the whole answer content, as ``parse`` does; once a
call was sent it cannot be taken back, so a later bad block (or a cut-short one) is dropped.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from baton_sidecar.server.json_stream import BLANKS, JsonRewriter
from baton_sidecar.server.tools import TOOL_CALL_END, TOOL_CALL_START, ToolRequest, tool_call_id

Delta = dict[str, Any]


def _held_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (and so may complete it)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class CallWalker:
    """Walks one ``{"name": ..., <args_key>: ...}`` object as it arrives: the name (when its string
    ends) goes to ``on_name``, the arguments (canonical, piece by piece) to ``on_args``. Arguments
    before the name wait for it; other keys are skipped."""

    def __init__(self, args_key: str, on_name: Callable[[str], None],
                 on_args: Callable[[str], None]) -> None:
        self.args_key = args_key
        self.on_name, self.on_args = on_name, on_args
        self.done = self.error = False
        self.name: str | None = None
        self.has_args = False
        self._state = "open"  # open | first_key | key | colon | value | next
        self._value: JsonRewriter | None = None  # the key or value being read
        self._reading = ""  # what the value is: "key", "name", "args" or "other"
        self._text = ""  # the canonical text of a key or the name
        self._waiting: list[str] = []  # argument pieces before the name

    def feed(self, text: str) -> int:
        """Characters of ``text`` that belong to the object."""
        i = 0
        while i < len(text) and not (self.done or self.error):
            if self._value is not None:
                piece, n = self._value.feed(text[i:])
                i += n
                self._piece(piece)
                if self._value.error:
                    self.error = True
                elif self._value.done:
                    self._value_done()
                continue
            ch, state = text[i], self._state
            if ch in BLANKS:
                pass
            elif state == "open" and ch == "{":
                self._state = "first_key"
            elif state in ("first_key", "key") and ch == '"':
                self._read("key")
                continue  # the rewriter reads the quote
            elif state == "colon" and ch == ":":
                key, self._text = self._text, ""
                if key == "name" and self.name is None:
                    self._read("name")
                elif key == self.args_key and not self.has_args:
                    self.has_args = True
                    self._read("args")
                else:
                    self._read("other")
            elif state == "next" and ch == ",":
                self._state = "key"
            elif state in ("first_key", "next") and ch == "}":
                self.done = True
                self.error = self.name is None or not self.has_args
            else:
                self.error = True
                break
            i += 1
        return i

    def flush(self) -> None:
        """Cut short: arguments held back come out as written."""
        if self._value is not None and self._reading == "args":
            self._piece(self._value.flush())

    def _read(self, what: str) -> None:
        self._value, self._reading = JsonRewriter(), what

    def _piece(self, piece: str) -> None:
        if not piece:
            return
        if self._reading == "args":
            if self.name is None:
                self._waiting.append(piece)
            else:
                self.on_args(piece)
        elif self._reading in ("key", "name"):
            self._text += piece

    def _value_done(self) -> None:
        self._value = None
        if self._reading == "key":
            self._text = json.loads(self._text)
            self._state = "colon"
            return
        if self._reading == "name":
            name, self._text = json.loads(self._text), ""
            if not isinstance(name, str):
                self.error = True
                return
            self.name = name
            self.on_name(name)
            for piece in self._waiting:
                self.on_args(piece)
            self._waiting.clear()
        self._state = "next"


class ToolCallStream:
    """One answer's deltas; see the module docstring."""

    def __init__(self, request: ToolRequest) -> None:
        self.request = request
        self.calls = 0  # calls started
        self._out: list[Delta] = []
        # plain | named | array; auto: content -> block -> close -> between -> block ..., or
        # plain (a first block that is no call), or done (the one call of parallel_tool_calls false)
        self._state = {"none": "plain", "auto": "content", "required": "array",
                       "named": "named"}[request.choice]
        self._held = ""  # auto: text that may begin a tag, or that a tag search has not passed
        self._raw = ""  # auto: the current block's text from its tag on (to fall back to content)
        self._walker: CallWalker | None = None
        self._array_state = "open"  # required: open | first_item | item | next | done

    @property
    def called(self) -> bool:
        return self.calls > 0

    def feed(self, text: str) -> list[Delta]:
        self._out = []
        if self._state == "plain":
            self._content(text)
        elif self._state == "named":
            self._named(text)
        elif self._state == "array":
            self._array(text)
        else:
            self._hermes(self._held + text)
        return self._out

    def finish(self) -> list[Delta]:
        self._out = []
        if self._state == "named" and not self.calls:
            self._named("")
        elif self._state == "content":
            self._content(self._held)
        elif self._state == "block" and self._walker is not None:
            if self.calls:
                self._walker.flush()
            else:  # an unfinished first block is no call: the whole answer is content
                self._content(self._raw)
        elif self._state == "array" and self._walker is not None:
            self._walker.flush()
        self._held = ""
        return self._out

    # -- deltas -----------------------------------------------------------------------------------

    def _content(self, text: str) -> None:
        if not text:
            return
        last = self._out[-1] if self._out else None
        if last is not None and "content" in last:
            last["content"] += text
        else:
            self._out.append({"content": text})

    def _start_call(self, name: str) -> None:
        self._out.append({"tool_calls": [{"index": self.calls, "id": tool_call_id(), "type": "function",
                                          "function": {"name": name, "arguments": ""}}]})
        self.calls += 1

    def _args(self, piece: str) -> None:
        index = self.calls - 1
        last = self._out[-1]["tool_calls"][0] if self._out and "tool_calls" in self._out[-1] else None
        if last is not None and last["index"] == index and "id" not in last:
            last["function"]["arguments"] += piece
        else:
            self._out.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})

    def _new_walker(self, args_key: str) -> CallWalker:
        return CallWalker(args_key, self._start_call, self._args)

    # -- the modes --------------------------------------------------------------------------------

    def _named(self, text: str) -> None:
        """The whole answer is the arguments, as written (vLLM)."""
        if not self.calls:
            self._start_call(self.request.named or "")
        if text:
            self._args(text)

    def _array(self, text: str) -> None:
        """``[{"name": ..., "parameters": {...}}, ...]``, one call per item."""
        i = 0
        while i < len(text) and self._array_state != "done":
            if self._walker is not None:
                i += self._walker.feed(text[i:])
                if self._walker.error:
                    self._array_state = "done"  # not the grammar's output: nothing more to read
                elif self._walker.done:
                    self._walker, self._array_state = None, "next"
                continue
            ch, state = text[i], self._array_state
            if ch in BLANKS:
                pass
            elif state == "open" and ch == "[":
                self._array_state = "first_item"
            elif state in ("first_item", "item") and ch == "{":
                self._walker = self._new_walker("parameters")
                continue  # the walker reads the brace
            elif state == "next" and ch == ",":
                self._array_state = "item"
            else:  # the closing "]", or text that is not the grammar's array: nothing more to read
                self._array_state = "done"
            i += 1

    def _hermes(self, text: str) -> None:
        """Content until the first ``<tool_call>``; blocks after it; text between them dropped."""
        self._held = ""
        while text and self._state != "done":
            if self._state == "plain":
                self._content(text)
                return
            if self._state == "block":
                text = self._block(text)
                continue
            tag = TOOL_CALL_END if self._state == "close" else TOOL_CALL_START
            at = text.find(tag)
            if at < 0:
                keep = _held_suffix(text, tag)
                if self._state == "content":
                    self._content(text[:len(text) - keep])
                self._held = text[len(text) - keep:]
                return
            if self._state == "content":
                self._content(text[:at])
            if self._state == "close":
                self._state, text = "between", text[at + len(tag):]
            elif self.calls and not self.request.parallel:
                self._state = "done"  # one call only: the rest is dropped
                return
            else:
                self._state, self._raw = "block", tag
                self._walker = self._new_walker("arguments")
                text = text[at + len(tag):]

    def _block(self, text: str) -> str:
        """Feed the open block; the text past it."""
        walker = self._walker
        self._raw += text
        used = walker.feed(text)
        if walker.error:
            if not self.calls:  # nothing sent yet: fall back to content, as parse does
                self._state = "plain"
                self._content(self._raw)
                return ""
            self._state = "close"  # a call was sent: drop the rest of this block
        elif walker.done:
            self._state = "close"
        self._walker = None if self._state == "close" else walker
        return text[used:]
