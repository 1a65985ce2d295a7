"""The web chat page at ``/`` in a real browser: Debian's Chromium, headless, driven by Playwright for Python,
against the real server (uvicorn on loopback) serving the tiny image+text model.

A missing browser fails these tests with the fix (``scripts/setup.sh`` installs it); they never skip.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from test_runtime_chat import VARIANT, native_image
from test_server import run_uvicorn

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
API_KEY = "page-key-1"
LAPTOP = {"width": 1366, "height": 768}


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        pytest.fail(f"Chromium is not installed ({CHROMIUM}); the web page tests need it: run scripts/setup.sh, or "
                    "apt-get install chromium", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: pip install -e '.[test]' (scripts/setup.sh does)", pytrace=False)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def site(converted):
    """(base_url, model): the server with an API key, two slots, room for long replies."""
    from medgemma_gguf.runtime.chat import load
    from medgemma_gguf.runtime.server import ServerLimits, create_app

    files = converted(VARIANT)
    model = load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=8192, n_threads=1, n_parallel=2)
    base, stop = run_uvicorn(create_app(model, api_key=API_KEY, limits=ServerLimits(max_tokens_limit=6000)))
    yield base, model
    stop()
    model.close()


@pytest.fixture
def page(browser, site):
    """A fresh page on a laptop-sized screen; every request it makes is recorded in ``page.requests``."""
    context = browser.new_context(viewport=LAPTOP)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site[0])
    tab = context.new_page()
    tab.requests = []
    tab.on("request", lambda request: tab.requests.append(request.url))
    tab.set_default_timeout(60_000)
    yield tab
    context.close()


def _wait(page, expression: str, timeout: float = 60) -> None:
    """Poll a JavaScript expression until it is true (the page's CSP forbids Playwright's eval-based waits)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(f"() => Boolean({expression})"):
        assert time.monotonic() < deadline, f"never true: {expression}"
        time.sleep(0.05)


def _enter_key(page) -> None:
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    assert "API key" in dialog.inner_text()
    page.fill("#key-input", API_KEY)
    page.click("#key-save")
    _wait(page, "document.getElementById('status').textContent === 'ready'")


def _only_this_server(page, base: str) -> None:
    outside = [url for url in page.requests if not url.startswith((base + "/", "data:", "blob:"))]
    assert not outside, f"the page made requests elsewhere: {outside}"


def _mutations(page) -> None:
    page.evaluate("""() => {
        window.mutations = 0;
        new MutationObserver((records) => { window.mutations += records.length; })
            .observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
    }""")


def test_a_message_with_images_streams_its_reply(page, site, tmp_path):
    from imaging_data import write_series

    base, _ = site
    response = httpx.get(base + "/")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page.goto(base + "/")
    _enter_key(page)  # /api/presets answered 401: the page asked for the key
    assert "ckpt-mm-deep" in page.inner_text("#model-name")
    assert "Not a medical device" in page.inner_text("#notice") and page.locator("#notice").is_visible()
    png = tmp_path / "cxr.png"
    native_image(112, 7).save(png)
    jpeg = tmp_path / "skin.jpg"
    native_image(96, 8).save(jpeg, format="JPEG")
    series = tmp_path / "series"
    write_series(series, n=1, rows=16, cols=16)
    dicom = next(series.iterdir())
    page.set_input_files("#file-input", [str(png), str(jpeg), str(dicom)])
    _wait(page, "document.querySelectorAll('#attachments img').length === 3")
    thumbnails = page.eval_on_selector_all("#attachments img", "images => images.map(i => [i.src, i.naturalWidth])")
    assert thumbnails[0][0].startswith("data:image/png") and thumbnails[1][0].startswith("data:image/jpeg")
    assert thumbnails[2][0].startswith("data:image/png")  # the DICOM one rendered by /api/thumbnail
    assert all(width > 0 for _, width in thumbnails)  # all drawn
    page.select_option("#preset", "radiology")
    assert page.input_value("#system") == "You are an expert radiologist."
    page.fill("#max-tokens", "24")
    _mutations(page)
    with page.expect_request("**/v1/chat/completions") as sent:
        page.fill("#message", "Describe these images")
        page.press("#message", "Enter")
    body = json.loads(sent.value.post_data)
    _wait(page, "document.querySelector('.message.assistant .stats')?.textContent.includes('tokens')")
    shown = page.evaluate("() => document.querySelector('.message.assistant .content').textContent")
    assert body["stream"] is True and body["max_tokens"] == 24 and body["messages"][0]["role"] == "system"
    assert [item["type"] for item in body["messages"][1]["content"]] == ["text", *["image_url"] * 3]
    urls = [item["image_url"]["url"] for item in body["messages"][1]["content"][1:]]
    assert [url.split(";")[0] for url in urls] == ["data:image/png", "data:image/jpeg", "data:application/dicom"]
    reference = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False, "stream_options": None},
                           timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert shown == reference["choices"][0]["message"]["content"] != ""
    assert page.evaluate("window.mutations") > 5  # the reply arrived piece by piece
    stats = page.inner_text(".message.assistant .stats")
    assert f"{reference['usage']['completion_tokens']} reply tokens" in stats and "tokens/s" in stats
    assert page.locator(".message.user .images img").count() == 3
    page.click(".message.assistant .copy")
    assert page.evaluate("navigator.clipboard.readText()") == shown
    _only_this_server(page, base)


