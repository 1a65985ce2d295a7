"""Patient data stays put (issue 22): offline mode enforced at the socket level, no content in logs at INFO+,
DICOM identifiers never read, the serve audit log, and nothing written outside the folders a user chose.

``MARKER`` is put in every place a patient identifier or a prompt could come from — the prompt text, every
identifying DICOM element, image file names — and searched for in every log, reply header, audit line,
thumbnail and written file. The child processes run under ``privacy_recorder``, an audit hook installed
before anything is imported, which records every socket and every file opened for writing.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import privacy_recorder
import pytest
from imaging_data import new_dataset
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from medgemma_gguf.errors import UserError
from medgemma_gguf.privacy import (
    CONTENT_LOGGER,
    OFFLINE_SWITCHES,
    SafeFormatter,
    disable_offline,
    enable_offline,
    is_offline,
    set_content_logging,
)
from medgemma_gguf.processes import free_port

MARKER = "ZQXV"
DATES = ("19010203", "19020304")  # the birth and study dates in the marker DICOM
VARIANT = "mm-deep"
API_KEY = "privacy-test-key"


def marker_dataset(rows: int = 24, cols: int = 20) -> Dataset:
    """A CT slice whose every identifying element holds MARKER (or one of DATES)."""
    ds = new_dataset(CTImageStorage, modality="CT")
    ds.PatientName = f"{MARKER}^Name"
    ds.PatientID = f"{MARKER}-ID"
    ds.PatientBirthDate = DATES[0]
    ds.PatientAddress = f"{MARKER} Street 1"
    ds.AccessionNumber = f"{MARKER}ACC"
    ds.InstitutionName = f"{MARKER} Hospital"
    ds.ReferringPhysicianName = f"{MARKER}^Doctor"
    ds.StudyDate = DATES[1]
    ds.StudyDescription = f"{MARKER} chest"
    ds.ImageComments = f"{MARKER} comment"
    ds.add_new(0x00090010, "LO", f"{MARKER} private creator")
    ds.add_new(0x00091001, "LO", f"{MARKER} private value")
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    y, x = np.mgrid[0:rows, 0:cols]
    ds.set_pixel_data(((x * 97 + y * 31) % 2000 + 24).astype(np.uint16), "MONOCHROME2", 16)
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def without_identifiers(ds: Dataset) -> Dataset:
    clean = Dataset()
    clean.file_meta = ds.file_meta
    for element in ds:
        if element.tag.group in (0x0028, 0x7FE0) or element.keyword in ("SOPClassUID", "SOPInstanceUID", "Modality"):
            clean.add(element)
    return clean


def assert_no_marker(text: str | bytes, where: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for needle in (MARKER, *DATES):
        assert needle.encode() not in data, f"{needle} found in {where}"


# --- DICOM -------------------------------------------------------------------------------------------------


def test_only_pixel_elements_are_read_from_a_dicom():
    from medgemma_gguf.runtime.dicom_image import pixel_tags

    tags = pixel_tags()
    assert {tag >> 16 for tag in tags} == {0x0028, 0x5200, 0x7FE0}
    assert 0x00280030 in tags and 0x00281050 in tags and 0x7FE00010 in tags  # spacing, window, pixel data
    assert not {0x00100010, 0x00100020, 0x00100030, 0x00080050, 0x00080080, 0x00080020} & set(tags)


def test_a_dicom_full_of_identifiers_decodes_like_one_without_them():
    from medgemma_gguf.runtime.dicom_image import read_dicom_frame
    from medgemma_gguf.runtime.images import load_image_from_data_uri

    ds = marker_dataset()
    full, clean = dicom_bytes(ds), dicom_bytes(without_identifiers(ds))
    assert MARKER.encode() in full and MARKER.encode() not in clean
    a = read_dicom_frame(full, "a.dcm", frame=0, max_pixels=10**6, force=False)
    b = read_dicom_frame(clean, "b.dcm", frame=0, max_pixels=10**6, force=False)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.window == b.window == (40.0, 400.0)
    uri = "data:application/dicom;base64," + base64.b64encode(full).decode()
    img = load_image_from_data_uri(uri, max_pixels=10**6)
    assert_no_marker(repr(img.info), "the decoded image's metadata")
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    assert_no_marker(buffer.getvalue(), "a PNG written from it")


def test_a_broken_dicom_is_refused_without_quoting_its_identifiers():
    from medgemma_gguf.runtime.dicom_image import read_dicom_frame

    full = dicom_bytes(marker_dataset())
    for broken in (full[: len(full) - 300], full[:400]):
        with pytest.raises(UserError) as error:
            read_dicom_frame(broken, "scan.dcm", frame=0, max_pixels=10**6, force=False)
        assert_no_marker(str(error.value), "the error message")


# --- offline mode ------------------------------------------------------------------------------------------


def _own_address() -> str | None:
    """A non-loopback IPv4 address of this machine (a stand-in for a remote host that needs no network)."""
    for probe in ("192.0.2.1", "10.255.255.255", "203.0.113.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect((probe, 9))  # UDP connect sends nothing; it picks the outgoing interface
            except OSError:
                continue
            address = sock.getsockname()[0]
            if not address.startswith("127."):
                return address
    return None


GUARD_SCRIPT = textwrap.dedent("""
    import json, socket, sys, urllib.request
    host, port = sys.argv[1], int(sys.argv[2])
    results = {}

    def attempt(name, action):
        try:
            action()
            results[name] = "ok"
        except Exception as exc:
            results[name] = type(exc).__name__ + ": " + str(exc)

    if sys.argv[3] == "offline":
        from medgemma_gguf.privacy import enable_offline
        enable_offline()
    attempt("stand-in", lambda: socket.create_connection((host, port), timeout=5).close())
    attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", (host, 9)))
    attempt("dns", lambda: socket.getaddrinfo("huggingface.co", 443))
    attempt("urllib", lambda: urllib.request.urlopen("https://huggingface.co/api/models", timeout=5))
    import httpx
    attempt("httpx", lambda: httpx.get("https://huggingface.co", timeout=5))
    listener = socket.create_server(("127.0.0.1", 0))
    attempt("loopback", lambda: socket.create_connection(listener.getsockname(), timeout=5).close())
    from medgemma_gguf.runtime.rpc import parse_endpoints
    parse_endpoints(f"{host}:{port}")  # an RPC worker the user names stays reachable
    attempt("named worker", lambda: socket.create_connection((host, port), timeout=5).close())
    attempt("other port", lambda: socket.create_connection((host, port + 1), timeout=5).close())
    import subprocess
    child = ("import socket, sys; from medgemma_gguf.privacy import enable_offline, offline_requested\\n"
             "if offline_requested(): enable_offline()\\n"
             "socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()\\n"
             "try:\\n    socket.create_connection(('192.0.2.77', 80), timeout=1); print('reached')\\n"
             "except Exception as exc:\\n    print(type(exc).__name__)")
    done = subprocess.run([sys.executable, "-c", child, host, str(port)], capture_output=True, text=True)
    results["child"] = done.stdout.strip() or done.stderr.strip()[-300:]
    print(json.dumps(results))
