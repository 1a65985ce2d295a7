"""This project's KL evaluation against llama.cpp's own ``llama-perplexity --kl-divergence``, on the same text
and the same scored positions: mean KL agreement, time and cache size ratios, and the KL bracket per ε.

Baseline: ``llama-perplexity`` built from the llama.cpp source vendored in the llama-cpp-python sdist (the
same llama.cpp the installed wheel runs), once, into ``<cache root>/llama-tools/`` — or ``--llama-perplexity
PATH``. It writes the reference as ``--kl-divergence-base`` (uint16 log-probabilities of every token at every
scored position) and scores each quant with ``--kl-divergence``. Ours: the reference cache by coverage
(``--coverage``, default 1e-4) or ``--full-vocab``, then ``evaluate_candidate`` for each quant, scoring
exactly llama-perplexity's positions (``reference.llama_perplexity_chunks`` on the tokens read back from the
base file: chunks of ``--ctx``, BOS first, the second half scored).

Model (default): the trained fixture (Gemma 3 layout, trained 300 steps, peaked next-token distributions),
widened to MedGemma's 262,208-row vocabulary (``--vocab``): the 261,120 added rows are copies of the fixture's
64 untrained padding rows (which training pushed to low logits) plus small noise, so each position gets
MedGemma's output width with a long low-probability tail. ``--vocab 0`` keeps the fixture's 1,088 rows.
Or bring your own: ``--reference REF.gguf --quant Q.gguf ... --text FILE``.

    .venv/bin/python bench/bench_eval_vs_llama.py --workdir /tmp/evl --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VENDOR = Path("/work/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp")
PORTABLE = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
            "-DGGML_BMI2=ON"]
QUANT_FTYPES = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q4_K_S": 14, "Q3_K_M": 12, "Q2_K": 10}
MEDGEMMA_VOCAB = 262208


# ---------------------------------------------------------------------------------------------- llama.cpp


def build_llama_tool(target: str, vendor: Path = VENDOR, jobs: int = 2) -> Path:
    """A llama.cpp tool (``llama-perplexity``, ``llama-server``, ...) built once from ``vendor`` into
    ``<cache root>/llama-tools/llama-cpp-python-<version>/bin`` (configured like scripts/setup.sh's wheel:
    portable x86-64-v3; the server without its web UI, which would be downloaded)."""
    import llama_cpp

    from medgemma_gguf.cache import cache_root

    build = cache_root() / "llama-tools" / f"llama-cpp-python-{llama_cpp.__version__}"
    binary = build / "bin" / target
    if binary.is_file():
        return binary
    if not (vendor / "tools" / "perplexity").is_dir():
        sys.exit(f"error: {vendor} is not llama.cpp's source; pass --vendor (the sdist's vendor/llama.cpp) or "
                 f"the {target} binary")
    print(f"building {target} from {vendor} into {build} (once; ~10 min on 2 cores)", flush=True)
    subprocess.run(["cmake", "-S", str(vendor), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    *PORTABLE, "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
                    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", target, "-j", str(jobs)], check=True,
                   stdout=subprocess.DEVNULL)
    return binary


def build_llama_perplexity(vendor: Path, jobs: int) -> Path:
    """``llama-perplexity`` (see ``build_llama_tool``)."""
    return build_llama_tool("llama-perplexity", vendor, jobs)


STAT_LINES = {"mean": r"Mean\s+KLD:\s+([-\d.e+]+)\s+±\s+([-\d.e+]+)", "max": r"Maximum KLD:\s+([-\d.e+]+)",
              "p999": r"99\.9%\s+KLD:\s+([-\d.e+]+)", "p99": r"99\.0%\s+KLD:\s+([-\d.e+]+)",
              "p95": r"95\.0%\s+KLD:\s+([-\d.e+]+)", "p90": r"90\.0%\s+KLD:\s+([-\d.e+]+)",
              "median": r"Median\s+KLD:\s+([-\d.e+]+)", "rms_dp": r"RMS Δp\s+:\s+([-\d.e+]+)\s+±\s+([-\d.e+]+)\s+%",
              "same_top": r"Same top p:\s+([-\d.e+]+)\s+±\s+([-\d.e+]+)\s+%",
              "ln_ppl_ratio": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s+:\s+([-\d.e+]+)"}


def parse_kld_output(text: str) -> dict[str, float]:
    """The final statistics llama-perplexity prints (KLD in nats, Δp and same top as fractions)."""
    out = {}
    for key, pattern in STAT_LINES.items():
        match = re.search(pattern, text)
        if match is None:
            raise RuntimeError(f"llama-perplexity printed no {key!r} line; its output ends:\n{text[-2000:]}")
        value = float(match.group(1))
        out[key] = value / 100 if key in ("rms_dp", "same_top") else value
        if key == "mean":
            out["mean_stderr"] = float(match.group(2))
    return out


EXIT_DELAY_C = """
#include <unistd.h>
/* llama.cpp leaks its asynchronous logger at exit on purpose (common_log_main, llama.cpp issue 22142): the
   lines queued last -- llama-perplexity's statistics -- are lost when the logger thread is not scheduled before
   the process ends, which happens on a busy machine. Preloaded, this gives it 0.3 s while exit() runs. */
