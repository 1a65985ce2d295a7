"""runtime.server: the real ``openai`` client against uvicorn on 127.0.0.1 gets HF's greedy reply for an
image+text chat, streaming and not; every bad request is a 4xx JSON error and the next request works."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import pytest
from test_runtime_chat import (
    GREEDY_TOKENS,
    VARIANT,
    hf_generate,
    hf_inputs,
    image_size,
    native_image,
    text_of,
    until_end,
)

from medgemma_gguf.errors import UserError
from medgemma_gguf.processes import free_port

API_KEY = "test-key-123"


def _data_uri(img, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def run_uvicorn(app):
    """Serve ``app`` with uvicorn on a free loopback port in a thread; returns (base_url, stop())."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def served(converted):
    """(base_url, ChatModel): uvicorn serving mm-deep F32 with two parallel slots in a thread, stopped after the
    module. While it is served the model's own chat refuses: references come from ``solo``."""
    from medgemma_gguf.runtime.chat import load
    from medgemma_gguf.runtime.server import ServerLimits, create_app

    files = converted(VARIANT)
    model = load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=512, n_threads=1, n_parallel=2)
    limits = ServerLimits(max_body_bytes=200_000, max_image_pixels=300 * 300, max_images=2, max_tokens_limit=64)
    base, stop = run_uvicorn(create_app(model, api_key=API_KEY, limits=limits))
    yield base, model
    stop()
    model.close()


@pytest.fixture(scope="module")
def solo(converted):
    """The same model loaded on its own, for reference replies."""
    from medgemma_gguf.runtime.chat import load

    files = converted(VARIANT)
    with load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=512, n_threads=1) as model:
        yield model


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _post(base: str, body, *, key: str | None = API_KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(f"{base}/v1/chat/completions", content=raw, headers=headers, timeout=120)
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120)


def _request(img, text: str = "Describe this X-ray") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": _data_uri(img)}}]}]


