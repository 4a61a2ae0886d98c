"""The OpenAI-compatible API against a live server and the real engine, with the real ``openai`` client."""

import json

import openai
import pytest
import requests

from baton_sidecar.engine import SamplingParams
from server_helpers import MODEL_NAME, metric_value

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a color."}]


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


def sse_events(resp: requests.Response) -> list[str]:
    """The raw `data:` payloads of an SSE response, in order."""
    raw = resp.content.decode()
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    return [block[len("data: "):] for block in raw.strip().split("\n\n")]


def test_completion_matches_the_engine(client, engine, server_thread):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    direct = server_thread.call(engine.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0)))
    assert r.choices[0].text == direct.text and r.choices[0].text
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"
    assert r.usage.completion_tokens == 3 and r.usage.prompt_tokens == direct.prompt_tokens
    assert r.model == MODEL_NAME and r.id.startswith("cmpl-")


def test_completion_stream_equals_plain(client):
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_token_id_prompt(client, engine):
    ids = engine.tokenizer.encode(PROMPT)
    a = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=3, temperature=0)
    b = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens == len(ids)


def test_chat_plain_and_streaming_with_usage(client):
    plain = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4,
                                           temperature=0)
    msg = plain.choices[0].message
    assert msg.role == "assistant" and msg.content and plain.object == "chat.completion"
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_completion_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 4
    assert usage.usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_framing_and_no_usage_unless_asked(server):
    body = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 2, "stream": True}
    resp = requests.post(server + "/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_logprobs(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and lp.text_offset[0] == 0
    assert all(len(t) == 2 for t in lp.top_logprobs) and "".join(lp.tokens) == r.choices[0].text
    c = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=1)
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 1 for e in content)
    assert content[0].logprob <= 0


def test_stop_sequences_cut_the_text_where_they_start(client):
    plain = client.completions.create(model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=8,
                                      temperature=0).choices[0].text
    # The first two-character piece of the greedy text that does not occur earlier in it.
    i = next(i for i in range(2, len(plain) - 1) if plain.find(plain[i:i + 2]) == i)
    r = client.completions.create(model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=8,
                                  temperature=0, stop=[plain[i:i + 2]])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == plain[:i]


def test_a_seed_fixes_the_sample_and_another_seed_changes_it(client):
    def sample(seed):
        return client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=12,
                                         temperature=1.5, seed=seed, extra_body={"top_k": 50}
                                         ).choices[0].text
    first = sample(1234)
    assert sample(1234) == first
    assert {sample(seed) for seed in (1, 2, 3)} - {first}  # the control: other seeds, other text


def test_vllm_style_extra_fields_reach_the_engine(client, engine, monkeypatch):
    seen = []
    submit = engine.submit

    def spy(prompt, params, **kwargs):
        seen.append((params, kwargs))
        return submit(prompt, params, **kwargs)

    monkeypatch.setattr(engine, "submit", spy)
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=3, temperature=0, user="someone",
        extra_body={"priority": -1, "ignore_eos": True, "sla_class": "batch"})
    assert r.usage.completion_tokens == 3
    [(params, kwargs)] = seen
    assert kwargs["priority"] == -1 and kwargs["sla_class"] == "batch" and params.ignore_eos
    with pytest.raises(openai.BadRequestError) as info:  # the engine knows the live SLA classes
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                  extra_body={"sla_class": "no-such-class"})
    assert info.value.body["param"] == "sla_class"


def test_models_health_ready_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert requests.get(server + "/baton/health", timeout=5).json() == {"status": "ok"}
    assert requests.get(server + "/baton/ready", timeout=5).status_code == 200
    client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    m = requests.get(server + "/baton/metrics", timeout=5)
    assert m.headers["Content-Type"].startswith("text/plain")
    text = m.text
    assert metric_value(text, "baton_requests_total", {"arm": "baton", "finish_reason": "length"}) == 1
    for name in ("baton_time_to_first_token_seconds_count", "baton_e2e_request_latency_seconds_count",
                 "baton_request_queue_time_seconds_count", "baton_time_per_output_token_seconds_count"):
        assert metric_value(text, name, {"arm": "baton"}) == 1, name
    for name in ("baton_engine_running_requests", "baton_engine_waiting_requests",
                 "baton_engine_batch_size", "baton_engine_padding_ratio",
                 "baton_engine_kv_tokens_used", "baton_engine_preemptions_total"):
        assert metric_value(text, name) is not None, name
    assert metric_value(text, "baton_requests_running", {"arm": "baton"}) == 0