""")


def test_offline_mode_refuses_every_connection_beyond_this_machine(tmp_path):
    """A real stand-in server on this machine's non-loopback address: reachable without the guard, refused
    with OfflineError (and never accepting a connection) with it; lookups and datagrams refused too."""
    address = _own_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to stand in for a remote host")
    server = socket.create_server((address, 0))
    server.settimeout(0.5)
    port = server.getsockname()[1]
    script = tmp_path / "guard.py"
    script.write_text(GUARD_SCRIPT)
    try:
        online = json.loads(subprocess.run([sys.executable, str(script), address, str(port), "online"],
                                           capture_output=True, text=True, timeout=120, check=True).stdout)
        for _ in range(3):  # "stand-in", "named worker" and the child's
            server.accept()[0].close()
        offline = json.loads(subprocess.run([sys.executable, str(script), address, str(port), "offline"],
                                            capture_output=True, text=True, timeout=120, check=True).stdout)
        for _ in range(2):  # the named worker's connections (the process's, its child's): all that reached it
            server.accept()[0].close()
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert online["stand-in"] == "ok" and online["udp"] == "ok" and online["loopback"] == "ok"
    assert offline["stand-in"].startswith(f"OfflineError: offline mode: refused a network connection to {address}")
    assert offline["udp"].startswith("OfflineError: offline mode: refused a network connection")
    for name in ("dns", "urllib", "httpx"):
        assert offline[name].startswith("OfflineError: offline mode: refused to look up the address of "
                                        "huggingface.co"), offline[name]
    assert offline["loopback"] == "ok"  # this machine's own services stay reachable
    assert offline["named worker"] == "ok" and online["named worker"] == "ok"
    assert not offline["other port"].startswith("OfflineError")  # allowed by host (refused by the OS here)
    assert offline["child"] == "OfflineError"  # a child process inherits offline mode and the named workers only
    assert online["child"] != "OfflineError"


def test_offline_switches_reach_the_hugging_face_libraries_even_after_import():
    code = ("import huggingface_hub.constants as c, os; from medgemma_gguf.privacy import enable_offline; "
            "before = c.HF_HUB_OFFLINE; enable_offline(); "
            "print(before, c.HF_HUB_OFFLINE, c.HF_HUB_DISABLE_TELEMETRY, os.environ['HF_HUB_OFFLINE'], "
            "os.environ['TRANSFORMERS_OFFLINE'], os.environ['MEDGEMMA_GGUF_OFFLINE'])")
    env = {k: v for k, v in os.environ.items() if k not in (*OFFLINE_SWITCHES, "MEDGEMMA_GGUF_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "True", "True", "1", "1", "1"]


def test_enable_and_disable_offline_in_process():
    saved = {k: os.environ.get(k) for k in OFFLINE_SWITCHES}
    enable_offline()
    try:
        assert is_offline() and all(os.environ[k] == v for k, v in OFFLINE_SWITCHES.items())
        with pytest.raises(UserError, match="refused a network connection to 192.0.2.1 port 80"):
            socket.create_connection(("192.0.2.1", 80), timeout=1)
    finally:
        disable_offline()
    assert not is_offline() and {k: os.environ.get(k) for k in OFFLINE_SWITCHES} == saved


@pytest.mark.parametrize("where", ["group", "command", "env"])
def test_a_hub_id_not_in_the_cache_is_a_clear_error_offline(where, tmp_path):
    args = {"group": ["--offline", "convert"], "command": ["convert", "--offline"], "env": ["convert"]}[where]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    if where == "env":
        env["MEDGEMMA_GGUF_OFFLINE"] = "1"
    record = tmp_path / "record.jsonl"
    done = privacy_recorder.run([*args, "google/medgemma-4b-it", "-o", str(tmp_path / "out")], record, env=env,
                                cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: google/medgemma-4b-it is not in the Hugging Face cache and offline mode is on (--offline, "
        "MEDGEMMA_GGUF_OFFLINE or HF_HUB_OFFLINE): download it once while online (`hf download "
        "google/medgemma-4b-it`), or pass a local folder")
    assert not (tmp_path / "out").exists()
    assert [e for e in privacy_recorder.events(record) if e["e"] not in ("write", "socket", "socket.bind")] == []


# --- logs ----------------------------------------------------------------------------------------------------


def _failure() -> BaseException:
    try:
        try:
            raise KeyError(f"{MARKER} inner")
        except KeyError as inner:
            raise ValueError(f"cannot parse {MARKER} patient text") from inner
    except ValueError as exc:
        return exc


def test_tracebacks_in_the_log_carry_no_exception_messages():
    exc = _failure()
    record = logging.LogRecord("medgemma_gguf.runtime.server", logging.ERROR, __file__, 1, "request %s failed",
                               ("abc",), (type(exc), exc, exc.__traceback__))
    assert MARKER in logging.Formatter().format(record)  # another handler formatted it first (and cached it)
    text = SafeFormatter().format(record)
    assert "request abc failed" in text and "builtins.ValueError" in text and "builtins.KeyError" in text
    assert "in _failure" in text and "test_privacy.py" in text
    assert_no_marker(text, "the formatted log line")
    set_content_logging(True)
    try:
        assert MARKER in SafeFormatter().format(record)  # --log-content: the whole traceback
    finally:
        set_content_logging(False)


def test_the_content_logger_is_silent_unless_asked(caplog):
    from medgemma_gguf.privacy import content_log

    with caplog.at_level(logging.DEBUG):
        content_log("prompt %s", MARKER)
        assert not [r for r in caplog.records if MARKER in r.getMessage()]
        logging.getLogger(CONTENT_LOGGER).info("prompt %s", MARKER)  # even a stray INFO on it is dropped
        assert not [r for r in caplog.records if MARKER in r.getMessage()]
        set_content_logging(True)
        try:
            content_log("prompt %s", MARKER)
        finally:
            set_content_logging(False)
    shown = [r for r in caplog.records if MARKER in r.getMessage()]
    assert len(shown) == 1 and shown[0].levelno == logging.DEBUG and shown[0].name == CONTENT_LOGGER


def test_served_prompts_and_replies_reach_the_log_only_with_log_content(converted, caplog):
    from fastapi.testclient import TestClient

    from medgemma_gguf.runtime.chat import load
    from medgemma_gguf.runtime.server import create_app

    files = converted(VARIANT)
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": f"{MARKER} history"}, {"type": "image_url", "image_url": {"url": _png_data_uri()}}]}],
        "max_tokens": 2}
    with load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=512, n_threads=1) as model:
        for enabled in (False, True):
            set_content_logging(enabled)
            caplog.clear()
            with caplog.at_level(logging.DEBUG), TestClient(create_app(model)) as client:
                reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200
            marked = [r for r in caplog.records if MARKER in r.getMessage()]
            assert all(r.levelno == logging.DEBUG and r.name == CONTENT_LOGGER for r in marked)
            assert len(marked) == (1 if enabled else 0)
            if enabled:
                text = reply.json()["choices"][0]["message"]["content"]
                assert any(r.getMessage().endswith(f"reply {text}") for r in caplog.records)
                assert "<" in marked[0].getMessage() and _png_data_uri()[30:90] not in marked[0].getMessage()
    set_content_logging(False)


# --- audit log --------------------------------------------------------------------------------------------


def test_the_audit_log_appends_rotates_by_size_and_is_private(tmp_path):
    from medgemma_gguf.runtime.audit import AuditLog, key_id

    path = tmp_path / "audit.jsonl"
    path.write_text('{"kept": true}\n')
    log = AuditLog(path, max_bytes=1024, backups=2)
    for index in range(60):
        log.write({"n": index, "status": 200, "pad": "x" * 40})
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    lines = [json.loads(line) for name in reversed(files) for line in (tmp_path / name).read_text().splitlines()]
    assert [row["n"] for row in lines] == list(range(60 - len(lines), 60))  # oldest deleted, order kept
    assert all((tmp_path / name).stat().st_size <= 1024 for name in files)
    fresh = AuditLog(tmp_path / "new.jsonl")
    fresh.close()
    assert stat.S_IMODE((tmp_path / "new.jsonl").stat().st_mode) == 0o600
    assert key_id("secret") == "sha256:2bb80d537b1d" and "secret" not in key_id("secret")
    with pytest.raises(UserError) as caught:
        AuditLog(tmp_path / "missing" / "audit.jsonl")
    assert str(caught.value) == (f"cannot open the audit log {tmp_path / 'missing' / 'audit.jsonl'}: its folder "
                                 f"{tmp_path / 'missing'} does not exist; create it (mkdir -p {tmp_path / 'missing'}) "
                                 "or choose another file for audit_log")
    assert caught.value.for_cli().endswith("or choose another file for --audit-log")
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(UserError, match="cannot open the audit log .*choose a writable file for"):
        AuditLog(tmp_path / "folder.jsonl")


# --- end to end: serve, chat, convert, eval ---------------------------------------------------------------


def _png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _dicom_uri() -> str:
    return "data:application/dicom;base64," + base64.b64encode(dicom_bytes(marker_dataset())).decode()


def _no_network(events: list[dict]) -> None:
    """Sockets bound to loopback only (serve's listener; urllib3's IPv6 probe binds ::1); no connection, name
    lookup or datagram beyond this machine."""
    loopback = ("('127.0.0.1',", "('::1',")
    for event in events:
        if event["e"] == "socket.bind" or event["e"] in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            assert event["address"].startswith(loopback) or not event["address"].startswith("("), event
        elif event["e"].startswith("socket.") and event["e"] != "socket":
            raise AssertionError(f"name lookup in a command that needs no network: {event}")


def _writes(events: list[dict]) -> set[Path]:
    return {Path(e["path"]) for e in events if e["e"] in ("write", "os.mkdir", "os.replace", "os.rename",
                                                           "os.symlink", "os.link", "shutil.copyfile")}


def _under(path: Path, roots: list[Path]) -> bool:
    """``path`` is in one of ``roots`` (or a folder above a root, created for it), or a device / proc file."""
    return (any(path == root or root in path.parents or path in root.parents for root in roots)
            or str(path).startswith(("/dev/", "/proc/self/")))


@pytest.fixture
def sandbox(tmp_path):
    """A home, a temp folder and a working folder of the test's own: every write is checked against them."""
    folders = {name: tmp_path / name for name in ("home", "tmp", "cwd", "out")}
    for folder in folders.values():
        folder.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "MEDGEMMA_", "XDG_", "TRANSFORMERS_")) and k not in ("MPLCONFIGDIR",)}
    env.update(HOME=str(folders["home"]), TMPDIR=str(folders["tmp"]))
    return folders, env