def test_openai_client_gets_hf_greedy_reply_streaming_and_not(served, client, tiny_checkpoint, hf_model):
    base, model = served
    folder = tiny_checkpoint(VARIANT)
    img = native_image(image_size(folder), 17)
    hf_messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                                {"type": "image", "image": img}]}]
    reference = until_end(model, hf_generate(hf_model(folder), hf_inputs(folder, hf_messages), GREEDY_TOKENS))
    expected_text = text_of(model, reference)

    reply = client.chat.completions.create(model="medgemma", messages=_request(img), max_tokens=GREEDY_TOKENS)
    assert reply.choices[0].message.content == expected_text
    assert reply.choices[0].finish_reason == ("length" if len(reference) == GREEDY_TOKENS else "stop")
    assert reply.usage.completion_tokens == len(reference)
    assert reply.usage.prompt_tokens == model.prompt(hf_messages).n_positions

    chunks = list(client.chat.completions.create(model="medgemma", messages=_request(img), max_tokens=GREEDY_TOKENS,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [reply.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == len(reference)

    with httpx.stream("POST", f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"messages": _request(img), "max_tokens": 4, "stream": True}, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        data_lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert data_lines[-1] == "data: [DONE]"
    assert json.loads(data_lines[0][6:])["object"] == "chat.completion.chunk"
    import openai

    stranger = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        stranger.chat.completions.create(model="medgemma", messages=_request(img), max_tokens=1)


def test_sampling_fields_are_honoured(served, solo, client):
    _, model = served
    question = [{"role": "user", "content": "What is the normal adult resting heart rate?"}]
    greedy = solo.chat(question, max_tokens=8)

    def reply(**fields):
        return client.chat.completions.create(model="m", messages=question, max_tokens=8, **fields)

    assert reply().choices[0].message.content == greedy.text
    assert reply(temperature=1.0, seed=4, extra_body={"top_k": 1}).choices[0].message.content == greedy.text
    assert reply(temperature=1.0, seed=4, extra_body={"min_p": 1.0}).choices[0].message.content == greedy.text
    seeded = solo.chat(question, max_tokens=8, temperature=1.3, top_p=0.9, seed=77)
    assert reply(temperature=1.3, top_p=0.9, seed=77).choices[0].message.content == seeded.text
    for fields in ({"presence_penalty": 2.0}, {"frequency_penalty": 1.5}, {"extra_body": {"repeat_penalty": 1.5}}):
        expected = solo.chat(question, max_tokens=8, **fields.get("extra_body", fields)).text
        assert reply(**fields).choices[0].message.content == expected
    sampled = {"max_tokens": 16, "temperature": 1.0, "seed": 21}
    full = solo.chat(question, **sampled).text
    stop = full[5:8]
    expected = solo.chat(question, **sampled, stop=[stop])
    assert expected.text == full[:full.index(stop)] and expected.finish_reason == "stop"
    stopped = client.chat.completions.create(model="m", messages=question, stop=[stop], **sampled)
    assert stopped.choices[0].message.content == expected.text and stopped.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="m", messages=question, stop=stop, stream=True, **sampled))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    forced = reply(logit_bias={"77": 100})
    assert forced.choices[0].message.content == model.engine.token_piece(77).decode() * 8


def test_structured_output_in_openais_shape(served, solo, client):
    import jsonschema
    from test_structured import QUESTION

    _, model = served
    schema = {"type": "object", "properties": {"severity": {"enum": ["none", "mild", "severe"]},
              "urgent": {"type": "boolean"}, "codes": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}},
              "required": ["severity", "urgent", "codes"]}
    expected = solo.chat(QUESTION, max_tokens=64, json_schema=schema, temperature=1.0, seed=8)
    response_format = {"type": "json_schema", "json_schema": {"name": "finding", "strict": True, "schema": schema}}
    reply = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=64, temperature=1.0, seed=8,
                                           response_format=response_format)
    assert reply.choices[0].message.content == expected.text and reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    chunks = list(client.chat.completions.create(model="m", messages=QUESTION, max_tokens=64, temperature=1.0,
                                                 seed=8, response_format=response_format, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    anything = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=64, temperature=1.0, seed=2,
                                              response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":  # an unbounded object may run to max_tokens
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:
        assert anything.choices[0].message.content.startswith("{")
    grammar = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=30,
                                             extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert grammar.choices[0].message.content in ("yes", "no")


def test_models_and_health(served, client):
    base, model = served
    assert [m.id for m in client.models.list().data] == [model.name]
    assert httpx.get(f"{base}/health").json() == {"status": "ok", "model": model.name, "slots": 2, "slots_busy": 0,
                                                  "queue": 0}


def test_bad_requests_are_4xx_json_errors_and_the_server_keeps_serving(served, client, tmp_path, tiny_checkpoint):
    base, model = served
    folder = tiny_checkpoint(VARIANT)
    img = native_image(image_size(folder), 5)
    good = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    expected = _post(base, good).json()["choices"][0]["message"]["content"]
    local = tmp_path / "cxr.png"
    img.save(local)
    huge = _data_uri(native_image(400, 1), "JPEG")  # 160000 pixels > the 90000 limit
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()
    cases = [
        (_post(base, good, key="wrong"), 401, "API key"),
        (_post(base, good, key=None), 401, "API key"),
        (_post(base, None, raw=b'{"messages": [}'), 400, "not valid JSON"),
        (_post(base, None, raw=b"\xff\xfe"), 400, "not valid JSON"),
        (_post(base, [1, 2]), 400, "JSON object"),
        (_post(base, {"messages": []}), 400, "non-empty array"),
        (_post(base, {"messages": _request(img)[:1] * 1, "max_tokens": 65}), 400, "above this server's limit of 64"),
        (_post(base, {**good, "temperature": -1}), 400, "temperature"),
        (_post(base, None, raw=b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e400}'), 400,
         "'temperature' must be 0 (greedy) or between 0.001 and 100"),
        (_post(base, {**good, "temperature": 5e-324}), 400, "'temperature' must be"),
        (_post(base, {**good, "top_k": -1}), 400, "'top_k' must be a whole number >= 0"),
        (_post(base, {**good, "top_k": True}), 400, "'top_k' must be a whole number"),
        (_post(base, {**good, "min_p": 2}), 400, "'min_p' must be between 0 and 1"),
        (_post(base, {**good, "presence_penalty": 9}), 400, "'presence_penalty' must be between -2 and 2"),
        (_post(base, {**good, "seed": 2**70}), 400, "'seed' must be a whole number"),
        (_post(base, {**good, "logit_bias": {"999999": 5}}), 400, "'logit_bias' names token 999999"),
        (_post(base, {**good, "stop": ["a", "b", "c", "d", "e"]}), 400, "'stop' takes at most 4 stop strings"),
        (_post(base, {**good, "stop": ""}), 400, "'stop' strings must not be empty"),
        (_post(base, {**good, "stop": 5}), 400, "'stop' must be a string or a list"),
        (_post(base, {**good, "response_format": {"type": "xml"}}), 400, "'response_format' type must be"),
        (_post(base, {**good, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "nonsense"}}}}), 400,
         "the JSON schema ('response_format') is not a valid JSON Schema"),
        (_post(base, {**good, "grammar": "root ::= nothing"}), 400, "'grammar' is not a grammar llama.cpp accepts"),
        (_post(base, {**good, "grammar": "root ::= <nosuch>"}), 400, "invalid token '<nosuch>'"),
        (_post(base, {**good, "n": 2}), 400, "'n' must be 1"),
        (_post(base, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cxr.png"}}]}]}), 400, "never fetched"),
        (_post(base, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}), 400, "invalid base64"),
        (_post(base, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": corrupt}}]}]}), 400, "not a readable image"),
        (_post(base, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(local)}}]}]}), 403, "local image paths are not allowed"),
        (_post(base, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": huge}}]}]}), 400, "more than the limit of 90000"),
        (_post(base, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_uri(img)}}] * 3}]}), 400, "at most 2"),
        (_post(base, {"messages": [{"role": "user", "content": "x" * 300_000}]}), 413, "at most 200000"),
        (_post(base, {"messages": [{"role": "user", "content": "pneumothorax " * 600}]}), 413, "context holds"),
        (_post(base, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}), 400,
         "alternate"),
        (httpx.get(f"{base}/v1/nothing-here"), 404, "Not Found"),
        (httpx.get(f"{base}/v1/models"), 401, "API key"),
        (httpx.get(f"{base}/metrics"), 401, "API key"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert message in error["message"] and error["type"], error
    streamed_error = _post(base, {**good, "stream": True, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}]}]})
    assert streamed_error.status_code == 400 and "never fetched" in streamed_error.json()["error"]["message"]
    assert _post(base, good).json()["choices"][0]["message"]["content"] == expected
    metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert metrics.status_code == 200 and "llamacpp:requests_processing" in metrics.text
    import openai

    with pytest.raises(openai.BadRequestError, match="never fetched"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://localhost/x.png"}}]}])
    assert client.chat.completions.create(model="m", **good).choices[0].message.content == expected


def test_a_client_leaving_mid_stream_frees_the_model(served):
    base, _ = served
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    good = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert _post(base, good).status_code == 200


def test_local_files_only_when_allowed(solo, tmp_path, tiny_checkpoint, converted):
    from fastapi.testclient import TestClient

    from medgemma_gguf.runtime.chat import load
    from medgemma_gguf.runtime.server import create_app

    files = converted(VARIANT)
    img = native_image(image_size(tiny_checkpoint(VARIANT)), 9)
    path = tmp_path / "cxr.png"
    img.save(path)
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Findings?"},
                                                      {"type": "image_url", "image_url": {"url": str(path)}}]}],
            "max_tokens": 5}
    messages = [{"role": "user", "content": [{"type": "text", "text": "Findings?"}, {"type": "image", "image": img}]}]
    with load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=512, n_threads=1) as model, \
            TestClient(create_app(model, allowed_roots=[tmp_path])) as local:
        reply = local.post("/v1/chat/completions", json=body)
        # while served, the model's own chat runs in one of the server's slots; raw logits are refused
        assert model.chat(messages, max_tokens=5).text == reply.json()["choices"][0]["message"]["content"]
        with pytest.raises(UserError, match="being served"):
            model.next_token_logits(model.prompt(messages))
    assert reply.status_code == 200
    expected = solo.chat(messages, max_tokens=5)
    assert reply.json()["choices"][0]["message"]["content"] == expected.text


