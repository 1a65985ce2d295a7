"""``medgemma-gguf batch``: many conversations from a JSONL file, one output line each; bad lines reported by
number and skipped (or ``--strict``); resumable and kill-safe: a run killed and resumed writes the same
file as one that was not (timings aside); provenance beside the output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medgemma_gguf import cli
from medgemma_gguf.runtime.batch import line_seed, read_input

VARIANT = "mm-k256"
SCHEMA = {"type": "object", "properties": {"finding": {"enum": ["normal", "abnormal"]}}, "required": ["finding"],
          "additionalProperties": False}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEMMA_GGUF_CACHE", str(tmp_path / "cache"))  # file hashes of the provenance record


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(text) for text in path.read_text(encoding="utf-8").splitlines()]


def _without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timings"} for r in records]


@pytest.fixture
def workload(tmp_path):
    """An input file with text, image (relative path), messages, sampled and schema-constrained lines."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), (120, 60, 200)).save(tmp_path / "img" / "a.png")
    records = [
        {"id": "t1", "prompt": "What is the normal adult resting heart rate?"},
        {"id": "i1", "prompt": "Describe this image.", "image": "img/a.png", "meta": {"study": 7}},
        {"id": "m1", "messages": [{"role": "user", "content": [{"type": "image", "path": "img/a.png"},
                                                                {"type": "text", "text": "Any fracture?"}]}]},
        {"id": "s1", "prompt": "Name a bone.", "temperature": 0.9},
        {"id": "s2", "prompt": "Name a bone.", "temperature": 0.9, "seed": 1234},
        {"id": "j1", "prompt": "Classify.", "json_schema": SCHEMA, "max_tokens": 24},
        {"id": "t2", "prompt": "And the respiratory rate?", "system": "Answer briefly."},
    ]
    return _write(tmp_path / "in.jsonl", records)


# --- input checks, no model --------------------------------------------------------------------------------


@pytest.mark.unit
def test_bad_lines_are_named_by_number(tmp_path):
    path = _write(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "ok"},
        "{not json",
        {"id": "b", "prompt": "x", "temprature": 1},
        {"id": "c", "prompt": "x", "messages": []},
        {"id": "d", "prompt": "x", "temperature": -1},
        {"id": "a", "prompt": "again"},
        {"id": "e", "prompt": "x", "image": "missing.png"},
        {"prompt": "no id", "max_tokens": 0},
        {"id": "f", "prompt": "x", "json_schema": {"type": "nonsense"}},
        {"prompt": "fine, default id"},
    ])
    good, bad = read_input(path, {"max_tokens": 16}, 0)
    assert [(line.id, line.number) for line in good] == [("a", 1), ("line-10", 10)]
    problems = {number: problem for number, _, problem in bad}
    assert sorted(problems) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert problems[2].startswith("not valid JSON")
    assert "unknown field(s) temprature" in problems[3]
    assert "either 'messages' or 'prompt'" in problems[4]
    assert "'temperature'" in problems[5]  # worded as the line's field, not a command-line flag
    assert "repeats line 1" in problems[6]
    assert "missing.png does not exist" in problems[7]
    assert "'max_tokens'" in problems[8]
    assert "schema" in problems[9].lower()
    # seeds: the line's own, else derived from --seed and the id (stable across runs and machines)
    assert good[0].sampling["seed"] == line_seed(0, "a") != line_seed(1, "a")
    assert line_seed(0, "a") == line_seed(0, "a") and 0 <= line_seed(5, "x") < 2**31


