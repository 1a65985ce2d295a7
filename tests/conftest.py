"""Shared, session-cached fixtures: tiny checkpoints (built once per variant) and their conversions.

Test tiers (``pytest -m unit`` etc.): ``e2e`` — whole commands end to end (minutes); ``integration`` — tiny
models through llama.cpp or transformers; ``unit`` — everything else (seconds, no model). A test marked
with a tier keeps it; otherwise a test is ``integration`` when it uses one of ``MODEL_FIXTURES`` (directly
or through another fixture), else ``unit``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "integration", "e2e")
MODEL_FIXTURES = {"tiny_checkpoint", "converted", "hf_model", "calibration_subset", "peft_adapter"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.e2e)
        elif MODEL_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _offline_mode_ends_with_its_test():
    """A test that turns offline mode on in this process (``serve`` in-process, ``--offline``) leaves it on for
    itself only."""
    yield
    import sys

    privacy = sys.modules.get("medgemma_gguf.privacy")
    if privacy is not None:
        privacy.disable_offline()
        privacy.set_content_logging(False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(variant) -> Path``: a tiny Gemma 3 checkpoint folder, built once per session."""
    from medgemma_gguf.fixtures.tiny_checkpoint import build_tiny_checkpoint

    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in built:
            built[variant] = build_tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt-{variant}"), variant)
        return built[variant]

    return get


@pytest.fixture(scope="session")
def converted(tmp_path_factory, tiny_checkpoint):
    """``converted(variant, outtype, mmproj_type) -> ConvertResult``, converted once per combination."""
    from medgemma_gguf.convert.converter import convert_checkpoint

    done: dict[tuple[str, str, str], object] = {}

    def get(variant: str, outtype: str = "f32", mmproj_type: str = "f32"):
        key = (variant, outtype, mmproj_type)
        if key not in done:
            outdir = tmp_path_factory.mktemp(f"gguf-{variant}-{outtype}-{mmproj_type}")
            done[key] = convert_checkpoint(str(tiny_checkpoint(variant)), outdir, outtype=outtype,
                                           mmproj_type=mmproj_type, progress=False)
        return done[key]

    return get


@pytest.fixture(scope="session")
def imatrix_folder(converted, calibration_subset):
    """``imatrix_folder(root, items, variant="mm-k256", n_threads=1) -> dict``: a copy of the converted variant
    in ``root/out`` with an importance matrix (``imatrix.gguf``) on those calibration items; the dict holds
    ``folder``, ``source``, ``mmproj``, ``imatrix`` and ``calibration`` (the subset's JSONL)."""
    import shutil

    from medgemma_gguf.convert.quantize.imatrix import compute_imatrix, write_imatrix_gguf

    def make(root: Path, items, variant: str = "mm-k256", n_threads: int = 1) -> dict:
        result = converted(variant)
        folder = Path(shutil.copytree(result.manifest_path.parent, root / "out"))
        calibration = calibration_subset(items)
        source, mmproj = folder / result.text_path.name, folder / result.mmproj_path.name
        imatrix = write_imatrix_gguf(compute_imatrix(source, mmproj, calibration=calibration, progress=False,
                                                     n_threads=n_threads), folder / "imatrix.gguf")
        return {"folder": folder, "source": source, "mmproj": mmproj, "imatrix": imatrix, "calibration": calibration}

    return make


@pytest.fixture(scope="module")
def files(converted, request):
    """The test module's ``VARIANT``, converted (F32 text model and mmproj)."""
    return converted(request.module.VARIANT)


@pytest.fixture(scope="module")
def chat_model(files):
    """A ``ChatModel`` of the module's converted text model and mmproj: 1024 positions, one thread, CPU."""
    from medgemma_gguf.runtime import load

    model = load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=1024, n_threads=1)
    yield model
    model.close()


@pytest.fixture(scope="module")
def text_model(files):
    """A ``ChatModel`` of the module's converted text model alone (no mmproj): 512 positions, one thread, CPU."""
    from medgemma_gguf.runtime import load

    model = load(files.text_path, n_gpu_layers=0, n_ctx=512, n_threads=1)
    yield model
    model.close()


@pytest.fixture(scope="session")
def peft_adapter(tmp_path_factory, tiny_checkpoint):
    """``peft_adapter(variant, **options) -> Path``: a LoRA adapter saved by ``peft`` for a tiny checkpoint, with
    random A and B (``support.make_peft_adapter``), built once per variant and options."""
    from support import make_peft_adapter

    built: dict[str, Path] = {}

    def get(variant: str, **options) -> Path:
        key = repr((variant, sorted(options.items())))
        if key not in built:
            built[key] = make_peft_adapter(tiny_checkpoint(variant), tmp_path_factory.mktemp("adapter") / "adapter",
                                           **options)
        return built[key]

    return get


@pytest.fixture(scope="session")
def hf_model():
    """``hf_model(folder) -> transformers model`` in float32, eager attention, cached per folder (loaded as
    ``medgemma-gguf check`` loads its reference: ``quant_eval.equivalence.load_transformers``)."""
    from medgemma_gguf.quant_eval.equivalence import load_transformers

    cache: dict[Path, object] = {}

    def get(folder: Path):
        if folder not in cache:
            cache[folder] = load_transformers(folder, "f32")
        return cache[folder]

    return get


@pytest.fixture(scope="session")
def calibration_subset(tmp_path_factory):
    """``calibration_subset(ids) -> Path``: a JSONL with those items of the bundled calibration set, line for line."""
    import json

    from medgemma_gguf.convert.quantize.calibration import DEFAULT_PATH

    lines = {json.loads(line)["id"]: line for line in DEFAULT_PATH.read_text(encoding="utf-8").splitlines()}

    def get(ids) -> Path:
        path = tmp_path_factory.mktemp("calib") / "subset.jsonl"
        path.write_text("".join(lines[item] + "\n" for item in ids), encoding="utf-8")
        return path

    return get
