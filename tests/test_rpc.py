"""Splitting a model across llama.cpp RPC workers: real workers (``medgemma-gguf worker``) on 127.0.0.1.

The split model must give exactly the local model's tokens (a CPU worker computes with the same kernels);
workers that cannot be used are refused before loading; a worker killed mid-reply ends that reply with
``UnavailableError`` while this process carries on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from medgemma_gguf.errors import InputError, MismatchError, UnavailableError
from medgemma_gguf.processes import free_port
from medgemma_gguf.runtime.offload import SplitTarget, assign_layers, plan_split
from medgemma_gguf.runtime.rpc import Endpoint, parse_endpoints, probe

VARIANT = "mm-k256"


def start_worker(port: int) -> subprocess.Popen:
    """``medgemma-gguf worker`` on 127.0.0.1:port with one thread, ready when it answers the handshake."""
    process = subprocess.Popen([sys.executable, "-m", "medgemma_gguf", "worker", "--port", str(port), "--threads", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            probe(Endpoint("127.0.0.1", port), timeout=5)
            return process
        except UnavailableError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"worker did not start: {process.stderr.read()}") from None
            time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    if process.stderr:
        process.stderr.close()


@pytest.fixture(scope="module")
def workers() -> Iterator[list[str]]:
    ports = [free_port(), free_port()]
    started = [start_worker(port) for port in ports]
    yield [f"127.0.0.1:{port}" for port in ports]
    for process in started:
        stop(process)


@pytest.fixture
def fake_worker() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """A plain TCP server on 127.0.0.1 that answers each connection with ``reply(conn)``."""
    servers: list[socket.socket] = []

    def make(reply: Callable[[socket.socket], None]) -> str:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def run() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn, contextlib.suppress(OSError):
                    reply(conn)

        threading.Thread(target=run, daemon=True).start()
        return f"127.0.0.1:{server.getsockname()[1]}"

    yield make
    for server in servers:
        server.close()


def read_hello(conn: socket.socket) -> None:
    conn.recv(1 + 8 + 24)


# --- addresses and plans ----------------------------------------------------------------------------------


def test_rpc_addresses_are_comma_separated_or_repeated_and_checked():
    assert [str(e) for e in parse_endpoints(["a:1,b:2", " c:3 "])] == ["a:1", "b:2", "c:3"]
    assert parse_endpoints("[::1]:50052") == [Endpoint("::1", 50052)]
    for bad in ("host", "host:port", "host:0", ":50052", "a:1,a:1"):
        with pytest.raises(InputError) as error:
            parse_endpoints(bad)
        assert "--rpc" in error.value.for_cli() and "rpc" in str(error.value)


def test_layers_are_assigned_as_llama_cpp_assigns_them():
    # measured with two real servers and tensor_split [1, 3]: layers 0-1 on RPC0, 2-5 + output on RPC1
    assert assign_layers(6, 7, [1, 3]) == [0, 0, 1, 1, 1, 1, 1]
    assert assign_layers(6, 3, [1, 1]) == [None, None, None, None, 0, 0, 1]  # the last n_gpu_layers only
    assert assign_layers(6, 0, [1, 1]) == [None] * 7


def test_split_plan_follows_free_memory_and_keeps_the_rest_local(converted):
    files = converted(VARIANT)
    targets = [SplitTarget("RPC0", 4 << 30, remote=True), SplitTarget("RPC1", 2 << 30, remote=True)]
    plan = plan_split(files.text_path, targets, n_ctx=512, mmproj_path=files.mmproj_path, headroom_bytes=1 << 30)
    assert plan.n_gpu_layers == 7 and plan.tensor_split == pytest.approx((0.75, 0.25))
    assert [len(share.layers) for share in plan.shares] == [6, 1] and plan.shares[1].layers == (6,)  # output last
    text = plan.describe()
    assert "RPC0: layers 0-5 (6)" in text and "RPC1: output (1)" in text and "mmproj" in text and "local CPU" in text
    whole = plan_split(files.text_path, [SplitTarget("RPC0", 1 << 40, remote=True)], n_ctx=512, headroom_bytes=1 << 30)
    assert whole.n_gpu_layers == 7 and not whole.cpu_layers
    need = whole.shares[0].total  # weights + KV + compute of the whole model
    small = plan_split(files.text_path, [SplitTarget("RPC0", (1 << 30) + need * 2 // 3, remote=True)], n_ctx=512,
                       headroom_bytes=1 << 30)
    assert 0 < small.n_gpu_layers < 7 and small.fits and small.cpu_layers
    assert "stay on the local CPU" in small.describe()


# --- workers that cannot be used are refused from Python ------------------------------------------------------


def test_a_closed_port_is_unavailable():
    with pytest.raises(UnavailableError, match=r"cannot reach RPC worker 127\.0\.0\.1:\d+ .*medgemma-gguf worker"):
        probe(Endpoint("127.0.0.1", free_port()), timeout=2)


def test_a_server_answering_junk_is_not_a_worker(fake_worker):
    address = fake_worker(lambda conn: (read_hello(conn), conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")))
    with pytest.raises(MismatchError, match="is not a llama.cpp RPC worker of protocol 7"):
        probe(parse_endpoints(address)[0], timeout=5)


def test_a_worker_of_another_protocol_version_is_refused(fake_worker):
    address = fake_worker(lambda conn: (read_hello(conn), conn.sendall(struct.pack("<Q", 28) + bytes([6, 1, 0, 0])
                                                                       + bytes(24))))
    with pytest.raises(MismatchError, match=r"speaks protocol 6\.1\.0, this llama.cpp speaks 7\.0\.0"):
        probe(parse_endpoints(address)[0], timeout=5)


def test_a_silent_server_times_out_with_the_reason(fake_worker):
    address = fake_worker(lambda conn: time.sleep(3))
    with pytest.raises(UnavailableError, match="did not answer within 1 s: it is serving another client"):
        probe(parse_endpoints(address)[0], timeout=1)


def test_worker_refuses_a_network_address_without_the_flag():
    result = subprocess.run([sys.executable, "-m", "medgemma_gguf", "worker", "--host", "0.0.0.0", "--port",
                             str(free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--insecure-network" in result.stderr and "no authentication" in result.stderr


@pytest.mark.integration
def test_worker_on_a_network_address_with_the_flag_prints_upstreams_warning():
    host = own_address()
    if host is None:
        pytest.skip("this machine has no non-loopback address")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "medgemma_gguf", "worker", "--host", host, "--port", str(port),
                                "--threads", "1", "--insecure-network"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        lines = [process.stderr.readline() for _ in range(4)]
        assert lines[0] == f"WARNING: Host ('{host}') is != '127.0.0.1'\n"
        assert "Never expose the RPC server to an open network!" in lines[1]
        assert lines[3].startswith(f"medgemma-gguf worker on {host}:{port}, RPC protocol 7.0.0, offering CPU")
        for _ in range(100):  # the native server listens just after the announcement
            try:
                info = probe(Endpoint(host, port), timeout=30)
                break
            except UnavailableError:
                time.sleep(0.1)
        assert info.version == (7, 0, 0) and len(info.devices) == 1 and info.devices[0].total_bytes > 0
    finally:
        stop(process)


def test_load_refuses_a_bad_worker_before_loading(converted, fake_worker):
    from medgemma_gguf import load

    files = converted(VARIANT)
    junk = fake_worker(lambda conn: conn.sendall(b"\xff" * 64))
    with pytest.raises(MismatchError, match="not a llama.cpp RPC worker"):
        load(files.text_path, files.mmproj_path, n_ctx=512, n_threads=1, rpc=[junk])


# --- real workers on loopback ------------------------------------------------------------------------------


def conversations(image_size: int) -> list[list[dict]]:
    pixels = np.random.default_rng(3).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    return [[{"role": "user", "content": "What is the normal adult resting heart rate?"}],
            [{"role": "user", "content": [{"type": "image", "image": pixels},
                                          {"type": "text", "text": "Describe this X-ray"}]}]]


def test_split_across_two_workers_gives_the_local_tokens(converted, workers):
    from medgemma_gguf import load

    files = converted(VARIANT)
    settings = [{"max_tokens": 12}, {"max_tokens": 12, "temperature": 1.0, "seed": 11}]
    with load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=512, n_threads=1) as local:
        cases = conversations(local.image_size)
        expected = [local.chat(messages, **options).token_ids for messages in cases for options in settings]
    with load(files.text_path, files.mmproj_path, n_ctx=512, n_threads=1, rpc=",".join(workers)) as split:
        plan = split.plan.describe()
        assert split.plan.n_gpu_layers == 7 and [len(s.layers) for s in split.plan.shares] == [4, 3]
        assert workers[0] in plan and workers[1] in plan and "never remote" in plan
        got = [split.chat(messages, **options).token_ids for messages in cases for options in settings]
        stream = split.chat(cases[1], stream=True, max_tokens=12)
        streamed = "".join(stream)
    assert got == expected and all(expected)
    assert stream.result.token_ids == expected[2] and streamed == stream.result.text


def test_a_worker_killed_mid_reply_ends_the_reply_and_this_process_carries_on(converted, workers):
    from medgemma_gguf import load

    files = converted(VARIANT)
    port = free_port()
    doomed = start_worker(port)
    try:
        model = load(files.text_path, n_ctx=512, n_threads=1, rpc=[workers[0], f"127.0.0.1:{port}"])
        stream = model.chat([{"role": "user", "content": "Tell me everything."}], stream=True, max_tokens=400)
        next(stream.deltas())
        os.kill(doomed.pid, signal.SIGSTOP)  # the engine now waits on it, mid-reply
        time.sleep(0.5)
        os.kill(doomed.pid, signal.SIGKILL)
        with pytest.raises(UnavailableError) as error:
            stream.collect()
        message = str(error.value)
        assert f"RPC worker 127.0.0.1:{port} stopped answering during a reply" in message
        assert "Remote RPC server crashed" in message and "ggml-rpc.cpp" not in message
        assert "restart the worker and load the model again" in message and error.value.http_status == 503
        assert not model.alive
        with pytest.raises(UnavailableError, match="stopped answering earlier"):
            model.chat([{"role": "user", "content": "Hello"}])
        model.close()
    finally:
        stop(doomed)
    probe(parse_endpoints(workers[0])[0])  # the other worker serves the next client
    with load(files.text_path, n_ctx=512, n_threads=1, rpc=workers[0]) as again:
        assert again.chat([{"role": "user", "content": "Hello"}], max_tokens=2).completion_tokens > 0


@pytest.mark.e2e
def test_chat_cli_with_rpc_prints_the_local_reply(converted, workers):
    files = converted(VARIANT)
    base = [sys.executable, "-m", "medgemma_gguf", "chat", str(files.text_path), "--mmproj", str(files.mmproj_path),
            "--ctx", "512", "--threads", "1", "--prompt", "Hello", "--max-tokens", "8", "--json"]
    local = subprocess.run([*base, "--n-gpu-layers", "0"], capture_output=True, text=True, timeout=300)
    split = subprocess.run([*base, "--rpc", workers[0], "--rpc", workers[1]], capture_output=True, text=True,
                           timeout=300)
    assert local.returncode == 0 and split.returncode == 0, split.stderr
    assert json.loads(split.stdout)["text"] == json.loads(local.stdout)["text"]
    assert "split across 2 devices" in split.stderr and workers[1] in split.stderr
    dead = subprocess.run([*base, "--rpc", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=300)
    assert dead.returncode == 2 and dead.stderr.startswith("error: cannot reach RPC worker")


def own_address() -> str | None:
    """A non-loopback IPv4 address of this machine (a client or worker "on the network" without a network)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # UDP connect sends nothing; it picks the outgoing interface
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


