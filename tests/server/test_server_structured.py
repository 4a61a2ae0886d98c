"""Structured outputs, penalties and biases through the HTTP API, with the real ``openai`` client."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from server_helpers import MODEL_NAME

pytestmark = pytest.mark.model

ASK = [{"role": "user", "content": "Describe a person called Ada who is 36."}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


def test_json_schema_plain_and_streamed(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    whole = client.chat.completions.create(model=MODEL_NAME, messages=ASK, response_format=fmt, max_tokens=80,
                                           temperature=0)
    jsonschema.validate(json.loads(whole.choices[0].message.content), PERSON)
    assert whole.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=MODEL_NAME, messages=ASK, response_format=fmt, max_tokens=80,
                                            temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content


def test_sdk_parse_with_a_pydantic_model(client):
    """``parse()`` sends the model's strict schema and validates the answer into the model."""
    completion = client.chat.completions.parse(model=MODEL_NAME, messages=ASK, response_format=Person,
                                               max_tokens=80, temperature=0)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 120


def test_json_object_and_vllm_extras_on_completions(client):
    chat = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=80, temperature=0,
                                          response_format={"type": "json_object"})
    assert isinstance(json.loads(chat.choices[0].message.content), dict)
    for extra, check in (({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
                         ({"guided_regex": "[0-9]{4}"}, lambda t: len(t) == 4 and t.isdigit()),
                         ({"structured_outputs": {"json": PERSON}},
                          lambda t: jsonschema.validate(json.loads(t), PERSON) is None)):
        out = client.completions.create(model=MODEL_NAME, prompt="Q: Is water wet?\nA:", max_tokens=60,
                                        temperature=0, extra_body=extra)
        assert check(out.choices[0].text), (extra, out.choices[0].text)


def test_an_invalid_schema_is_a_400_naming_the_field(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=ASK, response_format=fmt, max_tokens=8)
    assert info.value.body["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=4,
                                  extra_body={"guided_grammar": "start: undefined_rule"})
    assert info.value.body["param"] == "guided_grammar"


def test_penalties_and_bias_change_the_answer(client, engine):
    prompt = "Repeat after me: la la la la la la la la"
    plain = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0)
    penalised = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].text != plain.choices[0].text
    first = engine.tokenizer.encode(plain.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0,
                                       logit_bias={str(first): -100})
    assert engine.tokenizer.encode(banned.choices[0].text, add_special_tokens=False)[0] != first
    zero = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0,
                                     logit_bias={str(first): 0})
    assert zero.choices[0].text == plain.choices[0].text  # a zero bias changes nothing
