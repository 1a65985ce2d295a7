"""runtime.batching through the real server: parallel slots with continuous batching, cancellation, the queue,
the OpenAI surface (refused fields, logprobs, /v1/completions), /metrics and CORS — against uvicorn on loopback
with the real ``openai`` client and httpx."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from test_runtime_chat import VARIANT, native_image  # noqa: F401 (VARIANT: what conftest.files converts)
from test_server import _data_uri, run_uvicorn

LONG = 8000  # tokens: far more than the time a test needs to see a request running
SLOTS = 4


@pytest.fixture(scope="module")
def batched(files):
    """(base_url, model): 4 slots of 8192 positions, a queue of one."""
    from medgemma_gguf.runtime.chat import load
    from medgemma_gguf.runtime.server import ServerLimits, create_app

    model = load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=8192, n_threads=1, n_parallel=SLOTS)
    app = create_app(model, limits=ServerLimits(max_tokens_limit=LONG), queue_size=1)
    base, stop = run_uvicorn(app)
    yield base, model
    stop()
    model.close()


@pytest.fixture(scope="module")
def reference(files):
    from medgemma_gguf.runtime.chat import load

    with load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=512, n_threads=1) as model:
        yield model


def metrics(base: str) -> dict[str, float]:
    """The samples of GET /metrics by name with labels."""
    response = httpx.get(f"{base}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def wait_idle(base: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{base}/health").json()
        if health["slots_busy"] == 0 and health["queue"] == 0:
            return health
        assert time.monotonic() < deadline, f"the server stayed busy: {health}"
        time.sleep(0.02)


def wait_for(base: str, key: str, value: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{base}/health").json()[key] != value:
        assert time.monotonic() < deadline, f"{key} never reached {value}: {httpx.get(f'{base}/health').json()}"
        time.sleep(0.02)


def stream_events(base: str, body: dict, record: dict) -> None:
    """POST a streaming request; ``record`` gets the chunks, the time of the first content and of the finish."""
    record["chunks"] = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            record["chunks"].append(chunk)
            choice = chunk["choices"][0]
            if choice["delta"].get("content") and "first" not in record:
                record["first"] = time.monotonic()
            if choice["finish_reason"]:
                record["finish"] = time.monotonic()


def stream_all(base: str, bodies: list[dict]) -> list[dict]:
    """Every body streamed at once, one thread each; their ``stream_events`` records, in order."""
    records: list[dict] = [{} for _ in bodies]
    threads = [threading.Thread(target=stream_events, args=(base, body, record))
               for body, record in zip(bodies, records, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def logprob_entries(chunks: list[dict]) -> list[dict]:
    return [entry for chunk in chunks for choice in chunk["choices"] if choice.get("logprobs")
            for entry in choice["logprobs"]["content"]]


def agree_until_near_tie(batched: list[dict], solo: list[dict], tie: float = 1e-3) -> int:
    """Tokens (as bytes) compared up to the first position where the solo run's top two logits are within
    ``tie`` (batch shape changes the last bits of the logits); asserts they agree; returns how many."""
    n = 0
    for got, want in zip(batched, solo, strict=False):
        top = want["top_logprobs"]
        if len(top) > 1 and top[0]["logprob"] - top[1]["logprob"] < tie:
            break
        assert got["bytes"] == want["bytes"], f"token {n} differs: {got['token']!r} vs {want['token']!r} alone"
        n += 1
    return n


def test_parallel_streams_interleave_and_each_equals_its_solo_run(batched, files):
    base, _ = batched
    bodies = []
    for i, text in enumerate(["What is the normal adult resting heart rate?", "Describe this X-ray",
                              "List three causes of anemia.", "Findings?"]):
        content: list[dict] = [{"type": "text", "text": text}]
        if i % 2:
            content.append({"type": "image_url", "image_url": {"url": _data_uri(native_image(112, 30 + i))}})
        bodies.append({"messages": [{"role": "user", "content": content}], "max_tokens": 300, "ignore_eos": True,
                       "logprobs": True, "top_logprobs": 2})
    records = stream_all(base, bodies)
    assert all("first" in r and "finish" in r for r in records), records
    assert max(r["first"] for r in records) < min(r["finish"] for r in records), "a stream finished before all started"
    compared = 0
    for body, record in zip(bodies, records, strict=True):
        alone = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300).json()
        solo_entries = alone["choices"][0]["logprobs"]["content"]
        together = logprob_entries(record["chunks"])
        assert len(together) == len(solo_entries) == 300
        agreed = agree_until_near_tie(together, solo_entries)
        compared += agreed
        if agreed == len(solo_entries):
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in record["chunks"])
            assert text == alone["choices"][0]["message"]["content"]
    assert compared >= 300  # the near-tie rule left most tokens compared
    used = metrics(base)
    assert used["llamacpp:n_busy_slots_per_decode"] > 1  # requests shared batches


def test_a_seeded_request_alone_reproduces_the_python_api(batched, reference):
    base, _ = batched
    question = [{"role": "user", "content": "What is the normal adult resting heart rate?"}]
    expected = reference.chat(question, max_tokens=12, temperature=1.1, top_p=0.9, seed=123)
    reply = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
        "messages": question, "max_tokens": 12, "temperature": 1.1, "top_p": 0.9, "seed": 123}).json()
    assert reply["choices"][0]["message"]["content"] == expected.text


def test_disconnects_free_the_slot_streaming_and_not(batched):
    base, _ = batched
    wait_idle(base)
    before = metrics(base)
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": LONG, "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
        lines = response.iter_lines()  # kept: a dropped line iterator closes the connection
        next(line for line in lines if line.startswith("data: "))
        wait_for(base, "slots_busy", 1)
    wait_idle(base)
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{base}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    wait_idle(base)
    after = metrics(base)
    cancelled = 'medgemma_gguf_requests_total{finish="cancelled"}'
    assert after[cancelled] - before[cancelled] == 2
    generated = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
    assert generated < LONG  # both stopped long before max_tokens: the slot's work ended with the client


def test_the_queue_bound_answers_429_and_a_queued_client_leaving_drops_its_work(batched):
    base, _ = batched
    wait_idle(base)
    before = metrics(base)
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": LONG, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=60) as client:
        streams = [client.stream("POST", f"{base}/v1/chat/completions", json=body) for _ in range(SLOTS)]
        responses = [s.__enter__() for s in streams]
        readers = [response.iter_lines() for response in responses]
        for lines in readers:  # every slot busy
            next(line for line in lines if line.startswith("data: "))
        # the queued client: a raw connection, closed when the test decides (no timing involved)
        host, port = base.removeprefix("http://").split(":")
        payload = json.dumps({**body, "stream": False}).encode()
        waiting = socket.create_connection((host, int(port)))
        waiting.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(payload), payload))
        wait_for(base, "queue", 1)
        refused = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        import openai

        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.RateLimitError, match="queue is full"):  # the SDK's type for 429
            sdk.chat.completions.create(model="m", messages=body["messages"], max_tokens=2)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert "queue" in refused.json()["error"]["message"] and refused.json()["error"]["type"] == "rate_limit_error"
        waiting.close()  # the queued client leaves
        wait_for(base, "queue", 0)  # dropped, while the slots are still busy
        assert httpx.get(f"{base}/health").json()["slots_busy"] == SLOTS
        for stream in streams:
            stream.__exit__(None, None, None)
    wait_idle(base)
    after = metrics(base)
    assert after["medgemma_gguf_requests_rejected_total"] - before["medgemma_gguf_requests_rejected_total"] == 2
    cancelled = 'medgemma_gguf_requests_total{finish="cancelled"}'
    assert after[cancelled] - before[cancelled] == SLOTS + 1
    assert after['medgemma_gguf_http_requests_total{endpoint="/v1/chat/completions",status="429"}'] == 2


REFUSED = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "'tools'",
     "not trained for tool calls"),
    ({"tool_choice": "auto"}, "'tool_choice'", "not trained for tool calls"),
    ({"parallel_tool_calls": True}, "'parallel_tool_calls'", "tool calls"),
    ({"functions": [{"name": "f"}]}, "'functions'", "tool calls"),
    ({"audio": {"format": "wav", "voice": "alloy"}}, "'audio'", "not a field this server honours"),
    ({"prediction": {"type": "content", "content": "x"}}, "'prediction'", "not a field"),
    ({"web_search_options": {}}, "'web_search_options'", "not a field"),
    ({"metadata": {"a": "b"}}, "'metadata'", "not a field"),
    ({"mirostat": 2}, "'mirostat'", "not a field"),
    ({"store": True}, "'store'", "stores no completions"),
    ({"modalities": ["text", "audio"]}, "'modalities'", "text only"),
    ({"service_tier": "flex"}, "'service_tier'", "one tier"),
    ({"n": 2}, "'n'", "one reply per request"),
    ({"top_logprobs": 3}, "'top_logprobs'", "needs 'logprobs'"),
    ({"logprobs": True, "top_logprobs": 21}, "'top_logprobs'", "0 to 20"),
    ({"logprobs": "yes"}, "'logprobs'", "true or false"),
    ({"stream_options": {"include_obfuscation": True}}, "'stream_options.include_obfuscation'", "not supported"),
    ({"stream_options": {"foo": True}}, "'stream_options.foo'", "not supported"),
    ({"repetition_penalty": 50}, "'repeat_penalty'", "between 0.1 and 10"),
    ({"repetition_penalty": 1.1, "repeat_penalty": 1.2}, "'repetition_penalty'", "not both"),
    ({"ignore_eos": 1}, "'ignore_eos'", "true or false"),
    ({"messages": [{"role": "user", "content": "Hi", "name": "alice"}]}, "'messages[0].name'", "role"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]}, "'messages[0]'", "tool calls"),
    ({"messages": [{"role": "user", "content": "Hi", "reasoning_content": "x"}]}, "'messages[0].reasoning_content'",
     "role"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a", "reasoning_content": 5},
                   {"role": "user", "content": "Go on"}]}, "'messages[1].reasoning_content'", "a string"),
    # nested fields: refused with their path, never dropped
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "x"}}]}]},
     "'messages[0].content[0].cache_control'", "not a field of a content item of type 'text'"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}]}]},
     "'messages[0].content[0].image_url.detail'", "'auto' or 'high'"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "data:,", "foo": 1}}]}]},
     "'messages[0].content[1].image_url.foo'", "not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}, "x": 1}]}]},
     "'messages[0].content[0].x'", "of type 'image_url'"),
    ({"response_format": {"type": "json_object", "foo": 1}}, "'response_format' field 'foo'", "not supported"),
    ({"response_format": {"type": "text", "json_schema": {}}}, "'response_format' field 'json_schema'",
     "a text format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "bogus": True}}},
     "'response_format' field 'json_schema.bogus'", "not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}},
     "'response_format' json_schema.strict", "true or false"),
    ({"response_format": {"type": ["text"]}}, "'response_format' type", "got ['text']"),
    ({"stream_options": {"include_usage": True}}, "'stream_options'", "only allowed with 'stream': true"),
]


def test_every_refused_field_answers_400_naming_it(batched):
    base, _ = batched
    good = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for extra, name, reason in REFUSED:
        response = httpx.post(f"{base}/v1/chat/completions", json={**good, **extra}, timeout=60)
        assert response.status_code == 400, (extra, response.text)
        message = response.json()["error"]["message"]
        assert name in message and reason in message, (extra, message)
    accepted = {"user": "u-1", "safety_identifier": "s", "store": False, "modalities": ["text"], "n": 1,
                "service_tier": "auto", "stream_options": None, "tools": None, "repetition_penalty": 1.0}
    assert httpx.post(f"{base}/v1/chat/completions", json={**good, **accepted}, timeout=60).status_code == 200
    # an assistant turn sent back as this server returned it, reasoning included: its reasoning stays out of the prompt
    turns = [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet."},
             {"role": "user", "content": "Go on"}]
    replayed = httpx.post(f"{base}/v1/chat/completions", json={**good, "messages": turns}, timeout=60)
    turns[1].pop("reasoning_content")
    plain = httpx.post(f"{base}/v1/chat/completions", json={**good, "messages": turns}, timeout=60)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
    # (the replies are not compared: the two runs reuse different cached prefixes, so their logits may differ in
    # the last bits; the prompt's token count is exact, and it would grow with the reasoning in the prompt)
    turns[1]["content"] = "Hello. Greet."
    shown = httpx.post(f"{base}/v1/chat/completions", json={**good, "messages": turns}, timeout=60)
    assert shown.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]
    image = {"url": _data_uri(Image.new("RGB", (32, 32), (90, 90, 90))), "detail": "high"}
    nested = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": image},
                                                        {"type": "text", "text": "Hi", "cache_control": None}]}],
              "response_format": {"type": "json_schema", "json_schema": {
                  "name": "finding", "description": "d", "strict": True,
                  "schema": {"type": "object", "properties": {"a": {"enum": ["x"]}}, "required": ["a"]}}}}
    response = httpx.post(f"{base}/v1/chat/completions", json={**good, **nested, "max_tokens": 40}, timeout=120)
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["choices"][0]["message"]["content"]) == {"a": "x"}
    for extra, name in [({"echo": True}, "'echo'"), ({"best_of": 2}, "'best_of'"), ({"suffix": "x"}, "'suffix'"),
                        ({"logprobs": 6}, "'logprobs'"), ({"prompt": ["a", "b"]}, "'prompt'"),
                        ({"messages": []}, "'messages'")]:
        response = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **extra}, timeout=60)
        assert response.status_code == 400 and name in response.json()["error"]["message"], (extra, response.text)
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="not trained for tool calls"):
        client.chat.completions.create(model="m", messages=good["messages"], tools=[
            {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def test_logprobs_come_from_the_logits_before_sampling(batched, reference):
    import openai

    base, _ = batched
    question = [{"role": "user", "content": "Describe pneumonia."}]
    logits = reference.next_token_logits(reference.prompt(question))
    expected = _log_softmax(logits)
    best = np.argsort(-expected, kind="stable")[:5]
    pieces: dict[int, bytes] = {}

    def piece(token: int) -> bytes:
        if token not in pieces:
            pieces[token] = reference.engine.token_piece(token, special=True)
        return pieces[token]

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    # a high temperature and a bias change what is sampled, never the logprobs reported
    for fields in ({}, {"temperature": 1.7, "seed": 3, "logit_bias": {str(int(best[3])): 5}}):
        reply = client.chat.completions.create(model="m", messages=question, max_tokens=4, logprobs=True,
                                               top_logprobs=5, **fields)
        first = reply.choices[0].logprobs.content[0]
        if not fields:  # greedy: the most likely token
            assert bytes(first.bytes) == reference.engine.token_piece(int(best[0]), special=True)
        same_text = [i for i in range(len(expected)) if piece(i) == bytes(first.bytes)]
        assert any(first.logprob == pytest.approx(expected[i], abs=1e-4) for i in same_text)
        assert [bytes(t.bytes) for t in first.top_logprobs] == [
            reference.engine.token_piece(int(i), special=True) for i in best]
        assert [t.logprob for t in first.top_logprobs] == pytest.approx(expected[best].tolist(), abs=1e-4)
        assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens
    plain = client.chat.completions.create(model="m", messages=question, max_tokens=2)
    assert plain.choices[0].logprobs is None
    text = reference.prompt(question).text
    legacy = httpx.post(f"{base}/v1/completions", timeout=60,
                        json={"prompt": text, "max_tokens": 3, "logprobs": 2, "ignore_eos": True}).json()
    choice = legacy["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == len(choice["logprobs"]["token_logprobs"]) == 3
    assert choice["logprobs"]["token_logprobs"][0] == pytest.approx(float(expected.max()), abs=1e-4)
    assert len(choice["logprobs"]["top_logprobs"][0]) == 2
    assert choice["logprobs"]["text_offset"][0] == 0 and "".join(choice["logprobs"]["tokens"]) == choice["text"]


def test_completions_take_a_raw_prompt(batched, reference):
    import openai

    base, _ = batched
    question = [{"role": "user", "content": "List three causes of anemia."}]
    expected = reference.chat(question, max_tokens=10)
    prompt = reference.prompt(question)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    reply = client.completions.create(model="m", prompt=prompt.text, max_tokens=10)
    assert reply.object == "text_completion" and reply.choices[0].text == expected.text
    assert reply.usage.prompt_tokens == prompt.n_positions
    assert reply.usage.completion_tokens == expected.completion_tokens
    ids = client.completions.create(model="m", prompt=prompt.flat_ids(0), max_tokens=10)
    assert ids.choices[0].text == expected.text
    chunks = list(client.completions.create(model="m", prompt=prompt.text, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens
    bad = httpx.post(f"{base}/v1/completions", json={"prompt": [10**9]}, timeout=60)
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]


def test_the_openai_client_speaks_the_whole_surface(batched, reference):
    """The real ``openai`` client: chat streamed and not with logprobs and usage, completions with logprobs,
    ``n``, and each refusal raised as the SDK's error type with the field named."""
    import openai

    base, _ = batched
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
    question = [{"role": "user", "content": "What does an elevated troponin mean?"}]
    expected = reference.generate(reference.prompt(question), max_tokens=6, ignore_eos=True).collect()
    whole = client.chat.completions.create(model="m", messages=question, max_tokens=6, logprobs=True,
                                           top_logprobs=3, n=1, user="clinic-7", extra_body={"ignore_eos": True})
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected.text and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 6 and whole.usage.total_tokens == whole.usage.prompt_tokens + 6
    assert [len(e.top_logprobs) for e in whole.choices[0].logprobs.content] == [3] * 6

    chunks = list(client.chat.completions.create(
        model="m", messages=question, max_tokens=6, logprobs=True, top_logprobs=3, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.bytes for e in streamed] == [e.bytes for e in whole.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole.choices[0].logprobs.content],
                                                          abs=1e-4)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])

    prompt = reference.prompt(question).text
    legacy = client.completions.create(model="m", prompt=prompt, max_tokens=4, logprobs=2,
                                       extra_body={"ignore_eos": True})
    assert legacy.choices[0].text == reference.generate(reference.prompt(question), max_tokens=4,
                                                        ignore_eos=True).collect().text
    assert len(legacy.choices[0].logprobs.tokens) == 4 and len(legacy.choices[0].logprobs.top_logprobs[0]) == 2
    assert "".join(legacy.choices[0].logprobs.tokens) == legacy.choices[0].text

    refusals = [
        (dict(n=2), "'n'"),
        (dict(top_logprobs=3), "'top_logprobs'"),
        (dict(tool_choice="auto"), "'tool_choice'"),
        (dict(extra_body={"mirostat": 2}), "'mirostat'"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
         "response_format"),
    ]
    for fields, name in refusals:
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="m", messages=question, max_tokens=2, **fields)
        assert raised.value.status_code == 400 and name in raised.value.message, (fields, raised.value.message)
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.completions.create(model="m", prompt="Hi", max_tokens=2, n=3)
    with pytest.raises(openai.BadRequestError, match="'echo'"):
        client.completions.create(model="m", prompt="Hi", max_tokens=2, echo=True)
    with pytest.raises(openai.BadRequestError, match="'n'"):  # streaming: refused before the stream starts
        client.chat.completions.create(model="m", messages=question, max_tokens=2, n=2, stream=True)