@pytest.mark.e2e
def test_serve_logs_no_content_opens_no_outbound_socket_and_audits_each_request(converted, sandbox, tmp_path):
    folders, env = sandbox
    files = converted(VARIANT)
    audit_path = folders["out"] / "audit.jsonl"
    record = tmp_path / "serve-record.jsonl"
    log_path = tmp_path / "serve.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["serve", str(files.text_path), "--mmproj", str(files.mmproj_path), "--ctx", "1024", "--threads", "1",
            "--parallel", "1", "--port", str(port), "--api-key", API_KEY, "--audit-log", str(audit_path)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(privacy_recorder.command(args), cwd=folders["cwd"], stdout=log,
                                   stderr=subprocess.STDOUT, env={**env, privacy_recorder.RECORD_ENV: str(record)})
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        content = [{"type": "text", "text": f"Patient {MARKER} Name, born {DATES[0]}: describe"},
                   {"type": "image_url", "image_url": {"url": _png_data_uri()}},
                   {"type": "image_url", "image_url": {"url": _dicom_uri()}}]
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 3}
        sent = [
            httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=300),
            httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": True}, headers=headers, timeout=300),
            httpx.post(f"{base}/v1/completions", json={"prompt": f"{MARKER} history", "max_tokens": 2},
                       headers=headers, timeout=300),
            httpx.post(f"{base}/api/thumbnail", json={"image": _dicom_uri()}, headers=headers, timeout=60),
            # refused requests: a bad field, a local file, a broken image, a bad key, a query string
            httpx.post(f"{base}/v1/chat/completions", json={**body, f"{MARKER}_field": f"{MARKER}"}, headers=headers),
            httpx.post(f"{base}/v1/chat/completions", headers=headers, json={"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"file:///data/{MARKER}-patient.dcm"}}]}]}),
            httpx.post(f"{base}/v1/chat/completions", headers=headers, json={"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:application/dicom;base64,"
                                                    + base64.b64encode(dicom_bytes(marker_dataset())[:600]).decode()}}
            ]}]}),
            httpx.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {MARKER}"}),
            httpx.get(f"{base}/v1/models?note={MARKER}", headers=headers),
            # a local process forging its address: the audit log keeps the connection's own
            httpx.get(f"{base}/v1/models", headers={**headers, "X-Forwarded-For": "203.0.113.9"}),
        ]
        assert [r.status_code for r in sent[:4]] == [200, 200, 200, 200], [r.text[:300] for r in sent[:4]]
        assert all(400 <= r.status_code < 500 for r in sent[4:8]), [(r.status_code, r.text) for r in sent[4:8]]
        thumbnail = base64.b64decode(sent[3].json()["thumbnail"].split(",", 1)[1])
        assert_no_marker(thumbnail, "the thumbnail")
        assert Image.open(io.BytesIO(thumbnail)).info == {}  # a plain PNG: no text, no metadata
        for response in sent[4:8]:
            assert_no_marker(json.dumps(response.json()["error"].get("message", "")).replace(
                f"{MARKER}_field", ""), "an error body")  # an unknown field is named, its value never
    finally:
        process.terminate()
        process.wait(timeout=60)
    served_log = log_path.read_text(errors="replace")
    assert "POST /v1/chat/completions" in served_log  # the log is captured (access lines at INFO)
    assert_no_marker(served_log, "the server's log")
    assert _png_data_uri()[30:90] not in served_log
    events = privacy_recorder.events(record)
    _no_network(events)
    listening = [e["address"] for e in events if e["e"] == "socket.bind" and not e["address"].endswith(" 0)")]
    assert listening == [repr(("127.0.0.1", port))]  # its one listener (other binds: port-0 probes on loopback)
    assert all(_under(p, [folders["out"], folders["tmp"]]) for p in _writes(events)), sorted(_writes(events))
    audit = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert_no_marker(audit_path.read_bytes(), "the audit log")
    assert API_KEY not in audit_path.read_text()
    posts = [a for a in audit if a["path"] != "/health"]
    assert [a["status"] for a in posts] == [r.status_code for r in sent]
    first = posts[0]
    assert first["model"] and first["prompt_tokens"] > 0 and first["completion_tokens"] == 3
    assert first["client"] == "127.0.0.1" and first["key_id"].startswith("sha256:") and first["duration_ms"] > 0
    assert posts[1]["completion_tokens"] == 3 and posts[7]["key_id"] is None  # the stream; the bad key
    assert posts[9]["client"] == "127.0.0.1"  # not the forged X-Forwarded-For
    assert set(first) == {"time", "request_id", "client", "method", "path", "key_id", "model", "prompt_tokens",
                          "completion_tokens", "status", "duration_ms"}