def wait_for_server(process: subprocess.Popen, base: str) -> None:
    import httpx

    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "serve --rpc did not start"
        time.sleep(0.5)


@pytest.mark.e2e
def test_serve_with_rpc_answers_as_local_survives_a_dead_worker_and_recovers(converted, workers, tmp_path):
    import httpx
    from openai import OpenAI

    from medgemma_gguf import load

    files = converted(VARIANT)
    question = [{"role": "user", "content": "What is the normal adult resting heart rate?"}]
    with load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=512, n_threads=1) as local:
        expected = local.chat(question, max_tokens=12).text
    port, doomed_port = free_port(), free_port()
    doomed = start_worker(doomed_port)
    host = own_address() or "127.0.0.1"  # a client beyond loopback: its X-Forwarded-For must not be believed
    base = f"http://{host}:{port}"
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read after the server stops
    server = subprocess.Popen([sys.executable, "-m", "medgemma_gguf", "serve", str(files.text_path), "--mmproj",
                               str(files.mmproj_path), "--ctx", "512", "--threads", "1", "--parallel", "1", "--port",
                               str(port), "--host", host, "--api-key", "k", "--audit-log",
                               str(tmp_path / "audit.jsonl"), "--rpc", f"{workers[0]},127.0.0.1:{doomed_port}"],
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_server(server, base)
        health = httpx.get(f"{base}/health").json()
        assert health["status"] == "ok" and health["rpc"] == {"workers": [workers[0], f"127.0.0.1:{doomed_port}"],
                                                              "engine": "up"}
        client = OpenAI(base_url=f"{base}/v1", api_key="k")
        reply = client.chat.completions.create(model="m", messages=question, max_tokens=12)
        assert reply.choices[0].message.content == expected
        assert httpx.post(f"{base}/v1/chat/completions", json={"messages": question},
                          headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 401
        audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        # the engine process records the client the front saw, never the front's own address; X-Forwarded-For is
        # believed only from a proxy on this machine, as plain serve does
        spoofed = "203.0.113.9" if host == "127.0.0.1" else host
        assert [a["client"] for a in audit if a["path"] == "/v1/chat/completions"] == [host, spoofed]
        with httpx.stream("POST", f"{base}/v1/chat/completions", headers={"Authorization": "Bearer k"},
                          json={"messages": question, "max_tokens": 400, "stream": True}, timeout=120) as events:
            lines = events.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert "choices" in first
            os.kill(doomed.pid, signal.SIGSTOP)
            time.sleep(0.5)
            os.kill(doomed.pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        error = json.loads(rest[-1][len("data: "):])["error"]
        assert f"RPC worker 127.0.0.1:{doomed_port} stopped answering" in error["message"]
        assert server.poll() is None  # this server is still up
        down = httpx.get(f"{base}/health")
        assert down.status_code == 503 and down.json()["rpc"]["engine"] == "down"
        assert f"127.0.0.1:{doomed_port} stopped answering" in down.json()["error"]
        again = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": "Bearer k"},
                           json={"messages": question})
        assert again.status_code == 503 and "loads the model again once every worker answers" in \
            again.json()["error"]["message"]
        stop(doomed)
        doomed = start_worker(doomed_port)  # the worker is back: the model is loaded again and served
        deadline = time.monotonic() + 300
        while (health := httpx.get(f"{base}/health")).status_code != 200:
            assert time.monotonic() < deadline, health.text
            time.sleep(1)
        assert health.json()["rpc"]["engine"] == "up"
        assert client.chat.completions.create(model="m", messages=question, max_tokens=12).choices[0].message.content \
            == expected
    finally:
        server.terminate()
        server.wait(timeout=60)
        stop(doomed)
        log.close()
    assert server.returncode is not None


def test_readme_commands_use_real_options():
    import re
    import shlex
    from pathlib import Path

    from medgemma_gguf.runtime.cli import chat_command, serve_command, worker_command

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Across machines"):readme.index("## Fit a memory budget")]
    commands = {"chat": chat_command, "serve": serve_command, "worker": worker_command}
    lines = re.findall(r"^medgemma-gguf (chat|serve|worker) ([^\n#]*)", section, flags=re.MULTILINE)
    assert sorted({name for name, _ in lines}) == ["chat", "serve", "worker"]
    for name, rest in lines:
        commands[name].make_context(name, shlex.split(rest), resilient_parsing=True)
        known = {opt for param in commands[name].params for opt in param.opts}
        assert {w for w in shlex.split(rest) if w.startswith("--")} <= known
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL):
        compile(block, "README.md", "exec")
    assert "--insecure-network" in section and "--insecure-no-auth" in section and "Never expose" in section
