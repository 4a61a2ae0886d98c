"""One JSON value, fed in pieces, re-written as ``json.dumps(json.loads(text), ensure_ascii=False)``
writes it, as far as it can already be known.

Streamed tool-call arguments must concatenate to the very text the finished answer carries,
which vLLM writes with ``json.dumps``; the model's own text may differ from it in blanks,
separators, escapes (``\\u00e9`` for ``é``) and numbers (``1.50``). Those rewrites are local, so
the canonical text grows as the value arrives:

* blanks outside strings are dropped; ``,`` and ``:`` become ``", "`` and ``": "``;
* a string is re-escaped one character at a time (a ``\\uD83D`` waits for its low surrogate);
* a number or literal is held until the character after it, then re-written whole.

The one difference from the finished answer: an object repeating a key streams both, while
``json.loads`` keeps the last.
"""

from __future__ import annotations

import json

BLANKS = " \t\n\r"
SCALAR_CHARS = frozenset("0123456789+-.eEtruefalsnNaInity")  # numbers, true, false, null, NaN, Infinity
ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
CLOSERS = {"{": "}", "[": "]"}


def encode_char(ch: str) -> str:
    """One character as ``json.dumps(..., ensure_ascii=False)`` writes it inside a string."""
    return json.dumps(ch, ensure_ascii=False)[1:-1]


class JsonRewriter:
    """Feed it text; it answers canonical text and how much of the input was its value.

    ``done`` once the value is complete (text past it is not consumed); ``error`` once the text
    cannot be JSON (nothing more is consumed).
    """

    def __init__(self) -> None:
        self.done = False
        self.error = False
        self._stack: list[str] = []  # open containers, "{" or "["
        self._expect = "value"  # value | key | colon | next (a "," or the container's close)
        self._empty = False  # the innermost container was just opened: it may close at once
        self._scalar = ""  # a number or literal so far
        self._in_string = False
        self._escape = ""  # an escape so far, from its backslash
        self._high = ""  # a high surrogate waiting for its low half
        self._is_key = False  # the open string is an object key

    def feed(self, text: str) -> tuple[str, int]:
        """(canonical text, characters of ``text`` consumed)."""
        out: list[str] = []
        for i, ch in enumerate(text):
            if self.done or self.error or not self._step(ch, out):
                return "".join(out), i
        return "".join(out), len(text)

    def flush(self) -> str:
        """At the end of the text: a top-level number or literal completes; anything else
        held back (cut short) comes out as it was written."""
        if self._scalar and not self._stack and not self.done:
            out: list[str] = []
            self._end_scalar(out)
            return "".join(out)
        held, self._scalar, self._escape = self._high_text() + self._escape + self._scalar, "", ""
        self._high = ""
        return held

    # -- one character ----------------------------------------------------------------------------

    def _step(self, ch: str, out: list[str]) -> bool:
        """Consume ``ch``; False when it is not part of the value (past its end, or an error)."""
        if self._in_string:
            self._string_char(ch, out)
            return not self.error
        if self._scalar:
            if ch in SCALAR_CHARS:
                self._scalar += ch
                return True
            self._end_scalar(out)
            if self.done or self.error:
                return False
        if ch in BLANKS:
            return True
        expect = self._expect
        if expect == "value":
            if ch == '"':
                self._in_string, self._is_key = True, False
                out.append('"')
            elif ch in CLOSERS:
                self._stack.append(ch)
                self._expect, self._empty = ("key" if ch == "{" else "value"), True
                out.append(ch)
            elif ch == "]" and self._empty and self._stack[-1:] == ["["]:
                self._close(ch, out)
            elif ch in SCALAR_CHARS:
                self._scalar = ch
            else:
                self.error = True
        elif expect == "key":
            if ch == '"':
                self._in_string, self._is_key = True, True
                out.append('"')
            elif ch == "}" and self._empty:
                self._close(ch, out)
            else:
                self.error = True
        elif expect == "colon":
            if ch == ":":
                self._expect = "value"
                out.append(": ")
            else:
                self.error = True
        elif ch == ",":  # expect == "next"
            self._expect, self._empty = ("key" if self._stack[-1] == "{" else "value"), False
            out.append(", ")
        elif ch == CLOSERS[self._stack[-1]]:
            self._close(ch, out)
        else:
            self.error = True
        return not self.error

    def _close(self, ch: str, out: list[str]) -> None:
        self._stack.pop()
        out.append(ch)
        self._value_ended()

    def _value_ended(self) -> None:
        self._empty = False
        if self._stack:
            self._expect = "next"
        else:
            self.done = True

    def _end_scalar(self, out: list[str]) -> None:
        try:
            out.append(json.dumps(json.loads(self._scalar)))
        except ValueError:
            self.error = True
            return
        self._scalar = ""
        self._value_ended()

    # -- strings ----------------------------------------------------------------------------------

    def _string_char(self, ch: str, out: list[str]) -> None:
        if self._escape:
            self._escape += ch
            self._end_escape(out)
        elif ch == "\\":
            self._escape = ch
        elif ch == '"':
            out.append(self._high_text() + '"')
            self._in_string = False
            if self._is_key:
                self._expect = "colon"
            else:
                self._value_ended()
        elif ch < " ":
            self.error = True  # json.loads refuses raw control characters in strings
        else:
            out.append(self._high_text() + encode_char(ch))

    def _end_escape(self, out: list[str]) -> None:
        esc = self._escape
        if esc[1] != "u":
            if esc[1] not in ESCAPES:
                self.error = True
                return
            self._escape = ""
            out.append(self._high_text() + encode_char(ESCAPES[esc[1]]))
            return
        if len(esc) < 6:
            if esc[-1] not in "0123456789abcdefABCDEF" and len(esc) > 2:
                self.error = True
            return
        self._escape = ""
        code = int(esc[2:], 16)
        if 0xDC00 <= code <= 0xDFFF and self._high:  # the pair json.loads joins into one character
            high, self._high = self._high, ""
            out.append(encode_char(chr(0x10000 + ((ord(high) - 0xD800) << 10) + (code - 0xDC00))))
        elif 0xD800 <= code <= 0xDBFF:
            out.append(self._high_text())
            self._high = chr(code)
        else:
            out.append(self._high_text() + encode_char(chr(code)))

    def _high_text(self) -> str:
        """A waiting high surrogate that found no low half: it stands alone."""
        high, self._high = self._high, ""
        return encode_char(high) if high else ""