@pytest.mark.e2e
def test_chat_convert_and_eval_offline_open_no_socket_and_write_only_where_asked(tiny_checkpoint, converted, sandbox,
                                                                               tmp_path):
    folders, env = sandbox
    files = converted(VARIANT)
    scan = folders["cwd"] / f"{MARKER}-patient.dcm"
    marker_dataset().save_as(scan, enforce_file_format=True)
    runs = {
        "chat": ["--offline", "chat", str(files.text_path), "--mmproj", str(files.mmproj_path), "--image", str(scan),
                 "--prompt", f"{MARKER} born {DATES[0]}: findings?", "--max-tokens", "2", "--threads", "1",
                 "--ctx", "1024"],
        "convert": ["convert", "--offline", str(tiny_checkpoint("mm-k256")), "-o", str(folders["out"] / "gguf"),
                    "--outtype", "f32"],
        "eval": ["eval", "--offline", str(files.text_path.parent), "--reference", str(files.text_path), "--slice",
                 "medqa-mini:2", "--out", str(folders["out"] / "report"), "--no-speed", "--quiet", "--threads", "1"],
    }
    cache = folders["home"] / ".cache" / "medgemma-gguf"
    for name, args in runs.items():
        record = tmp_path / f"{name}.jsonl"
        done = privacy_recorder.run(args, record, env=env, cwd=folders["cwd"])
        assert done.returncode == 0, (name, done.stderr[-3000:])
        assert_no_marker(done.stderr, f"{name}'s log (stderr)")
        events = privacy_recorder.events(record)
        _no_network(events)
        allowed = [folders["out"], folders["tmp"], cache]
        outside = sorted(str(p) for p in _writes(events) if not _under(p, allowed))
        assert outside == [], (name, outside)
    assert list(folders["tmp"].iterdir()) == []  # temporary files are removed
    assert sorted(p.name for p in folders["cwd"].iterdir()) == [scan.name]
    home = sorted(str(p.relative_to(folders["home"])) for p in folders["home"].rglob("*") if p.is_file())
    assert all(p.startswith(".cache/medgemma-gguf/") for p in home), home


