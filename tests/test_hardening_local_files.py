"""Local files (issue 11): only regular files, under the allowed roots, size-limited before reading, symlinks
resolved and checked; /dev/zero and FIFOs refused without blocking (``runtime.sources.read_regular_file``,
used by every image path of the CLI, the Python API and the server)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from medgemma_gguf.errors import AccessError, InputError, NotFoundError, ResourceError, UserError
from medgemma_gguf.runtime.prompt import ImageOptions, load_prompt_image
from medgemma_gguf.runtime.sources import read_regular_file

pytestmark = pytest.mark.unit


def _in_thread(function, *args, **kwargs):
    """Run ``function`` in a thread and fail if it blocks for more than 20 s (a FIFO read would hang)."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), f"{function.__name__} blocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    root.mkdir()
    image = root / "cxr.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(image)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    (root / "link-out.png").symlink_to(outside)
    (root / "link-in.png").symlink_to(image)
    (root / "link-dev.png").symlink_to("/dev/zero")
    (root / "sub").mkdir()
    return {"root": root, "image": image, "outside": outside, "fifo": fifo}


def test_regular_files_under_the_roots_are_read(tree):
    data = read_regular_file(tree["image"], what="image", allowed_roots=[tree["root"]])
    assert data == tree["image"].read_bytes()
    assert read_regular_file(tree["root"] / "link-in.png", what="image", allowed_roots=[tree["root"]]) == data
    climbed = tree["root"] / "sub" / ".." / "cxr.png"
    assert read_regular_file(climbed, what="image", allowed_roots=[tree["root"]]) == data


@pytest.mark.parametrize("name,error,words", [
    ("link-out.png", AccessError, "outside the allowed folders"),
    ("../secret.png", AccessError, "outside the allowed folders"),
    ("link-dev.png", AccessError, "outside the allowed folders"),
    ("pipe.png", InputError, "not a regular file"),
    ("sub", InputError, "is a directory"),
    ("nope.png", NotFoundError, "does not exist"),
])
def test_paths_under_roots_are_checked(tree, name, error, words):
    with pytest.raises(error, match=words):
        _in_thread(read_regular_file, tree["root"] / name, what="image", allowed_roots=[tree["root"]])


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom", "/dev/null", "/proc/self/fd/0"])
def test_devices_are_refused_without_reading_even_where_every_path_is_allowed(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist here")
    with pytest.raises(InputError, match="not a regular file"):
        _in_thread(read_regular_file, path, what="image")


def test_a_fifo_never_blocks(tree):
    with pytest.raises(InputError, match="not a regular file"):
        _in_thread(read_regular_file, tree["fifo"], what="image")
    options = ImageOptions(image_size=16)
    with pytest.raises(UserError, match="not a regular file"):
        _in_thread(load_prompt_image, str(tree["fifo"]), options)


def test_size_is_checked_before_reading(tree):
    size = tree["image"].stat().st_size
    assert read_regular_file(tree["image"], what="image", max_bytes=size)
    with pytest.raises(ResourceError, match=f"is {size} bytes, more than the limit of {size - 1}"):
        read_regular_file(tree["image"], what="image", max_bytes=size - 1)
    sparse = tree["root"] / "huge.dcm"
    with open(sparse, "wb") as handle:  # 64 GiB on paper, nothing on disk: refused from its size
        handle.truncate(64 * 1024**3)
    with pytest.raises(ResourceError, match="more than the limit"):
        _in_thread(load_prompt_image, str(sparse), ImageOptions(image_size=16))


def test_prompt_images_follow_the_roots(tree):
    confined = ImageOptions(image_size=16, allow_local_files=False, allowed_roots=(tree["root"],))
    assert load_prompt_image(str(tree["image"]), confined).pixels.shape == (16, 16, 3)
    assert load_prompt_image("file://" + str(tree["image"]), confined).pixels.shape == (16, 16, 3)
    for source in (str(tree["outside"]), tree["outside"], str(tree["root"] / "link-out.png"), "file:///dev/zero"):
        with pytest.raises(AccessError, match="outside the allowed folders"):
            load_prompt_image(source, confined)
    closed = ImageOptions(image_size=16, allow_local_files=False)
    with pytest.raises(AccessError, match="local image paths are not allowed here"):
        load_prompt_image(str(tree["image"]), closed)
    with pytest.raises(UserError, match="never fetched"):
        load_prompt_image("https://example.org/x.png", confined)


def test_volume_paths_refuse_fifos(tree):
    from medgemma_gguf.runtime.sources import check_local_path

    with pytest.raises(InputError, match="not a regular file or folder"):
        check_local_path(tree["fifo"], what="volume", allow_local_files=False, allowed_roots=[tree["root"]])
    with pytest.raises(AccessError, match="outside the allowed folders"):
        check_local_path(tree["outside"], what="volume", allow_local_files=False, allowed_roots=[tree["root"]])
