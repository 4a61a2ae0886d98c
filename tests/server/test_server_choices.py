"""``n``, ``best_of``, ``echo`` with prompt logprobs, and ``/tokenize`` / ``/detokenize`` over HTTP,
with the real ``openai`` client and the real model."""

from __future__ import annotations

import json

import openai
import pytest
import requests
import torch

from server_helpers import MODEL_NAME

pytestmark = pytest.mark.model

ASK = [{"role": "user", "content": "Name a fruit."}]
PROMPT = "The best thing about the sea is"


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


def test_chat_n_plain_and_streamed_agree(client):
    whole = client.chat.completions.create(model=MODEL_NAME, messages=ASK, n=3, seed=4, temperature=1.0,
                                           max_tokens=10)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=ASK, n=3, seed=4, temperature=1.0,
                                                 max_tokens=10, stream=True, stream_options={"include_usage": True}))
    texts, reasons = ["", "", ""], [None, None, None]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    usage = chunks[-1].usage
    # The prompt counts once; completion tokens are the choices' sum.
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens <= 30
    assert whole.usage.completion_tokens > 10


def test_completion_best_of_and_greedy_n(client):
    greedy = client.completions.create(model=MODEL_NAME, prompt=PROMPT, n=2, temperature=0, max_tokens=8)
    assert greedy.choices[0].text == greedy.choices[1].text
    best = client.completions.create(model=MODEL_NAME, prompt=PROMPT, n=2, best_of=4, temperature=1.0, seed=1,
                                     max_tokens=8)
    assert [c.index for c in best.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, n=2, best_of=3, max_tokens=4, stream=True)
    assert info.value.body["param"] == "best_of"


def test_echo_with_logprobs_scores_the_prompt(client, engine, real_model):
    """lm-evaluation-harness's loglikelihood call: echo, logprobs, max_tokens 0."""
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    choice = out.choices[0]
    ids = engine.tokenizer.encode(PROMPT)
    assert choice.text == PROMPT and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    assert "".join(lp.tokens) == PROMPT and lp.text_offset[0] == 0
    with torch.inference_mode():
        logits = real_model.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-4, rtol=0)
    # With generated tokens after it, streamed: the prompt goes out first, then the rest.
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=0,
                                            max_tokens=4, temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    assert text == PROMPT + plain.choices[0].text
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None
    # echo without logprobs: the text only.
    bare = client.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, max_tokens=3, temperature=0)
    assert bare.choices[0].text.startswith(PROMPT) and bare.choices[0].logprobs is None


def test_tokenize_and_detokenize(server, engine):
    resp = requests.post(server + "/tokenize", json={"model": MODEL_NAME, "prompt": PROMPT,
                                                     "return_token_strs": True}, timeout=30)
    body = resp.json()
    assert resp.status_code == 200 and body["tokens"] == engine.tokenizer.encode(PROMPT)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == engine.max_model_len
    assert len(body["token_strs"]) == body["count"]
    chat = requests.post(server + "/tokenize", json={"messages": ASK}, timeout=30).json()
    rendered = engine.tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == engine.tokenizer.encode(rendered, add_special_tokens=False)
    back = requests.post(server + "/detokenize", json={"tokens": body["tokens"]}, timeout=30)
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}
    for path, bad, param in (("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": 3}, "prompt"),
                             ("/detokenize", {"tokens": [-1]}, "tokens"),
                             ("/detokenize", {"tokens": "x"}, "tokens"),
                             ("/tokenize", {"messages": [{"role": "x"}]}, "messages[0].role"),
                             ("/tokenize", {"prompt": "x" * (2 << 20)}, "body")):
        resp = requests.post(server + path, data=json.dumps(bad), timeout=30)
        assert resp.status_code in (400, 413) and resp.json()["error"]["param"] == param, (path, bad, resp.text[:300])
