"""``medgemma-gguf batch``: run many conversations from a JSONL file through one model, one JSONL line out each.

Input, one JSON object a line (blank lines skipped):

* ``id`` (optional, default ``line-N``): unique in the file; it names the output line, and a resumed run skips
  the ids already in the output;
* the conversation: ``messages`` (the shape ``chat()`` and the server take: text, ``image`` items with a
  ``path``/``url``, ``volume``, ``slide`` and ``longitudinal`` items) or ``prompt`` with optional ``image``
  (a path, or a list of paths; PNG, JPEG, DICOM, …) and ``system``;
* optional settings, each overriding the command's default: ``max_tokens``, ``temperature``, ``top_k``,
  ``top_p``, ``min_p``, ``repeat_penalty``, ``repeat_last_n``, ``presence_penalty``, ``frequency_penalty``,
  ``seed``, ``stop``, ``json_schema`` (the reply is constrained to it; parsed into ``json``), ``think``,
  ``preset``; ``meta``: anything, copied to the output line.

Relative paths are relative to the input file's folder.

Output, one line per input line, in input order: ``id``, ``line``, ``reply``, ``reasoning``, ``json`` (with
``json_schema``), ``finish_reason``, ``prompt_tokens``, ``completion_tokens``, ``reasoning_tokens``, ``seed``,
``input_sha256`` (of the input line's JSON, canonical), ``images`` (path and sha256 of each image file),
``meta``, ``timings``.

Reproducible and resumable: every line starts from an empty context (no prefix shared with the line before)
and samples with its own seed (its ``seed``, else one derived from ``--seed`` and its id), so a line's reply
does not depend on which lines ran before it: a run stopped and resumed writes the same lines as one that
was not stopped (``timings`` aside; with ``parallel`` > 1 see below). Each line is appended, flushed and
fsynced before the next starts (with ``parallel`` > 1, once it and the lines before it are done); a line a
kill cut short (no newline at the end of the output) is removed when the run resumes.

``parallel`` (``--parallel N``, default 1): up to N lines run at once in the slots of the server's
continuous-batching scheduler (``runtime.batching.Batcher``, in this process, no HTTP; the model is loaded
with ``n_parallel=N``, so the KV cache holds N × ``--ctx`` positions). Every setting works as with one
line at a time (images, volumes, ``json_schema``, ``think``, ``stop``, ``preset``: the slots are the
server's). The output stays in input order: a line that finishes early waits in memory until the lines
before it are written (at most ``LOOKAHEAD`` × N lines are started ahead of the first unwritten one), so
the output is always a prefix of the input order and resuming works as above. What batching changes:
each line still sees only its own prompt, but lines decoded together share batches, and the batch shape
changes the last bits of the logits (as in llama-server); a slot may also re-use the keys and values of a
prompt prefix it cached for an earlier line (the same tokens, kept only where llama.cpp can continue them,
``runtime.kv_reuse``), computed in other batches. So a greedy line's reply equals its
``parallel=1`` reply except after a position where the model's top two candidates are within rounding of
each other, and a seeded *sampled* line reproduces (across runs, and between a killed-and-resumed run and an
uninterrupted one) only with ``parallel=1``. The provenance record names the setting.

Bad input lines (invalid JSON, unknown fields, bad settings, a repeated id) are found before the model loads
and reported with their line numbers; lines that fail while running (an unreadable image, a prompt too long
for the context) are reported the same way. They are skipped, or with ``strict`` stop the run. Provenance
(tool, llama.cpp build, hardware, threads, the seed, input/model hashes) goes to ``OUT.provenance.json``,
one entry per run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgemma_gguf.errors import InputError, UserError, setting
from medgemma_gguf.runtime.context_settings import MAX_PARALLEL

log = logging.getLogger(__name__)

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
                   "presence_penalty", "frequency_penalty", "seed", "stop", "json_schema")
LINE_FIELDS = frozenset({"id", "messages", "prompt", "image", "system", "preset", "think", "meta", *SAMPLING_FIELDS})
PROVENANCE_SUFFIX = ".provenance.json"
LOOKAHEAD = 4  # with parallel=N, lines started ahead of the first unwritten one: at most LOOKAHEAD x N


@dataclass
class BatchLine:
    """One valid input line: where it is, its id, its messages and settings."""

    number: int
    id: str
    messages: list[dict[str, Any]]
    system: str | None
    preset: str | None
    think: bool
    sampling: dict[str, Any]
    meta: Any
    input_sha256: str
    image_paths: list[Path] = field(default_factory=list)


@dataclass
class BatchSummary:
    """What a run did: lines written now, lines already in the output, lines skipped (number, id, why)."""

    written: int = 0
    already_done: int = 0
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    out: Path | None = None
    provenance: Path | None = None
    lines_per_decode: float | None = None  # with parallel > 1: mean lines sharing a llama_decode


def line_seed(base_seed: int, line_id: str) -> int:
    """The seed of a line without its own: from ``--seed`` and the id (sha256), in [0, 2**31)."""
    digest = hashlib.sha256(f"{base_seed}:{line_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _resolve_paths(value: Any, base: Path, found: list[Path]) -> Any:
    """Content items with a relative ``path`` made absolute (against ``base``); image files collected."""
    if isinstance(value, list):
        return [_resolve_paths(v, base, found) for v in value]
    if not isinstance(value, Mapping):
        return value
    out = {}
    for key, item in value.items():
        if key == "path" and isinstance(item, str):
            path = Path(item).expanduser()
            path = path if path.is_absolute() else base / path
            if value.get("type") == "image" and path.is_file():
                found.append(path)
            out[key] = str(path)
        else:
            out[key] = _resolve_paths(item, base, found)
    return out


def parse_line(record: Any, number: int, base: Path, defaults: Mapping[str, Any], base_seed: int) -> BatchLine:
    """Check one input line (InputError naming the problem; the caller adds the line number)."""
    from medgemma_gguf.runtime.prompt import load_presets
    from medgemma_gguf.runtime.sampling import sampling_settings

    if not isinstance(record, dict):
        raise InputError("expected a JSON object with 'messages' or 'prompt'")
    unknown = sorted(set(record) - LINE_FIELDS)
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(sorted(LINE_FIELDS))}")
    line_id = record.get("id", f"line-{number}")
    if isinstance(line_id, bool) or not isinstance(line_id, str | int) or not str(line_id).strip():
        raise InputError("'id' must be a non-empty string or number")
    line_id = str(line_id)
    found: list[Path] = []
    if ("messages" in record) == ("prompt" in record):
        raise InputError("give either 'messages' or 'prompt' (with optional 'image' and 'system')")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise InputError("'system' must be a string")
    if "messages" in record:
        if "image" in record:
            raise InputError("'image' goes with 'prompt'; with 'messages' put image items in the user message")
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise InputError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
        messages = _resolve_paths(messages, base, found)
    else:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("'prompt' must be a non-empty string")
        images = record.get("image")
        images = [] if images is None else [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            raise InputError("'image' must be a path or a list of paths")
        content: list[dict[str, Any]] = [{"type": "image", "path": p} for p in images]
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": _resolve_paths(content, base, found)}]
    for path in found:
        if not path.is_file():
            raise InputError(f"image file {path} does not exist")
    missing = [str(p) for p in _all_paths(messages) if not Path(p).exists()]
    if missing:
        raise InputError(f"{missing[0]} does not exist; paths are relative to the input file's folder")
    preset = record.get("preset")
    if preset is not None and preset not in load_presets():
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(load_presets()))}")
    think = record.get("think", defaults.get("think", False))
    if not isinstance(think, bool):
        raise InputError("'think' must be true or false")
    sampling = {name: defaults.get(name) for name in SAMPLING_FIELDS}
    sampling.update({name: record[name] for name in SAMPLING_FIELDS if name in record})
    if sampling.get("seed") is None:
        sampling["seed"] = line_seed(base_seed, line_id)
    try:
        sampling_settings(**sampling)
    except UserError as exc:
        raise InputError(exc.for_http()) from exc
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return BatchLine(number=number, id=line_id, messages=messages, system=system if system is not None else
                     defaults.get("system"), preset=preset if preset is not None else defaults.get("preset"),
                     think=think, sampling=sampling, meta=record.get("meta"),
                     input_sha256=hashlib.sha256(canonical.encode()).hexdigest(), image_paths=found)


def _all_paths(value: Any) -> Iterator[str]:
    if isinstance(value, list):
        for item in value:
            yield from _all_paths(item)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key == "path" and isinstance(item, str):
                yield item
            else:
                yield from _all_paths(item)


def read_input(path: Path, defaults: Mapping[str, Any], base_seed: int) -> tuple[list[BatchLine],
                                                                                 list[tuple[int, str, str]]]:
    """Every input line checked: the good ones, and (line number, id, problem) of each bad one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file {path} not found; pass a JSONL file of conversations")
    good: list[BatchLine] = []
    bad: list[tuple[int, str, str]] = []
    seen: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} as UTF-8 text ({exc}); pass a JSONL file of conversations") from exc
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            bad.append((number, "", f"not valid JSON ({exc.msg})"))
            continue
        try:
            line = parse_line(record, number, path.parent.resolve(), defaults, base_seed)
        except UserError as exc:
            given = record.get("id", "") if isinstance(record, dict) else ""
            bad.append((number, str(given), str(exc)))
            continue
        if line.id in seen:
            bad.append((number, line.id, f"id {line.id!r} repeats line {seen[line.id]}; ids must be unique"))
            continue
        seen[line.id] = number
        good.append(line)
    if not good and not bad:
        raise UserError(f"{path} holds no lines; give one conversation a line")
    return good, bad