def _decode_calls(base: str) -> float:
    """The server's ``llama_decode`` count so far (``/metrics``: it rises with every generated token)."""
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return float(re.search(r"^llamacpp:n_decode_total (\S+)$", text, re.MULTILINE).group(1))


def test_stop_ends_a_reply_and_frees_its_slot(page, site):
    base, _ = site
    page.goto(base + "/")
    _enter_key(page)
    page.fill("#max-tokens", "6000")
    last = "[...document.querySelectorAll('.message.assistant')].at(-1)"
    # The tiny model's greedy reply usually repeats without end, but the slot's cached prefix from the test
    # before can change its last logit bits and so its path: a reply that ends by itself before the click
    # reaches the page tests nothing, so ask again (a stopped reply is what is under test).
    for prompt in ("Tell me everything.", "Describe every detail, at length.", "Go on without stopping."):
        decodes = _decode_calls(base)
        page.fill("#message", prompt)
        page.click("#send")
        # the reply is running: text shown, or (a random model may emit tokens that render as nothing, or
        # reasoning) the server decoding for it
        deadline = time.monotonic() + 60
        while not page.evaluate(f"() => {last}?.querySelector('.content')?.textContent.length > 0") \
                and _decode_calls(base) < decodes + 4:
            assert time.monotonic() < deadline, ("the reply never started; the page says: "
                                                 + page.inner_text("#composer-error"))
            time.sleep(0.05)
        if page.is_enabled("#stop"):
            page.click("#stop")
        _wait(page, f"{last}?.querySelector('.stats')?.textContent.length > 0")
        if "stopped" in page.evaluate(f"() => {last}.querySelector('.stats').textContent"):
            break
    else:
        pytest.fail("every reply ended by itself before Stop was clicked")
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    deadline = time.monotonic() + 30
    while httpx.get(f"{base}/health").json()["slots_busy"]:
        assert time.monotonic() < deadline, "the stopped reply kept its slot"
        time.sleep(0.05)
    metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert 'medgemma_gguf_requests_total{finish="cancelled"} 1.0' in metrics
    _only_this_server(page, base)


def test_keyboard_only_on_a_laptop_screen(page, site):
    base, _ = site
    page.goto(base + "/")
    _enter_key(page)
    for selector in ("#message", "#send", "#stop", "#notice", "#file-input + *, .attach"):
        box = page.locator(selector).first.bounding_box()
        assert box and box["y"] + box["height"] <= LAPTOP["height"] and box["x"] + box["width"] <= LAPTOP["width"], \
            selector
    page.locator("body").focus()
    focused = []
    for _ in range(30):  # Tab through the controls until the message box has the focus
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id || document.activeElement.className"))
        if focused[-1] == "message":
            break
    assert focused[-1] == "message", focused
    page.keyboard.type("What is the normal adult resting heart rate?")
    page.keyboard.press("Enter")
    _wait(page, "document.querySelector('.message.assistant .content')?.textContent.length > 0")
    page.keyboard.press("Escape")  # stops the reply, if it is still running
    _wait(page, "!document.getElementById('send').disabled")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "file-input"  # the attach control is reachable too
    _only_this_server(page, base)