def test_the_readme_privacy_section_uses_real_commands_and_flags():
    import re
    import shlex

    import click

    from medgemma_gguf.cli import cli

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Privacy"):readme.index("## Fine-tuned models")]
    lines = re.findall(r"^(?:MEDGEMMA_GGUF_OFFLINE=1 )?medgemma-gguf [^\n#]*", section, flags=re.MULTILINE)
    assert len(lines) == 3
    for line in lines:
        words = shlex.split(line)[1:] if line.startswith("MEDGEMMA") else shlex.split(line)
        rest = words[1:]
        if rest[0] == "--offline":  # the group's own flag
            rest = rest[1:]
        name, *rest = rest
        command = cli.get_command(click.Context(cli), name)
        known = {opt for param in command.params for opt in param.opts}
        assert {w for w in rest if w.startswith("--")} <= known, line
        command.make_context(name, rest, resilient_parsing=True)
    serve = cli.get_command(click.Context(cli), "serve")
    serve_flags = {opt for param in serve.params for opt in param.opts}
    for flag in re.findall(r"`(--[a-z-]+)", section):
        assert flag in serve_flags or flag in ("--offline", "--rpc", "--save-patches", "--cache-dir"), flag
    assert "refused a network connection to" in section and "is not in the Hugging Face cache" in section