__attribute__((destructor)) static void medgemma_gguf_let_the_logger_flush(void) { usleep(300000); }
"""


def exit_delay_library(binary: Path) -> Path:
    """A tiny preload library that lets llama.cpp's logger write its last lines (see ``EXIT_DELAY_C``)."""
    library = binary.parent / "let-logger-flush.so"
    if not library.is_file():
        source = binary.parent / "let-logger-flush.c"
        source.write_text(EXIT_DELAY_C)
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source)], check=True)
    return library


def run_timed(cmd: list[str], log_file: Path, needs: str | None = None) -> tuple[float, str]:
    """Run a llama.cpp tool, timed (the 0.3 s exit delay subtracted); its log is read back from ``--log-file``."""
    log_file.unlink(missing_ok=True)
    env = {**os.environ, "GGML_NO_BACKTRACE": "1", "LD_PRELOAD": str(exit_delay_library(Path(cmd[0])))}
    start = time.perf_counter()
    done = subprocess.run([*cmd, "--log-file", str(log_file)], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start - 0.3
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} … failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    text = log_file.read_text(encoding="utf-8", errors="replace")
    if needs is not None and needs not in text:
        raise RuntimeError(f"{' '.join(cmd[:3])} … printed no {needs!r}; its log ends:\n{text[-2000:]}")
    return seconds, text


def read_base_tokens(path: Path) -> tuple[int, int, list[int]]:
    """``(n_ctx, n_vocab, tokens)`` from a ``--kl-divergence-base`` file's header (perplexity.cpp's layout)."""
    with open(path, "rb") as handle:
        if handle.read(8) != b"_logits_":
            raise RuntimeError(f"{path} is not a llama-perplexity base file")
        n_ctx, n_vocab, n_chunk = np.frombuffer(handle.read(12), dtype="<u4").astype(int)
        tokens = np.frombuffer(handle.read(4 * n_chunk * n_ctx), dtype="<i4")
    return int(n_ctx), int(n_vocab), tokens.astype(int).tolist()


# ---------------------------------------------------------------------------------------------- the model