def test_the_reasoning_block_is_folded(page, site):
    """MedGemma's reasoning comes as ``reasoning_content`` deltas; the tiny model writes none unasked, so this
    check replays a server stream that has one (the page's rendering is what is tested)."""
    base, _ = site
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {"reasoning_content": "Consider the lung fields."},
                            "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {"content": "No acute findings."}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
               "timings": {"decode_tokens_per_s": 12.5}},
              {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}}]
    stream = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=stream))
    page.goto(base + "/")
    _enter_key(page)
    page.fill("#message", "Findings?")
    page.press("#message", "Enter")
    _wait(page, "document.querySelector('.message.assistant .stats')?.textContent.includes('tokens')")
    details = page.locator(".message.assistant details.reasoning")
    assert details.is_visible() and details.get_attribute("open") is None  # folded away
    assert page.inner_text(".message.assistant .content") == "No acute findings."
    details.locator("summary").click()
    assert "Consider the lung fields." in details.inner_text()
    assert "12.5 tokens/s" in page.inner_text(".message.assistant .stats")


def _zip_of(folder: Path, path: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member in sorted(folder.iterdir()):
            archive.write(member, member.name)
    return path


def _reply_matches(page, base: str, body: dict, index: int) -> None:
    """The reply shown in the ``index``-th assistant message is the server's own non-streamed reply to ``body``."""
    _wait(page, f"document.querySelectorAll('.message.assistant .stats')[{index}]?.textContent.includes('tokens')")
    shown = page.evaluate(f"() => document.querySelectorAll('.message.assistant .content')[{index}].textContent")
    reference = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False, "stream_options": None},
                           timeout=120, headers={"Authorization": f"Bearer {API_KEY}"})
    assert reference.status_code == 200, reference.text
    assert shown == reference.json()["choices"][0]["message"]["content"] != ""


def test_a_volume_and_a_slide_go_as_study_items_with_their_presets(page, site, tmp_path):
    from imaging_data import write_series, write_slide

    from medgemma_gguf.runtime.prompt import load_presets

    presets = load_presets()
    base, _ = site
    series = tmp_path / "series"
    write_series(series, n=3, rows=16, cols=16)
    volume = _zip_of(series, tmp_path / "ct.zip")
    slide = tmp_path / "biopsy.tiff"
    write_slide(slide, 2688, 1792, levels=3)
    page.goto(base + "/")
    _enter_key(page)
    page.set_input_files("#file-input", str(volume))
    _wait(page, "document.querySelectorAll('#attachments li.study').length === 1")
    assert "CT/MR volume" in page.inner_text("#attachments") and "ct.zip" in page.inner_text("#attachments")
    assert page.input_value("#preset") == "ct-findings"  # the notebook's layout for a volume, chosen for it
    assert page.input_value("#system") == "" and "CT/MR volume" in page.inner_text("#preset-hint")
    page.fill("#attachments input.count", "2")
    page.fill("#max-tokens", "8")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.fill("#message", "Is the liver normal?")
        page.press("#message", "Enter")
    body = json.loads(sent.value.post_data)
    content = body["messages"][0]["content"]
    assert [item["type"] for item in content] == ["text", "volume", "text"] and len(body["messages"]) == 1
    assert content[0]["text"] == presets["ct-findings"].instruction and content[2]["text"] == "Is the liver normal?"
    assert content[1]["slices"] == 2 and content[1]["data"].startswith("data:") and ";base64," in content[1]["data"]
    _reply_matches(page, base, body, 0)
    assert "CT/MR volume: ct.zip" in page.inner_text(".message.user .images")
    with page.expect_request("**/v1/chat/completions") as sent:  # a follow-up: plain text after the study turn
        page.fill("#message", "And the spleen?")
        page.press("#message", "Enter")
    body = json.loads(sent.value.post_data)
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][2]["content"] == "And the spleen?" and body["messages"][0]["content"] == content
    _reply_matches(page, base, body, 1)

    page.click("#new-chat")
    page.set_input_files("#file-input", str(slide))
    _wait(page, "document.querySelectorAll('#attachments li.study').length === 1")
    assert "pathology slide" in page.inner_text("#attachments")
    page.fill("#message", "colon, biopsy:")
    page.press("#message", "Enter")  # the preset is still ct-findings: refused in the page, nothing sent
    _wait(page, "!document.getElementById('composer-error').hidden")
    assert "preset ct-findings takes a CT/MR volume" in page.inner_text("#composer-error")
    assert page.input_value("#message") == "colon, biopsy:" and page.locator(".message").count() == 0
    page.select_option("#preset", "pathology-patches")
    page.fill("#attachments input.count", "2")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.press("#message", "Enter")
    body = json.loads(sent.value.post_data)
    content = body["messages"][0]["content"]
    assert [item["type"] for item in content] == ["text", "slide"] and page.locator("#composer-error").is_hidden()
    assert content[0]["text"] == presets["pathology-patches"].instruction.replace("{prompt}", "colon, biopsy:")
    assert content[1]["patches"] == 2 and content[1]["suffix"] == ".tiff"
    _reply_matches(page, base, body, 0)

    page.click("#new-chat")  # the server's one-line error, shown in the page
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04junk")
    page.select_option("#preset", "ct-findings")
    page.set_input_files("#file-input", str(broken))
    _wait(page, "document.querySelectorAll('#attachments li.study').length === 1")
    page.fill("#message", "Findings?")
    page.press("#message", "Enter")
    _wait(page, "document.querySelector('.message.assistant .error')")
    assert "not a readable zip" in page.inner_text(".message.assistant .error")
    _only_this_server(page, base)


