"""Twenty JSON schemas of the shapes real JSON-mode traffic uses (nested objects, arrays, enums,
required fields, numbers with bounds, nullable fields), each with a prompt that asks for it.

Strings and arrays carry ``maxLength`` / ``maxItems`` so that a 135M-parameter model ends its
answer within the tests' token budget; the grammar engine enforces them like any other keyword.
"""

from __future__ import annotations

NAME = {"type": "string", "maxLength": 24}
WORD = {"type": "string", "maxLength": 16}

SCHEMAS: list[tuple[str, dict]] = [
    ("Describe a person.", {
        "type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}),
    ("Is the sky blue? Answer in JSON.", {
        "type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}),
    ("Pick a color.", {
        "type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}),
    ("List three fruits.", {
        "type": "object", "properties": {"fruits": {"type": "array", "items": WORD, "minItems": 3, "maxItems": 3}},
        "required": ["fruits"]}),
    ("Give the coordinates of Paris.", {
        "type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                         "lon": {"type": "number", "minimum": -180, "maximum": 180}},
        "required": ["lat", "lon"]}),
    ("Describe a book with its author.", {
        "type": "object", "properties": {
            "title": NAME, "author": {"type": "object", "properties": {"first": WORD, "last": WORD},
                                      "required": ["first", "last"], "additionalProperties": False}},
        "required": ["title", "author"], "additionalProperties": False}),
    ("Rate this movie from 1 to 5.", {
        "type": "object", "properties": {"rating": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
        "required": ["rating"]}),
    ("Give a list of two people with ages.", {
        "type": "array", "items": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer",
                                                                                          "minimum": 0,
                                                                                          "maximum": 99}},
                                   "required": ["name", "age"], "additionalProperties": False},
        "minItems": 2, "maxItems": 2}),
    ("Classify the sentiment of: I love it.", {
        "type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                                         "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["label", "confidence"], "additionalProperties": False}),
    ("Describe a city.", {
        "type": "object", "properties": {"city": NAME, "country": NAME,
                                         "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
        "required": ["city", "country", "population"], "additionalProperties": False}),
    ("Give a product with tags.", {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                         "tags": {"type": "array", "items": {"enum": ["new", "sale", "eco"]},
                                                  "maxItems": 3}},
        "required": ["sku", "tags"], "additionalProperties": False}),
    ("Describe an address.", {
        "type": "object", "properties": {"address": {
            "type": "object", "properties": {"street": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                             "geo": {"type": "object", "properties": {
                                                 "lat": {"type": "number"}, "lon": {"type": "number"}},
                                                 "required": ["lat", "lon"], "additionalProperties": False}},
            "required": ["street", "zip", "geo"], "additionalProperties": False}},
        "required": ["address"], "additionalProperties": False}),
    ("Answer yes or no: is water wet?", {"enum": ["yes", "no"]}),
    ("Give a number between 1 and 10.", {"type": "integer", "minimum": 1, "maximum": 10}),
    ("Describe a task with an optional due date.", {
        "type": "object", "properties": {"task": NAME, "due": {"anyOf": [{"type": "null"}, WORD]}},
        "required": ["task", "due"], "additionalProperties": False}),
    ("Give an HTTP status.", {
        "type": "object", "properties": {"code": {"type": "integer", "enum": [200, 404, 500]},
                                         "message": WORD},
        "required": ["code", "message"], "additionalProperties": False}),
    ("Make a shopping list with quantities.", {
        "type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "minItems": 1, "items": {
            "type": "object", "properties": {"item": WORD, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["item", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False}),
    ("Give a matrix of two rows of two integers.", {
        "type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                   "minItems": 2, "maxItems": 2},
        "minItems": 2, "maxItems": 2}),
    ("Describe a user with a role.", {
        "type": "object", "properties": {
            "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                      "role": {"enum": ["admin", "editor", "viewer"]},
                                                      "active": {"type": "boolean"}},
                     "required": ["id", "role", "active"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False}),
    ("Call a weather function for Paris.", {
        "type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
            "type": "object", "properties": {"city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}},
        "required": ["name", "arguments"], "additionalProperties": False}),
]