def done_ids(out: Path) -> set[str]:
    """The ids already in the output; a last line cut short by a kill is removed (nothing else is changed)."""
    out = Path(out)
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data.rfind(b"\n") + 1  # a line without its newline was being written when the run stopped
    if keep < len(data):
        log.warning("%s: removing an incomplete last line (%d bytes) left by a stopped run", out, len(data) - keep)
        with open(out, "r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
    ids = set()
    for number, text in enumerate(data[:keep].decode("utf-8", errors="replace").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            ids.add(str(json.loads(text)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{out} line {number} is not a batch output line; pass another --out, or --force to "
                            "start it over") from exc
    return ids


def _sha256(path: Path) -> str:
    from medgemma_gguf.hashing import sha256_of

    return sha256_of(path)


def check_parallel(parallel: Any) -> int:
    """``parallel`` checked: a whole number of slots from 1 to llama.cpp's sequence limit (InputError)."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= MAX_PARALLEL:
        raise InputError(f"{setting('batch_parallel')} must be a whole number from 1 (one line at a time, the "
                         f"default) to {MAX_PARALLEL}, got {parallel!r}")
    return parallel


def run_line(chat_model: Any, line: BatchLine, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Generate one line's reply from an empty context; the output record. ``should_stop``: polled while the
    reply runs in a server slot; True cancels it (the run is stopping)."""
    from medgemma_gguf.runtime.sampling import sampling_settings

    settings = sampling_settings(**line.sampling)
    chat_model.reset()  # no prefix shared with the line before: the reply depends on this line only
    prompt = chat_model.prompt(line.messages, system=line.system, preset=line.preset, think=line.think)
    result = chat_model.generate(prompt, settings, should_stop=should_stop).collect()
    record: dict[str, Any] = {"id": line.id, "line": line.number, "reply": result.text, "reasoning": result.reasoning}
    if line.sampling.get("json_schema") is not None:
        try:
            record["json"] = json.loads(result.text)
        except json.JSONDecodeError:
            record["json"] = None  # the reply ran to max_tokens before the JSON was complete
    record.update(finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
                  completion_tokens=result.completion_tokens, reasoning_tokens=result.reasoning_tokens,
                  seed=line.sampling["seed"], input_sha256=line.input_sha256,
                  images=[{"path": str(p), "sha256": _sha256(p)} for p in line.image_paths])
    if line.meta is not None:
        record["meta"] = line.meta
    record["timings"] = result.timings
    return record


def write_provenance(path: Path, record: dict[str, Any]) -> None:
    from medgemma_gguf.atomic import atomic_output

    with atomic_output(path, force=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def run_batch(chat_model: Any, lines: Sequence[BatchLine], bad: Sequence[tuple[int, str, str]], out: Path, *,
              input_path: Path, base_seed: int, n_threads: int | None, strict: bool = False, progress: bool = True,
              echo: Callable[[str], None] = log.warning, parallel: int = 1) -> BatchSummary:
    """Run the lines not yet in ``out``, appending one output line each (module docstring). ``parallel`` > 1
    runs that many lines at once in server slots; ``chat_model`` must then be loaded with ``n_parallel`` >=
    ``parallel``."""
    from tqdm import tqdm

    from medgemma_gguf.provenance import collect_provenance, hash_input

    parallel = check_parallel(parallel)
    out = Path(out)
    provenance_path = Path(f"{out}{PROVENANCE_SUFFIX}")
    summary = BatchSummary(out=out, provenance=provenance_path, skipped=list(bad))
    done = done_ids(out)
    todo = [line for line in lines if line.id not in done]
    summary.already_done = len(lines) - len(todo)
    inputs = [hash_input("batch input", input_path), hash_input("model", chat_model.model_path)]
    if chat_model.mmproj_path is not None:
        inputs.append(hash_input("mmproj", chat_model.mmproj_path))
    run = collect_provenance(threads=n_threads, seeds={"batch": base_seed}, inputs=inputs).to_json()
    run.update(parallel=parallel, lines_already_done=summary.already_done, lines_written=0, finished=False)
    previous: dict[str, Any] = {}
    if provenance_path.is_file() and done:
        try:
            previous = json.loads(provenance_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = {}
    runs = [*(previous.get("runs") or []), run]
    document = {"output": str(out), "runs": runs}
    write_provenance(provenance_path, document)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(out, "a", encoding="utf-8") as handle, \
                tqdm(total=len(todo), desc="batch", unit="line", disable=not progress) as bar:

            def write(record: dict[str, Any]) -> None:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                summary.written += 1
                run["lines_written"] = summary.written

            def failed(line: BatchLine, exc: UserError) -> None:
                if strict:
                    raise UserError(f"line {line.number} (id {line.id}): {exc.for_cli()}") from exc
                echo(f"line {line.number} (id {line.id}): {exc.for_cli()}; skipped")
                summary.skipped.append((line.number, line.id, exc.for_cli()))

            if parallel == 1:
                for line in todo:
                    try:
                        record = run_line(chat_model, line)
                    except UserError as exc:
                        failed(line, exc)
                        bar.update(1)
                        continue
                    write(record)
                    bar.update(1)
            else:
                summary.lines_per_decode = _run_in_slots(chat_model, todo, parallel, write, failed, bar.update)
        run["finished"] = True
    finally:
        run["lines_skipped"] = [{"line": n, "id": i, "error": e} for n, i, e in summary.skipped]
        if summary.lines_per_decode is not None:
            run["lines_per_decode"] = round(summary.lines_per_decode, 3)
        write_provenance(provenance_path, document)
    return summary


def _run_in_slots(chat_model: Any, todo: Sequence[BatchLine], parallel: int,
                  write: Callable[[dict[str, Any]], None], failed: Callable[[BatchLine, UserError], None],
                  finished: Callable[[int], object]) -> float | None:
    """``todo`` through ``parallel`` slots of a ``Batcher`` over ``chat_model``: one thread per slot builds a
    line's prompt and waits for its reply; the results are handed to ``write``/``failed`` in input order. Returns
    the mean number of lines per ``llama_decode`` (how much the slots were shared)."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    from medgemma_gguf.runtime.batching import Batcher

    batcher = Batcher(chat_model, n_slots=parallel, queue_size=0)
    stats = batcher.stats
    stopping = threading.Event()  # an error, --strict or Ctrl-C: the replies still running are cancelled
    results: dict[int, dict[str, Any] | UserError] = {}
    running: dict[Future[dict[str, Any]], int] = {}
    started = written = 0
    try:
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="medgemma-batch") as pool:
            try:
                while written < len(todo):
                    while (started < len(todo) and len(running) < parallel
                           and started - written < LOOKAHEAD * parallel):
                        running[pool.submit(run_line, chat_model, todo[started], stopping.is_set)] = started
                        started += 1
                    ready, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in ready:
                        index = running.pop(future)
                        try:
                            results[index] = future.result()
                        except UserError as exc:
                            results[index] = exc
                        finished(1)
                    while written in results:  # input order: what finished early waits for the lines before it
                        result = results.pop(written)
                        line = todo[written]
                        written += 1
                        if isinstance(result, UserError):
                            failed(line, result)
                        else:
                            write(result)
            finally:
                stopping.set()
    finally:
        batcher.close()
    return stats.busy_slots_per_decode / stats.n_decode if stats.n_decode else None