def test_a_study_over_the_body_limit_is_refused_in_the_page(page, site, tmp_path):
    """The page reads the limit from /api/presets (here lowered to 2 KB on its way to the page)."""
    from imaging_data import write_series

    base, _ = site

    def lowered(route):
        response = route.fetch()
        route.fulfill(response=response, json={**response.json(), "max_body_bytes": 2048})

    page.route("**/api/presets", lowered)
    series = tmp_path / "series"
    write_series(series, n=4, rows=24, cols=24)
    volume = _zip_of(series, tmp_path / "big.zip")
    assert volume.stat().st_size * 4 / 3 > 2048
    page.goto(base + "/")
    _enter_key(page)
    page.set_input_files("#file-input", str(volume))
    _wait(page, "!document.getElementById('composer-error').hidden")
    error = page.inner_text("#composer-error")
    assert "big.zip is too large" in error and "at most 2 KB per request" in error and "--max-body-bytes" in error
    assert page.locator("#attachments li").count() == 0


def test_two_images_go_as_a_longitudinal_pair_with_its_preset(page, site, tmp_path):
    from medgemma_gguf.runtime.prompt import load_presets

    base, _ = site
    paths = []
    for seed, name in ((3, "prior.png"), (4, "current.png")):
        native_image(112, seed).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    page.goto(base + "/")
    _enter_key(page)
    page.select_option("#preset", "cxr-longitudinal")
    assert "two images" in page.inner_text("#preset-hint")
    page.set_input_files("#file-input", paths[:1])
    _wait(page, "document.querySelectorAll('#attachments img').length === 1")
    page.fill("#max-tokens", "8")
    page.fill("#message", "What changed?")
    page.press("#message", "Enter")  # one image only: refused in the page
    _wait(page, "!document.getElementById('composer-error').hidden")
    assert "takes two images" in page.inner_text("#composer-error") and page.locator(".message").count() == 0
    page.set_input_files("#file-input", paths[1:])
    _wait(page, "document.querySelectorAll('#attachments img').length === 2")
    page.fill("#message", "")
    with page.expect_request("**/v1/chat/completions") as sent:  # an empty message asks the notebook's question
        page.click("#send")
    body = json.loads(sent.value.post_data)
    content = body["messages"][0]["content"]
    assert [item["type"] for item in content] == ["longitudinal", "text"]
    assert content[0]["prior"].startswith("data:image/png") and content[0]["prior"] != content[0]["current"]
    assert content[1]["text"] == load_presets()["cxr-longitudinal"].question
    _reply_matches(page, base, body, 0)