def widen_checkpoint(source: Path, target: Path, vocab: int, seed: int = 0) -> None:
    """``source`` with its tied embedding widened to ``vocab`` rows: copies of its padding rows plus noise."""
    import torch
    from safetensors.torch import load_file, save_file

    from medgemma_gguf.fixtures.tiny_checkpoint import SP_VOCAB_SIZE

    if (target / "config.json").is_file():
        return
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    config = json.loads((partial / "config.json").read_text())
    text_config = config.get("text_config", config)
    rows = int(text_config["vocab_size"])
    generator = torch.Generator().manual_seed(seed)
    for shard in sorted(partial.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name, tensor in tensors.items():
            if name.endswith("embed_tokens.weight"):
                base = tensor.float()
                padding = base[SP_VOCAB_SIZE + 1 :]  # rows never seen in training (after the image soft token)
                picks = torch.randint(0, padding.shape[0], (vocab - rows,), generator=generator)
                noise = torch.randn(vocab - rows, base.shape[1], generator=generator) * padding.std() * 0.25
                tensors[name] = torch.cat([base, padding[picks] + noise]).to(tensor.dtype).contiguous()
        save_file(tensors, str(shard), metadata={"format": "pt"})
    index = partial / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data.get("metadata", {}).pop("total_size", None)
        index.write_text(json.dumps(data, indent=2))
    text_config["vocab_size"] = vocab
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    partial.rename(target)


def fixture_models(workdir: Path, vocab: int, quants: list[str], threads: int) -> tuple[Path, list[Path]]:
    """The F32 reference GGUF and its quants, built once under ``workdir``."""
    import ctypes

    import llama_cpp

    from medgemma_gguf.convert.converter import convert_checkpoint
    from medgemma_gguf.fixtures.trained_fixture import build_trained_fixture

    trained = workdir / "trained"
    if not (trained / "config.json").is_file():
        print("training the fixture (once; ~3-6 min on 2 cores)", flush=True)
        build_trained_fixture(trained)
    checkpoint = trained
    if vocab:
        checkpoint = workdir / f"trained-vocab{vocab}"
        widen_checkpoint(trained, checkpoint, vocab)
    gguf_dir = workdir / f"gguf-{checkpoint.name}"
    if not (gguf_dir / "manifest.json").is_file():
        convert_checkpoint(str(checkpoint), gguf_dir, outtype="f32", mmproj_type="f16", force=True, progress=False)
    reference = next(p for p in gguf_dir.glob("*-F32.gguf") if not p.name.startswith("mmproj"))
    paths = []
    for name in quants:
        target = gguf_dir / reference.name.replace("-F32.gguf", f"-{name}.gguf")
        if not target.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = QUANT_FTYPES[name]
            params.nthread = threads
            status = llama_cpp.llama_model_quantize(str(reference).encode(), str(target).encode(),
                                                    ctypes.byref(params))
            if status != 0:
                sys.exit(f"error: llama.cpp could not quantize {reference.name} to {name}")
        paths.append(target)
    return reference, paths


def default_text(path: Path) -> Path:
    """The bundled held-out prose, then the fixture corpora, as one text file (about 12k tokens)."""
    from medgemma_gguf.quant_eval.slices import load_heldout_text

    corpora = [REPO / "fixtures" / "tiny_corpus.txt", REPO / "fixtures" / "trained_fixture_data" / "extra_corpus.txt"]
    text = "\n\n".join([c.text for c in load_heldout_text()] + [p.read_text(encoding="utf-8") for p in corpora])
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- ours


def our_reference(reference_path: Path, tokens: list[int], n_ctx: int, cache_dir: Path, threads: int,
                  coverage: float | None, full_vocab: bool):
    """The reference part for llama-perplexity's positions, computed (and timed) into a fresh cache."""
    from medgemma_gguf.quant_eval.reference import (
        CoverageSpec,
        GGUFReference,
        ReferenceCache,
        llama_perplexity_chunks,
        token_stream_hash,
    )

    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = ReferenceCache(cache_dir)
    reference = GGUFReference(str(reference_path), cache.cache_dir, n_threads=threads)
    spec = CoverageSpec.make(coverage, full_vocab)
    start = time.perf_counter()
    try:
        bos = reference.bos_token
        chunks = llama_perplexity_chunks(tokens, n_ctx, bos)
        part = cache.get(reference, name="llama-chunks", kind="text",
                         content_hash=token_stream_hash(tokens, n_ctx, bos), coverage=spec, sequences=chunks)
    finally:
        reference.close()
    return part, time.perf_counter() - start, reference.signature


def our_quant(part, quant: Path, signature, threads: int):
    from medgemma_gguf.quant_eval.evaluate import Candidate, evaluate_candidate

    start = time.perf_counter()
    row = evaluate_candidate(Candidate(quant), [part], {}, signature, 0, n_threads=threads, measure_speed=False)
    return row, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-eval-vs-llama"))
    parser.add_argument("--vocab", type=int, default=MEDGEMMA_VOCAB, help="widen the fixture to this vocabulary "
                        "(0: keep its 1088 rows)")
    parser.add_argument("--quants", default="Q8_0,Q4_K_M,Q3_K_M")
    parser.add_argument("--reference", type=Path, help="your own BF16/F32 reference GGUF (skips the fixture)")
    parser.add_argument("--quant", type=Path, action="append", default=[], help="your own quant (repeatable)")
    parser.add_argument("--text", type=Path, help="text to score (default: held-out prose + fixture corpora)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds of the quant pass (median reported)")
    parser.add_argument("--coverage", type=float, default=1e-4)
    parser.add_argument("--epsilons", default="1e-3,1e-5,1e-6", help="extra ε values for the bracket table")
    parser.add_argument("--full-vocab", action="store_true", help="also run ours with every logit stored")
    parser.add_argument("--vendor", type=Path, default=VENDOR)
    parser.add_argument("--llama-perplexity", type=Path)
    parser.add_argument("--jobs", type=int, default=2, help="build jobs for llama-perplexity")
    args = parser.parse_args()

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    binary = args.llama_perplexity or build_llama_perplexity(args.vendor, args.jobs)
    if args.reference:
        reference, quants = args.reference, list(args.quant)
    else:
        reference, quants = fixture_models(workdir, args.vocab, args.quants.split(","), args.threads)
    text = args.text or default_text(workdir / "text.txt")
    common = ["-c", str(args.ctx), "-b", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads)]

    base = workdir / "base.kld"
    base_s, _ = run_timed([str(binary), "-m", str(reference), "-f", str(text), *common,
                           "--kl-divergence-base", str(base)], workdir / "llama-base.log")
    n_ctx, n_vocab, tokens = read_base_tokens(base)
    scored = (n_ctx - 1 - n_ctx // 2) * (len(tokens) // n_ctx)
    print(f"reference {reference.name}: vocabulary {n_vocab}, {len(tokens) // n_ctx} chunks of {n_ctx}, "
          f"{scored} scored positions; llama-perplexity base pass {base_s:.1f} s, file {base.stat().st_size} B",
          flush=True)

    def reference_run(label: str, eps: float | None, full: bool) -> dict:
        part, seconds, signature = our_reference(reference, tokens, n_ctx, workdir / f"cache-{label}", args.threads,
                                                 eps, full)
        assert part.pos_seq.size == scored, (part.pos_seq.size, scored)
        dist = part.dist
        summary = {"eps": "every token" if dist.epsilon == 0 else f"{dist.epsilon:g}",
                   "mean_size": float(dist.set_sizes.mean()), "dense": dist.n_dense,
                   "bytes_per_position": part.file_bytes / part.pos_seq.size, "file_bytes": part.file_bytes}
        print(f"ours ({label}): reference pass {seconds:.1f} s, cache {part.file_bytes} B, "
              f"{summary['mean_size']:.1f} tokens a position, {dist.n_dense} of {dist.n_positions} positions stored "
              f"whole, max tail {dist.tail_mass.max():.2e}", flush=True)
        return {"part": part, "reference_s": seconds, "signature": signature, "rows": {}, "summary": summary}

    runs: dict[str, dict] = {"coverage": reference_run("coverage", args.coverage, False)}
    llama: dict[str, dict] = {}
    timing: dict[str, list[tuple[float, float]]] = {}
    for quant in quants:
        times = []
        for round_ in range(max(1, args.rounds)):
            llama_s, output = run_timed([str(binary), "-m", str(quant), *common, "--kl-divergence-base", str(base),
                                         "--kl-divergence"], workdir / f"llama-{quant.stem}.log",
                                        needs="Same top p:")
            row, ours_s = our_quant(runs["coverage"]["part"], quant, runs["coverage"]["signature"], args.threads)
            times.append((ours_s, llama_s))
            if round_ == 0:
                llama[quant.name] = parse_kld_output(output)
                runs["coverage"]["rows"][quant.name] = row
        timing[quant.name] = times
    # the other settings one at a time, each part dropped once scored (GBs where rows are stored whole)
    extra = [(f"ε={e}", float(e), False) for e in args.epsilons.split(",") if e]
    for label, eps, full in extra + ([("full-vocab", None, True)] if args.full_vocab else []):
        run = reference_run(label, eps, full)
        for quant in quants:
            run["rows"][quant.name] = our_quant(run["part"], quant, run["signature"], args.threads)[0]
        run["part"] = None
        runs[label] = run

    print()
    print(f"| quant | llama-perplexity mean KLD | ours (ε = {args.coverage:g}) mean KL [bracket] | difference | "
          "same top (llama / ours) | RMS Δp (llama / ours) | median KLD (llama / ours) |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for quant in quants:
        theirs, ours = llama[quant.name], runs["coverage"]["rows"][quant.name]
        low, high = ours.kld.bracket
        diff = ours.kld.mean / theirs["mean"] - 1
        results.append({"quant": quant.name, "llama": theirs, "ours": ours.to_json(), "rel_diff": diff})
        print(f"| {quant.name} | {theirs['mean']:.6f} ± {theirs['mean_stderr']:.6f} | "
              f"{ours.kld.mean:.6f} [{low:.6f}, {high:.6f}] | {100 * diff:+.2f} % | "
              f"{100 * theirs['same_top']:.2f} / {100 * ours.top1_agreement:.2f} % | "
              f"{100 * theirs['rms_dp']:.3f} / {100 * ours.dp.rms:.3f} % | "
              f"{theirs['median']:.6f} / {ours.kld.median:.6f} |")
    print()
    print("Every setting: mean KL (difference from llama-perplexity) and the bracket's width relative to the mean; "
          "agreement is claimed where the bracket is narrower than 2 % (the cache vouches for that precision).")
    print()
    print("| ε | tokens a position | cache bytes a position | positions stored whole | " + " | ".join(
        f"{q.name}: mean KL (vs llama) / bracket width" for q in quants) + " |")
    print("|---|---|---|---|" + "---|" * len(quants))
    failures = []
    for label, run in runs.items():
        summary = run["summary"]
        cells = []
        for quant in quants:
            row = run["rows"][quant.name]
            low, high = row.kld.bracket
            width = (high - low) / row.kld.mean if row.kld.mean > 0 else math.inf
            diff = row.kld.mean / llama[quant.name]["mean"] - 1
            if width < 0.02 and abs(diff) > 0.02:
                failures.append(f"{label} {quant.name}: {100 * diff:+.2f} %")
            cells.append(f"{row.kld.mean:.6f} ({100 * diff:+.2f} %) / {100 * width:.3g} %")
        print(f"| {summary['eps']} | {summary['mean_size']:.1f} | {summary['bytes_per_position']:.0f} | "
              f"{summary['dense']} | " + " | ".join(cells) + " |")
    ours_ref = runs["coverage"]["reference_s"]
    quant_ratios = [statistics.median(o / t for o, t in timing[q.name]) for q in quants]
    print()
    print(f"time, reference pass: ours {ours_ref:.1f} s / llama-perplexity {base_s:.1f} s = {ours_ref / base_s:.2f}")
    for quant, ratio in zip(quants, quant_ratios, strict=True):
        medians = [statistics.median(t[i] for t in timing[quant.name]) for i in (0, 1)]
        print(f"time, {quant.name} pass (median of {len(timing[quant.name])}): ours {medians[0]:.1f} s / "
              f"llama-perplexity {medians[1]:.1f} s = {ratio:.2f}")
    cache_ratio = runs["coverage"]["part"].file_bytes / base.stat().st_size
    print(f"cache size: ours {runs['coverage']['part'].file_bytes} B / llama-perplexity {base.stat().st_size} B "
          f"= {cache_ratio:.4f}")
    worst = max(abs(r["rel_diff"]) for r in results)
    print(f"largest mean-KL difference at ε = {args.coverage:g}: {100 * worst:.2f} % (target: within 2 % where the "
          f"bracket is narrower than 2 %); disagreements: {', '.join(failures) or 'none'}")
    (workdir / "result.json").write_text(json.dumps({"results": results, "cache_ratio": cache_ratio,
                                                     "reference_time_ratio": ours_ref / base_s,
                                                     "quant_time_ratios": quant_ratios}, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