def test_a_dicom_series_full_of_identifiers_opens_without_them(tmp_path, caplog):
    """Volumes read only geometry and pixel elements: the description, warnings and slices carry no identifier."""
    from imaging_data import ct_dataset, slice_hu

    from medgemma_gguf.runtime.volumes import open_volume

    folder = tmp_path / f"{MARKER}-study"
    folder.mkdir()
    for k in range(4):
        ds = ct_dataset(slice_hu(k, 16, 16), series_uid="1.2.826.0.1.3680043.8.498.7", z=2.5 * k, instance=None)
        for element in marker_dataset():
            if element.tag.group in (0x0008, 0x0009, 0x0010, 0x0020) and element.keyword not in (
                    "SOPClassUID", "SOPInstanceUID", "Modality"):
                ds.add(element)
        ds.save_as(folder / f"{MARKER}-{k}.dcm", enforce_file_format=True)
    assert MARKER.encode() in (folder / f"{MARKER}-0.dcm").read_bytes()
    with caplog.at_level(logging.DEBUG), open_volume(folder, label="the study") as volume:
        slices = list(volume.images(32))
        text = volume.info.describe() + repr(volume.info)
    assert len(slices) == 4 and "ordered by InstanceNumber" not in text  # geometry was read
    assert_no_marker(text + "".join(r.getMessage() for r in caplog.records), "the volume's description and log")