def test_serve_command_wires_options_to_the_server(converted, monkeypatch):
    from click.testing import CliRunner

    from medgemma_gguf.runtime import server as server_module
    from medgemma_gguf.runtime.cli import serve_command

    calls = []
    monkeypatch.setattr(server_module, "serve", lambda model, **kwargs: calls.append((model.name, kwargs)))
    files = converted(VARIANT)
    args = [str(files.text_path), "--mmproj", str(files.mmproj_path), "--threads", "1", "--ctx", "256",
            "--max-images", "3", "--max-tokens-limit", "99", "--max-image-pixels", "1234", "--max-body-bytes", "5000"]
    result = CliRunner().invoke(serve_command, args)
    assert result.exit_code == 0, result.output
    (_, kwargs), = calls
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 8080 and kwargs["api_key"] is None
    assert kwargs["allow_local_files"] is False
    assert kwargs["limits"] == server_module.ServerLimits(5000, 1234, 3, 99)
    assert kwargs["parallel"] == 2 and kwargs["queue_size"] == 32  # the CPU build's default; the default queue
    assert kwargs["request_timeout"] is None and kwargs["cors_origins"] == ()
    assert "2 parallel slots of 256 positions each" in result.stderr
    tuned = CliRunner().invoke(serve_command, [*args, "--parallel", "3", "--queue", "0", "--request-timeout", "2.5",
                                               "--cors-origin", "http://localhost:3000"])
    assert tuned.exit_code == 0, tuned.output
    assert {k: calls[-1][1][k] for k in ("parallel", "queue_size", "request_timeout", "cors_origins")} == {
        "parallel": 3, "queue_size": 0, "request_timeout": 2.5, "cors_origins": ("http://localhost:3000",)}
    exposed = CliRunner().invoke(serve_command, [*args, "--host", "0.0.0.0", "--port", "9000", "--insecure-no-auth"])
    assert exposed.exit_code == 0 and "without an API key (--insecure-no-auth)" in exposed.stderr
    assert calls[-1][1]["host"] == "0.0.0.0" and calls[-1][1]["port"] == 9000
    assert calls[-1][1]["insecure_no_auth"] is True
