"""Hardening of ``medgemma-gguf serve`` (issue 11), against the real command in a child process.

Hostile and random request bodies (seeded mutations of valid requests: ``fuzzing.py``) each get a clear
JSON error with a 4xx status or a normal reply — never a 500, a traceback or an ERROR line in the server's
log — and a normal request is answered afterwards. Also: start-up refusals (empty API key, a public host
without a key), header and body timeouts (slow-loris), an aborted upload logged as one INFO line, and the
500 path: a request id and a generic message, the details only in the log.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from fuzzing import Raw, mutations, serialize
from test_runtime_chat import VARIANT, image_size, native_image

from medgemma_gguf.processes import free_port, stop_process

API_KEY = "hardening-key"
MAX_TOKENS = 3


class Served:
    """A ``medgemma-gguf serve`` child process; ``log()`` is everything it wrote to stderr so far."""

    def __init__(self, args: list[str], cwd: Path, log_path: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "MEDGEMMA_API_KEY": ""}
        env.pop("MEDGEMMA_API_KEY")
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "medgemma_gguf", "serve", *args, "--port", str(self.port)],
                cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, f"serve exited: {self.log()}"
            assert time.monotonic() < deadline, f"serve did not start: {self.log()}"
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def post(self, body=None, *, raw: bytes | str | None = None, key: str | None = API_KEY,
             timeout: float = 120) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        if raw is not None:
            headers["Content-Type"] = "application/json"
            content = raw.encode() if isinstance(raw, str) else raw
            return httpx.post(f"{self.base}/v1/chat/completions", content=content, headers=headers, timeout=timeout)
        return httpx.post(f"{self.base}/v1/chat/completions", json=body, headers=headers, timeout=timeout)

    def stop(self) -> None:
        stop_process(self.process)


def _png_uri(img) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _zipped_series(tmp: Path) -> str:
    from imaging_data import write_series

    folder = tmp / "series"
    write_series(folder, n=4, rows=16, cols=16)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, path.name)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(converted, tiny_checkpoint, tmp_path_factory):
    """(Served, workdir, valid requests): serve with a key, short timeouts and --allow-local-files (workdir)."""
    files = converted(VARIANT)
    workdir = tmp_path_factory.mktemp("serve-cwd")
    img = native_image(image_size(tiny_checkpoint(VARIANT)), 3)
    img.save(workdir / "cxr.png")
    os.mkfifo(workdir / "fifo.png")
    (workdir / "escape.png").symlink_to("/etc/hostname")
    served = Served([str(files.text_path), "--mmproj", str(files.mmproj_path), "--threads", "1", "--ctx", "512",
                     "--api-key", API_KEY, "--max-tokens-limit", str(MAX_TOKENS), "--max-images", "6",
                     "--max-body-bytes", "400000", "--header-timeout", "1", "--body-timeout", "2",
                     "--allow-local-files"], workdir, workdir.parent / "serve.log")
    valid = [
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0.7, "top_p": 0.9,
         "top_k": 20, "seed": 3, "stop": ["\n\n"], "logit_bias": {"5": 1.5}, "presence_penalty": 0.1},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "text", "text": "Findings?"}, {"type": "image_url", "image_url": {"url": _png_uri(img)}}]}],
         "max_completion_tokens": 2, "stream": True, "stream_options": {"include_usage": True}},
        {"messages": [{"role": "user", "content": [
            {"type": "volume", "data": _zipped_series(workdir.parent), "slices": 4},
            {"type": "text", "text": "Describe the CT."}]}], "max_tokens": 1, "repeat_penalty": 1.1},
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "cxr.png"},
                                                   {"type": "text", "text": "What is shown?"}]}],
         "max_tokens": 1, "response_format": {"type": "json_object"}},
    ]
    yield served, workdir, valid
    served.stop()


def _check_error(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"], what
        assert "Traceback" not in error["message"] and len(error["message"]) < 2000, what


def _check_log_clean(served: Served) -> None:
    text = served.log()
    assert "Traceback" not in text, text[-3000:]
    assert "ERROR" not in text, text[-3000:]


def test_valid_requests_work(server):
    served, _, valid = server
    for body in valid:
        response = served.post(body)
        assert response.status_code == 200, response.text


HOSTILE_CASES = [
    # (raw JSON text, expected status, words in the message)
    ('{"messages": ' + "[" * 100_000, 400, "nested"),
    ("[" * 100_000 + "]" * 100_000, 400, "nested"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "x": ' + "[" * 65 + "]" * 65 + "}", 400, "64 levels"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "temperature": 5e-324}', 400, "'temperature' must be"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "temperature": ' + "9" * 400 + "}", 400, "'temperature'"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "temperature": ' + "9" * 5000 + "}", 400, "5000 digits"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', 400, "NaN is not a JSON number"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "top_p": -Infinity}', 400, "-Infinity"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": null, "max_tokens": 1000000000}',
     400, "'max_tokens' 1000000000 is above this server's limit of 3"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 2, "max_tokens": "many"}', 400,
     "'max_tokens' must be a whole number"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 2, "max_tokens": 1000000000}', 400,
     "'max_tokens' 1000000000 is above"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 1e400}', 400,
     "'max_completion_tokens' must be a whole number"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "n": true}', 400, "'n' must be 1"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "stream_options": [1]}', 400, "'stream_options'"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "seed": ' + "1" * 300 + "}", 400, "'seed'"),
    ('{"messages": [{"role": "user", "content": "Hi"}], "logit_bias": {"5": 1e400}}', 400, "'logit_bias'"),
    ('{"messages": [{"role": "user", "content": [{"type": "volume", "data": "AAAA", "slices": 1e400}]}]}', 400, ""),
    ('{"messages": [{"role": "user", "content": [{"type": "image", "path": "/dev/zero"}]}]}', 403, "outside"),
    ('{"messages": [{"role": "user", "content": [{"type": "image", "path": "fifo.png"}]}]}', 400,
     "not a regular file"),
    ('{"messages": [{"role": "user", "content": [{"type": "image", "path": "escape.png"}]}]}', 403, "outside"),
    ('{"messages": [{"role": "user", "content": [{"type": "image", "path": "../serve.log"}]}]}', 403, "outside"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///dev/zero"}}]}]}',
     403, "outside"),
    ('{"messages": [{"role": "user", "content": [{"type": "volume", "path": "fifo.png", "slices": 4}]}]}', 400,
     "not a regular file or folder"),
    ('{"messages": [{"role": "user", "content": [{"type": "volume", "path": "/etc", "slices": 4}]}]}', 403, "outside"),
    ("", 400, "not valid JSON"),
    ("\xff\xfe{}", 400, "not valid JSON"),
]


@pytest.mark.parametrize("raw,status,words", HOSTILE_CASES, ids=[str(i) for i in range(len(HOSTILE_CASES))])
def test_hostile_requests_get_clear_errors(server, raw, status, words):
    served, _, _ = server
    response = served.post(raw=raw.encode("latin-1") if raw.startswith("\xff") else raw)
    assert response.status_code == status, response.text[:500]
    _check_error(response, raw[:60])
    assert words in response.json()["error"]["message"]


def test_random_request_mutations_never_500(server):
    """Seeded mutations of every valid request: 4xx with a message or a normal reply; the log stays clean."""
    served, _, valid = server
    seen = {"2xx": 0, "4xx": 0}
    for index, body in enumerate(valid):
        for what, text in mutations(body, seed=1100 + index, count=60):
            response = served.post(raw=text)
            _check_error(response, what)
            seen["2xx" if response.status_code < 300 else "4xx"] += 1
    assert seen["4xx"] > 100 and seen["2xx"] > 5, seen  # the mutations reach both sides
    _check_log_clean(served)
    assert served.post(valid[0]).status_code == 200


def test_api_key_is_checked(server):
    served, _, valid = server
    for key in (None, "wrong", API_KEY[:-1], API_KEY + "x"):
        response = served.post(valid[0], key=key)
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    for header in ("Bearer", "Basic " + API_KEY, API_KEY):
        response = httpx.post(f"{served.base}/v1/chat/completions", json=valid[0], headers={"Authorization": header})
        assert response.status_code == 401
    sock = socket.create_connection(("127.0.0.1", served.port))  # an empty bearer token, as written on the wire
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\nConnection: close\r\n\r\n")
    assert _read_all(sock, 30).startswith(b"HTTP/1.1 401")
    sock.close()


def _read_all(sock: socket.socket, limit: float) -> bytes:
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open past {limit} s; got {data[:200]!r}")
    return data


def test_slow_headers_and_bodies_are_cut_off(server):
    """Header timeout 1 s, body timeout 2 s: slow-loris sockets are closed and the server keeps answering."""
    served, _, valid = server
    slow_headers = []
    for _ in range(40):
        sock = socket.create_connection(("127.0.0.1", served.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow_headers.append(sock)
    silent = socket.create_connection(("127.0.0.1", served.port))
    slow_body = socket.create_connection(("127.0.0.1", served.port))
    slow_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {API_KEY}\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"messages"')
    assert served.post(valid[0]).status_code == 200  # served meanwhile
    for sock in [*slow_headers, silent]:
        assert _read_all(sock, 30) == b""  # closed without an answer
        sock.close()
    answer = _read_all(slow_body, 30).decode()
    slow_body.close()
    assert answer.startswith("HTTP/1.1 408") and "did not arrive in time" in answer
    _check_log_clean(served)
    assert "sent no complete request headers within 1 s" in served.log()


def test_an_aborted_upload_is_one_info_line(server):
    served, _, valid = server
    sock = socket.create_connection(("127.0.0.1", served.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {API_KEY}\r\nContent-Length: 100000\r\n\r\n".encode() + b"{" * 500)
    time.sleep(0.3)
    sock.close()
    deadline = time.monotonic() + 20
    while "disconnected before sending the whole request" not in served.log():
        assert time.monotonic() < deadline, served.log()[-2000:]
        time.sleep(0.1)
    lines = [line for line in served.log().splitlines() if "disconnected before sending" in line]
    assert len(lines) == 1 and lines[0].startswith("INFO")
    _check_log_clean(served)
    assert served.post(valid[0]).status_code == 200


def test_the_process_refuses_unsafe_settings_before_loading(converted, tmp_path):
    files = converted(VARIANT)
    base = [sys.executable, "-m", "medgemma_gguf", "serve", str(files.text_path), "--threads", "1",
            "--port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if k != "MEDGEMMA_API_KEY"}
    cases = [
        (["--api-key", ""], env, "set a non-empty key or none"),
        (["--api-key", "   "], env, "set a non-empty key or none"),
        ([], {**env, "MEDGEMMA_API_KEY": ""}, "set a non-empty key or none"),
        (["--host", "0.0.0.0"], env, "--insecure-no-auth"),
        (["--host", "::"], env, "--insecure-no-auth"),
        (["--host", "192.168.1.10", "--api-key", ""], env, "set a non-empty key or none"),
    ]
    for args, environment, words in cases:
        result = subprocess.run([*base, *args], env=environment, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert "loaded" not in result.stderr  # refused before the model loads


@pytest.mark.unit
def test_binding_rules():
    from medgemma_gguf.errors import InputError
    from medgemma_gguf.runtime.http_limits import check_binding, is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.0.2", "example.org", "localhost.evil.com"))
    check_binding("127.0.0.1", None)
    check_binding("0.0.0.0", "k")
    check_binding("0.0.0.0", None, insecure_no_auth=True)
    with pytest.raises(InputError, match="non-empty key or none") as empty:
        check_binding("127.0.0.1", "")
    assert "--api-key" in empty.value.for_cli() and "api_key" in str(empty.value)
    with pytest.raises(InputError, match="insecure_no_auth"):
        check_binding("10.0.0.1", None)


@pytest.mark.unit
def test_json_limits():
    from medgemma_gguf.runtime.http_limits import ApiError, HttpLimits, json_depth_exceeds, parse_json

    limits = HttpLimits(max_json_depth=5)
    assert parse_json(b'{"a": [[[1]]]}', limits) == {"a": [[[1]]]}
    assert not json_depth_exceeds([[[[[1]]]]], 5) and json_depth_exceeds([[[[[[1]]]]]], 5)
    assert parse_json(serialize({"t": Raw("5e-324")}).encode(), limits) == {"t": 5e-324}
    for raw, words in [(b'{"a": [[[[[1]]]]]}', "more than 5 levels"), (b"[" * 100_000, "nested"),
                       (b'{"a": NaN}', "NaN"), (b'{"a": ' + b"7" * 4001 + b"}", "4001 digits"),
                       (b'{"a": 1,}', "line 1 column"), (b"\x80", "UTF-8")]:
        with pytest.raises(ApiError, match=words) as error:
            parse_json(raw, limits)
        assert error.value.status == 400


def test_internal_errors_are_generic_500s_with_a_request_id(converted, caplog):
    """A failure the server did not foresee: the client sees a request id and no detail; the log has both."""
    from fastapi.testclient import TestClient

    from medgemma_gguf.runtime.chat import load
    from medgemma_gguf.runtime.server import create_app

    files = converted(VARIANT)
    model = load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=256, n_threads=1)
    try:
        def broken(*_args, **_kwargs):
            raise RuntimeError("secret internal detail /opt/model")

        model.prompt = broken  # the server builds every prompt through it
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        with caplog.at_level(logging.INFO), TestClient(create_app(model), raise_server_exceptions=False) as client:
            plain = client.post("/v1/chat/completions", json=body)
            streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        for response in (plain, streamed):
            assert response.status_code == 500
            message = response.json()["error"]["message"]
            rid = response.headers["x-request-id"]
            assert message == f"internal error (request id {rid}); the server's log has the details"
            assert "secret" not in response.text and response.json()["error"]["type"] == "server_error"
            records = [r for r in caplog.records if rid in r.getMessage()]
            assert len(records) == 1 and records[0].levelno == logging.ERROR
            assert "secret internal detail" in str(records[0].exc_info[1])
    finally:
        model.close()


def test_the_request_log_never_echoes_a_body(server):
    served, _, _ = server
    served.post(raw='{"messages": [{"role": "user", "content": "PATIENT-NAME-XYZ"}], "temperature": 1e400}')
    assert "PATIENT-NAME-XYZ" not in served.log()


def test_fifo_and_device_paths_do_not_block_the_model(server):
    """A FIFO or device path is refused at once (before the model lock), and /health and requests go on."""
    served, workdir, valid = server
    body = {"messages": [{"role": "user", "content": [{"type": "image", "path": str(workdir / "fifo.png")}]}]}
    started = time.monotonic()
    response = served.post(body, timeout=30)
    assert response.status_code == 400 and "not a regular file" in response.json()["error"]["message"]
    assert time.monotonic() - started < 30
    assert served.post(valid[0]).status_code == 200