def test_metrics_count_what_was_sent(batched):
    base, _ = batched
    wait_idle(base)
    before = metrics(base)
    body = {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 5, "ignore_eos": True}
    usages = [httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()["usage"] for _ in range(3)]
    assert httpx.post(f"{base}/v1/chat/completions", json={**body, "tools": []}, timeout=60).status_code == 400
    after = metrics(base)

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta("llamacpp:tokens_predicted_total") == 15
    evaluated = sum(u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert delta("llamacpp:prompt_tokens_total") == evaluated
    assert delta("llamacpp:prompt_tokens_cached_total") == sum(u["prompt_tokens_details"]["cached_tokens"]
                                                               for u in usages)
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0  # the same prompt again: its prefix was cached
    assert delta('medgemma_gguf_http_requests_total{endpoint="/v1/chat/completions",status="200"}') == 3
    assert delta('medgemma_gguf_http_requests_total{endpoint="/v1/chat/completions",status="400"}') == 1
    assert delta('medgemma_gguf_requests_total{finish="length"}') == 3
    assert delta("llamacpp:n_decode_total") >= 15
    assert after["medgemma_gguf_slots"] == SLOTS and after["llamacpp:requests_processing"] == 0
    text = httpx.get(f"{base}/metrics").text
    assert "# TYPE llamacpp:tokens_predicted_total counter" in text
    assert re.search(r"^# TYPE llamacpp:requests_deferred gauge$", text, re.M)


def test_request_timeout_ends_a_reply_and_cors_is_off_by_default(files):
    from fastapi.testclient import TestClient

    from medgemma_gguf.runtime.chat import load
    from medgemma_gguf.runtime.server import ServerLimits, create_app

    with load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=8192, n_threads=1) as model:
        app = create_app(model, limits=ServerLimits(max_tokens_limit=LONG), request_timeout=0.3)
        with TestClient(app) as client:
            reply = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Go on."}], "max_tokens": LONG, "ignore_eos": True}).json()
            assert reply["choices"][0]["finish_reason"] == "length" and reply["timings"]["timed_out"] is True
            assert 0 < reply["usage"]["completion_tokens"] < LONG
            preflight = client.options("/v1/chat/completions", headers={
                "Origin": "http://elsewhere.test", "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in preflight.headers
        allowed = create_app(model, cors_origins=["http://localhost:3000"])
        with TestClient(allowed) as client:
            preflight = client.options("/v1/chat/completions", headers={
                "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})
            assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
            other = client.get("/health", headers={"Origin": "http://elsewhere.test"})
            assert "access-control-allow-origin" not in other.headers


def test_requests_with_different_lora_sets_batch_apart_and_each_equals_its_solo_run(peft_adapter, converted, tmp_path):
    """Adapters belong to the context: slots with different adapter sets never share a decode (as llama-server
    batches them), so each request's log-probabilities are its adapter's, under load as when alone."""
    from test_lora import CHAT_ADAPTER
    from test_lora import VARIANT as LORA_VARIANT

    from medgemma_gguf.convert.lora_gguf import convert_adapter
    from medgemma_gguf.runtime.chat import load
    from medgemma_gguf.runtime.server import create_app

    base = converted(LORA_VARIANT)
    lora = convert_adapter(str(peft_adapter(LORA_VARIANT, **CHAT_ADAPTER)), str(base.text_path), tmp_path,
                           name="cardio", progress=False).path
    model = load(base.text_path, n_gpu_layers=0, n_ctx=512, n_threads=1, lora=[lora], n_parallel=4)
    url, stop = run_uvicorn(create_app(model))
    try:
        name = model.name
        bodies = [{"model": f"{name}+{which}", "max_tokens": 40, "ignore_eos": True, "logprobs": True,
                   "top_logprobs": 2, "messages": [{"role": "user", "content": text}]}
                  for which, text in (("base", "What is the normal adult resting heart rate?"),
                                      ("cardio", "What is the normal adult resting heart rate?"),
                                      ("base", "List three causes of anemia."), ("cardio", "Describe an ECG."))]
        records = stream_all(url, bodies)
        alone = [httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["logprobs"]
                 ["content"] for body in bodies]
        noise = []  # batched vs alone at the first token: only the batch shape differs there
        for record, solo in zip(records, alone, strict=True):
            together = logprob_entries(record["chunks"])
            agreed = agree_until_near_tie(together, solo)
            assert agreed >= 1
            for got, want in zip(together[:agreed], solo[:agreed], strict=True):  # drift through the KV cache
                assert abs(got["logprob"] - want["logprob"]) < 1e-2
            noise.append(max(abs(a["logprob"] - b["logprob"]) for a, b in zip(
                [together[0], *together[0]["top_logprobs"]], [solo[0], *solo[0]["top_logprobs"]], strict=True)))
        # the same prompt with and without the adapter: a mixed-up batch would show this much, not the noise
        effect = max(abs(a["logprob"] - b["logprob"]) for a, b in zip(
            alone[0][0]["top_logprobs"], alone[1][0]["top_logprobs"], strict=True))
        assert max(noise) < 1e-2 and effect > 10 * max(noise), (noise, effect)  # 1.6e-3 seen run alone
    finally:
        stop()
        model.close()