@pytest.mark.unit
def test_strict_refuses_before_loading_the_model(tmp_path, capsys):
    path = _write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "ok"}, {"id": "b", "prompt": "x", "top_p": 3}])
    code = cli.main(["batch", str(tmp_path / "no-model.gguf"), str(path), "--out", str(tmp_path / "o.jsonl"),
                     "--strict"])
    err = capsys.readouterr().err
    assert code == 2 and "line 2 (id b)" in err and "'top_p'" in err and "drop --strict" in err
    assert not (tmp_path / "o.jsonl").exists()
    code = cli.main(["batch", str(tmp_path / "no-model.gguf"), str(path), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "line 2 (id b)" in err and "skipped" in err and "not found" in err


# --- with the tiny model -------------------------------------------------------------------------------


def _batch_args(converted, workload, out, *extra):
    files = converted(VARIANT)
    return ["batch", str(files.text_path), str(workload), "--out", str(out), "--threads", "1", "--max-tokens", "12",
            "--ctx", "1024", "--n-gpu-layers", "0", "-q", *extra]


def test_batch_writes_one_line_per_input_and_resumes_after_a_cut(converted, workload, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert cli.main(_batch_args(converted, workload, out)) == 0
    full = _lines(out)
    assert [r["id"] for r in full] == ["t1", "i1", "m1", "s1", "s2", "j1", "t2"]
    assert [r["line"] for r in full] == [1, 2, 3, 4, 5, 6, 7]
    for record in full:
        assert record["completion_tokens"] >= 1 and record["prompt_tokens"] > 0
        assert record["finish_reason"] in ("stop", "length") and isinstance(record["reply"], str)
        assert record["timings"]["prompt_ms"] > 0 and len(record["input_sha256"]) == 64
    by_id = {r["id"]: r for r in full}
    assert by_id["i1"]["prompt_tokens"] > by_id["t1"]["prompt_tokens"]  # a shorter question, plus the image
    assert by_id["i1"]["images"][0]["path"] == str(workload.parent / "img" / "a.png")
    assert by_id["i1"]["meta"] == {"study": 7} and by_id["s2"]["seed"] == 1234
    assert by_id["s1"]["seed"] == line_seed(0, "s1")
    assert "json" in by_id["j1"] and (by_id["j1"]["json"] is None or by_id["j1"]["json"]["finding"] in
                                      ("normal", "abnormal"))
    provenance = json.loads((tmp_path / "out.jsonl.provenance.json").read_text())
    (run,) = provenance["runs"]
    assert run["finished"] and run["lines_written"] == 7 and run["threads"] == 1 and run["seeds"] == {"batch": 0}
    roles = {i["role"]: i for i in run["inputs"]}
    assert set(roles) == {"batch input", "model", "mmproj"} and roles["model"]["path"] == str(
        converted(VARIANT).text_path)

    # a run stopped mid-write: two lines done, the third cut short; resuming completes the same file
    cut = tmp_path / "cut.jsonl"
    text = out.read_text(encoding="utf-8").splitlines(keepends=True)
    cut.write_text(text[0] + text[1] + text[2][: len(text[2]) // 2], encoding="utf-8")
    capsys.readouterr()
    assert cli.main(_batch_args(converted, workload, cut)) == 0
    assert "resuming" in capsys.readouterr().err
    resumed = _lines(cut)
    assert _without_timings(resumed) == _without_timings(full)
    assert resumed[:2] == full[:2]  # the finished lines were kept as written
    runs = json.loads((tmp_path / "cut.jsonl.provenance.json").read_text())["runs"]
    assert [r["lines_already_done"] for r in runs] == [2] and runs[0]["lines_written"] == 5
    # nothing left to do: a third run writes nothing; --force starts over
    assert cli.main(_batch_args(converted, workload, cut)) == 0
    assert _lines(cut) == resumed
    assert cli.main(_batch_args(converted, workload, cut, "--force")) == 0
    assert _without_timings(_lines(cut)) == _without_timings(full)


@pytest.mark.parametrize("parallel", ["1", "3"])
def test_failing_lines_are_skipped_or_stop_with_strict(converted, tmp_path, capsys, parallel):
    path = _write(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "Hello"},
        {"id": "long", "prompt": "word " * 3000},  # more than the context holds: fails while running
        {"id": "b", "prompt": "Bye", "nonsense": 1},  # refused up front
        {"id": "c", "prompt": "Again"},
    ])
    out = tmp_path / "out.jsonl"
    args = _batch_args(converted, path, out, "--parallel", parallel)
    assert cli.main(args) == 1  # lines were skipped
    err = capsys.readouterr().err
    assert "line 3 (id b): unknown field(s) nonsense" in err and "line 2 (id long)" in err and "--ctx" in err
    assert [r["id"] for r in _lines(out)] == ["a", "c"]
    out.unlink()
    path = _write(tmp_path / "in2.jsonl", [{"id": "a", "prompt": "Hello"}, {"id": "long", "prompt": "word " * 3000},
                                           {"id": "c", "prompt": "Again"}])
    assert cli.main(_batch_args(converted, path, out, "--strict", "--parallel", parallel)) == 2
    assert "line 2 (id long)" in capsys.readouterr().err
    assert [r["id"] for r in _lines(out)] == ["a"]  # what was done before the stop stays (not what came after)


@pytest.mark.e2e
def test_a_killed_batch_resumes_to_the_same_file(converted, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 90)).save(tmp_path / "x.png")
    records = [{"id": f"q{i}", "prompt": f"Question number {i}?", **({"image": "x.png"} if i % 3 == 0 else {}),
                **({"temperature": 0.7} if i % 2 else {})} for i in range(16)]
    workload = _write(tmp_path / "in.jsonl", records)
    reference = tmp_path / "reference.jsonl"
    assert cli.main(_batch_args(converted, workload, reference)) == 0
    out = tmp_path / "killed.jsonl"
    command = [sys.executable, "-m", "medgemma_gguf.cli", *_batch_args(converted, workload, out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    written = out.read_bytes().count(b"\n")
    assert written >= 2
    assert cli.main(_batch_args(converted, workload, out)) == 0
    assert _without_timings(_lines(out)) == _without_timings(_lines(reference))


# --- --parallel N: lines in the server's slots ------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("value", ["0", "-2", "257"])
def test_bad_parallel_values_are_refused_naming_the_flag(tmp_path, capsys, value):
    path = _write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "ok"}])
    code = cli.main(["batch", str(tmp_path / "no-model.gguf"), str(path), "--out", str(tmp_path / "o.jsonl"),
                     "--parallel", value])
    err = capsys.readouterr().err
    assert code == 2 and "--parallel" in err and f"got {value}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.unit
@pytest.mark.parametrize("value", [0, 300, True, 2.0])
def test_bad_parallel_values_are_refused_in_python(tmp_path, value):
    from medgemma_gguf.errors import InputError
    from medgemma_gguf.runtime.batch import run_batch

    with pytest.raises(InputError, match=r"^parallel must be a whole number from 1"):
        run_batch(None, [], [], tmp_path / "o.jsonl", input_path=tmp_path / "in.jsonl", base_seed=0, n_threads=1,
                  parallel=value)
    assert not (tmp_path / "o.jsonl").exists()


def _solo_tokens(model, line, tie: float = 1e-3) -> tuple[list[int], int]:
    """A line's greedy reply run alone in a slot with its top-two log-probabilities: its tokens, and how many
    come before the first position whose top two candidates are within ``tie``."""
    import queue

    from medgemma_gguf.runtime.batching import Batcher, Job
    from medgemma_gguf.runtime.sampling import sampling_settings

    settings = sampling_settings(**line.sampling)
    prompt = model.prompt(line.messages, system=line.system, preset=line.preset, think=line.think)
    sampler = model.engine.new_sampler(settings.resolve(model.sampling_defaults), reasoning=model.reasoning_markers)
    events: queue.SimpleQueue = queue.SimpleQueue()
    batcher = Batcher(model, n_slots=1)
    try:
        batcher.submit(Job(prompt, settings, sampler, lambda kind, value: events.put((kind, value)), top_logprobs=2))
        tokens, clear = [], None
        while True:
            kind, value = events.get(timeout=300)
            if kind == "token" and value.logprob is not None:
                top = value.logprob.top
                if clear is None and len(top) > 1 and top[0][2] - top[1][2] < tie:
                    clear = len(tokens)
                tokens.append(value.token)
            elif kind == "error":
                raise value
            elif kind == "done":
                return tokens, len(tokens) if clear is None else clear
    finally:
        batcher.close()


def _text_of(model, tokens: list[int]) -> str:
    from medgemma_gguf.runtime.reply import ReplyText

    reply = ReplyText(model.engine.piece, markers=model.reasoning_markers)
    for token in tokens:
        reply.push(token)
    return reply.text


def test_parallel_lines_come_in_input_order_and_greedy_replies_equal_the_solo_ones(converted, workload, tmp_path):
    from medgemma_gguf.runtime.chat import load

    extra = [{"id": "k1", "prompt": "Is this normal?", "think": True},  # the reasoning block is parsed per slot
             {"id": "p1", "prompt": "Describe.", "preset": "radiology", "stop": ["e"], "max_tokens": 8}]
    workload.write_text(workload.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    one, three = tmp_path / "one.jsonl", tmp_path / "three.jsonl"
    assert cli.main(_batch_args(converted, workload, one)) == 0
    assert cli.main(_batch_args(converted, workload, three, "--parallel", "3")) == 0
    solo, batched = _lines(one), _lines(three)
    assert [r["id"] for r in batched] == [r["id"] for r in solo] == ["t1", "i1", "m1", "s1", "s2", "j1", "t2", "k1",
                                                                     "p1"]
    for a, b in zip(solo, batched, strict=True):
        assert list(a) == list(b)  # the same fields, in the same order
        assert {k: a[k] for k in ("line", "prompt_tokens", "seed", "input_sha256", "images", "meta") if k in a} == \
            {k: b[k] for k in ("line", "prompt_tokens", "seed", "input_sha256", "images", "meta") if k in b}
        assert b["finish_reason"] in ("stop", "length") and b["completion_tokens"] >= 1
    j1 = batched[5]
    assert j1["json"] is None or j1["json"]["finding"] in ("normal", "abnormal")  # the schema held in a slot
    runs = [json.loads(Path(f"{p}.provenance.json").read_text())["runs"][0] for p in (one, three)]
    assert [r["parallel"] for r in runs] == [1, 3] and all(r["finished"] for r in runs)
    assert "lines_per_decode" not in runs[0] and runs[1]["lines_per_decode"] > 1  # lines shared decodes

    # greedy lines: equal up to the first near-tie of the solo run's top two logits
    lines, _ = read_input(workload, {"max_tokens": 12, "temperature": 0.0, "system": None, "think": False}, 0)
    by_id = {line.id: line for line in lines}
    compared = 0
    model = load(converted(VARIANT).text_path, n_ctx=1024, n_gpu_layers=0, n_threads=1)
    with model:
        for a, b in zip(solo, batched, strict=True):
            if a["id"] not in ("t1", "i1", "m1", "t2", "k1", "p1"):
                continue
            tokens, clear = _solo_tokens(model, by_id[a["id"]])
            compared += clear
            if a["id"] in ("k1", "p1"):  # reasoning split off, stop string: compared whole, when no near-tie
                if clear == len(tokens):
                    assert (a["reply"], a["reasoning"]) == (b["reply"], b["reasoning"]), a["id"]
            elif clear == len(tokens):
                assert a["reply"] == b["reply"] == _text_of(model, tokens), a["id"]
            else:
                prefix = _text_of(model, tokens[:clear])
                assert a["reply"].startswith(prefix) and b["reply"].startswith(prefix), a["id"]
    assert compared >= 12  # the near-tie rule left tokens to compare


@pytest.mark.e2e
def test_a_killed_parallel_batch_resumes_to_the_same_ids_in_order(converted, tmp_path):
    records = [{"id": f"q{i}", "prompt": f"Question number {i}?", **({"temperature": 0.7} if i % 2 else {})}
               for i in range(12)]
    workload = _write(tmp_path / "in.jsonl", records)
    reference = tmp_path / "reference.jsonl"
    assert cli.main(_batch_args(converted, workload, reference)) == 0
    out = tmp_path / "killed.jsonl"
    command = [sys.executable, "-m", "medgemma_gguf.cli", *_batch_args(converted, workload, out, "--parallel", "3")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    data = out.read_bytes()
    killed = [json.loads(text) for text in data[:data.rfind(b"\n") + 1].decode().splitlines()]  # complete lines
    assert killed and [r["id"] for r in killed] == [r["id"] for r in records[:len(killed)]]  # a prefix, in order
    assert cli.main(_batch_args(converted, workload, out, "--parallel", "3")) == 0
    resumed, full = _lines(out), _lines(reference)
    assert [r["id"] for r in resumed] == [r["id"] for r in full] and [r["line"] for r in resumed] == list(range(1, 13))
    assert [r["seed"] for r in resumed] == [r["seed"] for r in full]
    assert resumed[:len(killed)] == killed  # the lines written before the kill were kept as they were
