"""A request body's bytes to a JSON object, or a 400 naming what is wrong with them.

Beyond ``json.loads``: a body nested too deeply (``RecursionError``), an integer literal past
Python's digit limit, and text holding an unpaired UTF-16 surrogate (which no tokenizer and no UTF-8
encoder accepts) are refused here, so nothing later has to expect them.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from baton_sidecar.server.errors import APIError, bad_request

# A body can only decode to a string holding a UTF-16 surrogate (which no tokenizer or UTF-8 encoder
# accepts) through a \uD800-\uDFFF escape, UTF-8-encoded surrogate bytes (ED A0-BF, which json
# decodes with "surrogatepass"), or a UTF-16/32 body; only those bodies are searched for one. The
# byte scan costs about half of json.loads on an ASCII body, a few microseconds on a typical one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_UTF8 = re.compile(rb"\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_KEY_IN_PARAM = 64


def decode_json_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise APIError(400, "request body is empty; expected a JSON object", param="body",
                       code="invalid_json")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", param="body",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON: nested too deeply", param="body",
                       code="invalid_json") from None
    except ValueError:  # an integer literal over Python's int parsing limit
        raise APIError(400, f"request body is not valid JSON: an integer has more than "
                            f"{sys.get_int_max_str_digits()} digits", param="body",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", param="body", code="invalid_json")
    if _may_hold_surrogates(raw):
        where = _lone_surrogate(body)
        if where is not None:
            param, in_key = where
            what = "an object key contains" if in_key else "contains"
            err = bad_request(param, f"{what} an unpaired UTF-16 surrogate (\\ud800-\\udfff); "
                                    "text must be valid Unicode")
            err.refusal = "invalid:unicode"  # the param runs through the client's own keys: no label
            raise err
    return body


def _may_hold_surrogates(raw: bytes) -> bool:
    return (_SURROGATE_ESCAPE.search(raw) is not None
            or (raw.find(b"\xed") >= 0 and _SURROGATE_UTF8.search(raw) is not None)  # memchr first
            or json.detect_encoding(raw) not in ("utf-8", "utf-8-sig"))


def _lone_surrogate(body: dict[str, Any]) -> tuple[str, bool] | None:
    """(path, in a key) of the first string, in document order, holding a surrogate code point.

    json combines a valid escaped pair (an emoji as \\ud83d\\ude00) into one code point, so any
    surrogate left in a decoded string is unpaired. Iterative: the body may nest ~1000 deep.
    """
    def has(text: str) -> bool:
        return not text.isascii() and _SURROGATE.search(text) is not None

    def join(path: str, step: str | int) -> str:
        if isinstance(step, int):
            return f"{path}[{step}]"
        if len(step) > _MAX_KEY_IN_PARAM:
            step = step[:_MAX_KEY_IN_PARAM] + "..."
        return f"{path}.{step}" if path else step

    stack = [("", iter(body.items()))]
    while stack:
        path, children = stack[-1]
        for step, child in children:
            if isinstance(step, str) and has(step):
                return path or "body", True
            if isinstance(child, str):
                if has(child):
                    return join(path, step), False
            elif isinstance(child, (dict, list)):
                items = child.items() if isinstance(child, dict) else enumerate(child)
                stack.append((join(path, step), iter(items)))
                break
        else:
            stack.pop()
    return None
