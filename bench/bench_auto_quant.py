"""AUTO (sensitivity-chosen mixes) against llama.cpp's and the UD recipes at matched file sizes, fast vs proxy.

One run, three parts (each can be skipped):

1. Quality and cost on the trained fixture (``fixtures.trained_fixture``, built under --workdir when missing):
   convert to an F32 GGUF + F32 mmproj, compute one imatrix on the bundled calibration set, quantize
   Q4_K_M, UD-Q4_K_XL, Q3_K_M, UD-Q3_K_XL and IQ2_M with it, then, for each sensitivity method (``fast``,
   ``proxy``), make an AUTO quant at each baseline's file size (``--target-size`` = its bytes) through the
   same code path as the CLI. The calibration reference outputs are computed once up front for each
   method's calibration selection (timed apart), so neither method's time includes them. Every file is
   scored by quant_eval against the F32 GGUF on the held-out text and the medqa-mini and vqa-mini slices
   (data the sensitivity never saw: it uses the calibration set). Prints the mean-KL ratio AUTO / baseline
   at equal size for both methods, the wall time of each method's sensitivity measurement and their ratio,
   and how well the fast table ranks (group, type) pairs against direct KL measurement (Spearman).
2. The whole default AUTO command on the demo fixture (``medgemma-gguf demo``'s folder, built under --workdir
   when missing): ``quantize DEMO --target-bpw 4.5`` in a child process with a fresh cache, once with the
   folder's importance matrix and once computing one.
3. Time per billion weights on a checkpoint with MedGemma 4B's real widths (2560 / 10240, 8 x 256 query
   heads, 4 x 256 KV heads, the 262208-row embedding) and --wide-layers layers: the fast method's parts
   (importance matrix, per-tensor errors, reference, calibration points) measured, then extrapolated to
   MedGemma 4B (3.9 B weights, 34 layers) and 27B (62 layers of 5376 / 21504): the model-running parts
   in proportion to the weights (the reference and calibration points also to their number of evaluations:
   one reference plus the points ``plan_points`` makes for that depth), the per-tensor errors in proportion
   to the weights the row sampling actually quantizes for those exact shapes.

    .venv/bin/python bench/bench_auto_quant.py --workdir /tmp/auto-bench [--threads 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

BASELINES = ("Q4_K_M", "UD-Q4_K_XL", "Q3_K_M", "UD-Q3_K_XL", "IQ2_M")
GOAL_FAST_VS_Q4_K_M = 0.45
GOAL_DEMO_SECONDS = 120
GOAL_4B_SECONDS = 30 * 60
# (n_embd, n_ff, q width, kv width, layers, vocab) of the real models
MEDGEMMA = {"MedGemma 4B": (2560, 10240, 8 * 256, 4 * 256, 34, 262208),
            "MedGemma 27B": (5376, 21504, 32 * 128, 16 * 128, 62, 262208)}


def _folder(workdir: Path, steps: int, name: str = "out") -> Path:
    """The trained fixture (built once) converted into ``workdir / name`` (once)."""
    from medgemma_gguf.convert.converter import convert_checkpoint
    from medgemma_gguf.fixtures.trained_fixture import build_trained_fixture

    checkpoint = workdir / "trained"
    if not (checkpoint / "config.json").is_file():
        print(f"training the fixture ({steps} steps) into {checkpoint} ...", flush=True)
        build_trained_fixture(checkpoint, steps=steps)
    out = workdir / name
    if not (out / "manifest.json").is_file():
        convert_checkpoint(str(checkpoint), out, outtype="f32", mmproj_type="f32", progress=False)
    return out


def model_shapes(n_embd: int, n_ff: int, q: int, kv: int, layers: int, vocab: int) -> list[tuple[str, int, int]]:
    """(tensor, row length, rows) of every quantizable matrix of a Gemma 3 text model (tied output)."""
    shapes = [("token_embd.weight", n_embd, vocab)]
    for i in range(layers):
        shapes += [(f"blk.{i}.attn_q.weight", n_embd, q), (f"blk.{i}.attn_k.weight", n_embd, kv),
                   (f"blk.{i}.attn_v.weight", n_embd, kv), (f"blk.{i}.attn_output.weight", q, n_embd),
                   (f"blk.{i}.ffn_gate.weight", n_embd, n_ff), (f"blk.{i}.ffn_up.weight", n_embd, n_ff),
                   (f"blk.{i}.ffn_down.weight", n_ff, n_embd)]
    return shapes


def calibration_evaluations(layers: int) -> int:
    """Model evaluations of the fast method's reference and calibration points for a Gemma 3 of ``layers``."""
    from medgemma_gguf.convert.quantize.fast_sensitivity import global_layers, sample_layers
    from medgemma_gguf.gguf_info import GgufInfo
    from medgemma_gguf.quant_types import KINDS

    kinds = len(KINDS) - 1  # Gemma 3 ties the output projection to token_embd
    header = GgufInfo(Path(f"gemma3-{layers}L.gguf"), 3, {"general.architecture": "gemma3",
                                                          "gemma3.attention.sliding_window": 1024}, ())
    return 1 + kinds + 2 * len(sample_layers(layers, global_layers(header, layers)))


def sampled_weights(shapes: list[tuple[str, int, int]]) -> int:
    """Weights the default row sampling quantizes per type, summed over the tensors."""
    from medgemma_gguf.convert.quantize.tensor_errors import Sampling

    sampling = Sampling()
    return sum(len(sampling.rows(name, rows, width)) * width for name, width, rows in shapes)


def _method_folder(out: Path, method: str) -> Path:
    """A copy of the converted folder (hard links: the same file contents) for one method's AUTO files, so the
    methods' quants of equal size, which take the same names, do not meet."""
    folder = out.parent / f"{out.name}-{method}"
    if not (folder / "manifest.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(out, folder, copy_function=os.link)
    return folder


def _measure_reference(source: Path, mmproj: Path, imatrix: Path, cache: Path, sample: int | None,
                       threads: int) -> float:
    """Compute (or find) the calibration reference of one selection; seconds spent."""
    from medgemma_gguf.convert.quantize.imatrix import read_imatrix
    from medgemma_gguf.convert.quantize.sensitivity import Measurer

    started = time.perf_counter()
    with Measurer(source, mmproj, read_imatrix(imatrix), cache_dir=cache, max_text=sample, max_images=sample,
                  n_threads=threads):
        pass
    return time.perf_counter() - started


def quality(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Part 1 (module docstring)."""
    from medgemma_gguf.convert.quantize.folder import AutoRequest, auto_quantize_folder, quantize_folder
    from medgemma_gguf.convert.quantize.sensitivity import FAST_SAMPLE, SensitivityOptions, proxy_agreement
    from medgemma_gguf.manifest import Manifest
    from medgemma_gguf.quant_eval.evaluate import Candidate, evaluate_candidates, load_slices
    from medgemma_gguf.quant_eval.reference import GGUFReference, ReferenceCache, reference_parts
    from medgemma_gguf.quant_eval.slices import load_heldout_text

    chunks = args.imatrix_chunks or None
    out = _folder(workdir, args.steps, f"out-im{chunks}" if chunks else "out")
    cache = workdir / "cache"
    baselines = quantize_folder(out, ",".join(BASELINES), imatrix="auto", progress=False, n_threads=args.threads,
                                imatrix_chunks=chunks)
    manifest = Manifest.load(out)
    imatrix = out / manifest.find("imatrix")[0].path
    source = out / next(r.path for r in manifest.find("text") if r.type.upper() == "F32")
    mmproj = out / manifest.find("mmproj")[0].path
    samples = {"fast": args.fast_sample or FAST_SAMPLE, "proxy": args.sample}
    folders = {method: _method_folder(out, method) for method in args.methods}
    for method in args.methods:
        folder = folders[method]
        seconds = _measure_reference(folder / source.name, folder / mmproj.name, folder / imatrix.name, cache,
                                     samples[method], args.threads)
        print(f"calibration reference for {method} ({samples[method]} text + {samples[method]} image "
              f"conversations): {seconds:.0f} s (shared, not counted below)", flush=True)
    autos: dict[str, dict[str, Any]] = {}
    sensitivity_seconds: dict[str, float] = {}
    for method in args.methods:
        autos[method] = {}
        for base in baselines:
            started, cpu_started = time.perf_counter(), time.process_time()
            options = SensitivityOptions(method=method, cache_dir=cache, max_text=samples[method],
                                         max_images=samples[method], n_threads=args.threads, workers=args.workers)
            made = auto_quantize_folder(folders[method], AutoRequest(target_size=f"{base.bytes}B",
                                                                     imatrix=folders[method] / imatrix.name,
                                                                     sensitivity=options), progress=False)
            autos[method][base.type_name] = made
            if not made.sensitivity.from_cache:
                sensitivity_seconds[method] = made.sensitivity.cost["seconds"]
                print(f"sensitivity ({method}): {made.sensitivity.meta['groups']} groups x "
                      f"{len(made.sensitivity.meta['candidates'])} types, cost {json.dumps(made.sensitivity.cost)}; "
                      f"first AUTO command {time.perf_counter() - started:.0f} s wall, "
                      f"{time.process_time() - cpu_started:.0f} CPU s", flush=True)
            else:
                print(f"sensitivity ({method}) from the cache: {made.sensitivity.cache_path}", flush=True)
    reference = GGUFReference(str(source), cache / "reference", mmproj=mmproj, n_threads=args.threads)
    slices = load_slices(["medqa-mini", "vqa-mini"])
    parts = reference_parts(reference, ReferenceCache(cache / "reference"), heldout=load_heldout_text(),
                            slices=slices)
    reference.close()
    image_size = max(int(p.meta.get("image_size") or 0) for p in parts)
    files = [b.path for b in baselines] + [a.result.path for m in autos.values() for a in m.values()]
    files = list(dict.fromkeys(files))
    rows = evaluate_candidates([Candidate(path, mmproj) for path in files], parts, slices, reference.signature,
                               image_size, n_threads=args.threads, measure_speed=False)
    by_file = {str(Path(r.path or r.file).resolve()): r for r in rows}  # both methods' AUTO files share names
    for row in rows:
        if not row.ok:
            raise SystemExit(f"error: {row.file}: {row.error}")

    print()
    header = "| baseline | bytes | bpw | mean KL | image KL |"
    rule = "|---|---|---|---|---|"
    for method in args.methods:
        header += f" AUTO {method} | bytes (Δ%) | mean KL | image KL | **KL ratio** |"
        rule += "---|---|---|---|---|"
    print(header)
    print(rule)
    ratios: dict[str, dict[str, float]] = {m: {} for m in args.methods}
    for base in baselines:
        b = by_file[str(base.path.resolve())]
        line = f"| {base.type_name} | {base.bytes} | {base.bpw:.2f} | {b.kld.mean:.5f} | {b.image_kld.mean:.5f} |"
        for method in args.methods:
            auto = autos[method][base.type_name].result
            a = by_file[str(auto.path.resolve())]
            ratio = a.kld.mean / b.kld.mean
            ratios[method][base.type_name] = ratio
            delta = 100 * (auto.bytes - base.bytes) / base.bytes
            line += (f" {auto.type_name} | {auto.bytes} ({delta:+.2f}) | {a.kld.mean:.5f} | {a.image_kld.mean:.5f} "
                     f"| **{ratio:.3f}** |")
        print(line)
    print()
    if {"fast", "proxy"} <= set(sensitivity_seconds):
        fast, proxy = sensitivity_seconds["fast"], sensitivity_seconds["proxy"]
        print(f"sensitivity wall time: fast {fast:.0f} s, proxy {proxy:.0f} s (fast / proxy = {fast / proxy:.3f})")
    if args.agreement_groups and "fast" in autos:
        table = next(iter(autos["fast"].values())).sensitivity
        agreement = proxy_agreement(table, source, mmproj, imatrix, SensitivityOptions(cache_dir=cache,
                                                                                       n_threads=args.threads),
                                    n_groups=args.agreement_groups, n_types=4, progress=False)
        print(f"fast vs measured ΔKL on {len(agreement.pairs)} (group, type) pairs: Spearman "
              f"{agreement.spearman:.3f} overall, {agreement.spearman_within_group:.3f} within groups "
              f"(cost {json.dumps(agreement.cost)})")
    if "fast" in ratios:
        fast = ratios["fast"]
        goal_q4 = fast["Q4_K_M"] <= GOAL_FAST_VS_Q4_K_M
        goal_ud = all(fast[name] <= 1.0 for name in fast if name.startswith("UD-"))
        print(f"goal fast AUTO <= {GOAL_FAST_VS_Q4_K_M}x Q4_K_M: {'met' if goal_q4 else 'NOT met'} "
              f"({fast['Q4_K_M']:.3f}); never worse than UD at equal size: {'met' if goal_ud else 'NOT met'}")
    return {"ratios": ratios, "sensitivity_seconds": sensitivity_seconds}


def demo(args: argparse.Namespace, workdir: Path) -> None:
    """Part 2 (module docstring)."""
    from medgemma_gguf.fixtures.demo import run_demo
    from medgemma_gguf.manifest import Manifest

    root = workdir / "demo"
    if not (root / "gguf" / "manifest.json").is_file():
        run_demo(root, evaluate=False, echo=lambda _line: None)
    folder = root / "gguf"
    for label, keep_imatrix in (("with the folder's importance matrix", True), ("computing the importance matrix",
                                                                                False)):
        trial = workdir / f"demo-{'kept' if keep_imatrix else 'bare'}"
        shutil.rmtree(trial, ignore_errors=True)
        shutil.copytree(folder, trial, ignore=shutil.ignore_patterns("*AUTO*", "report"))
        if not keep_imatrix:
            manifest = Manifest.load(trial)
            for row in manifest.find("imatrix"):
                (trial / row.path).unlink(missing_ok=True)
            manifest.files = [r for r in manifest.files if r.role != "imatrix"]
            manifest.save(trial)
        command = [sys.executable, "-m", "medgemma_gguf", "quantize", str(trial), "--target-bpw", "4.5", "--quiet",
                   "--threads", str(args.threads), "--workers", str(args.workers), "--cache-dir",
                   str(workdir / f"demo-cache-{'kept' if keep_imatrix else 'bare'}")]
        shutil.rmtree(workdir / f"demo-cache-{'kept' if keep_imatrix else 'bare'}", ignore_errors=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"demo AUTO failed:\n{done.stdout}\n{done.stderr[-3000:]}")
        estimate = next((line for line in done.stdout.splitlines() if "estimated time" in line), "")
        verdict = {name: "met" if value <= GOAL_DEMO_SECONDS else "NOT met" for name, value in (("wall", seconds),
                                                                                              ("cpu", cpu))}
        print(f"demo AUTO command {label}: {seconds:.0f} s wall, {cpu:.0f} CPU s (goal <= {GOAL_DEMO_SECONDS} s: "
              f"wall {verdict['wall']}, CPU {verdict['cpu']});{estimate.replace('  ', ' ')}", flush=True)


def wide(args: argparse.Namespace, workdir: Path) -> None:
    """Part 3 (module docstring)."""
    from bench_convert import build_wide_checkpoint

    from medgemma_gguf.convert.converter import convert_checkpoint
    from medgemma_gguf.convert.quantize.folder import AUTO_IMATRIX_CHUNKS
    from medgemma_gguf.convert.quantize.imatrix import compute_imatrix, write_imatrix_gguf
    from medgemma_gguf.convert.quantize.sensitivity import SensitivityOptions, plan_sensitivity
    from medgemma_gguf.gguf_info import read_gguf_info

    checkpoint = workdir / f"wide-{args.wide_layers}L"
    build_wide_checkpoint(checkpoint, args.wide_layers)
    out = workdir / f"wide-{args.wide_layers}L-gguf"
    if not (out / "manifest.json").is_file():
        convert_checkpoint(str(checkpoint), out, outtype="bf16", progress=False)
    source = next(out.glob("*-BF16.gguf"))
    info = read_gguf_info(source)
    weights = sum(t.n_elements for t in info.tensors if len(t.shape) > 1)
    cache = workdir / "wide-cache"
    shutil.rmtree(cache, ignore_errors=True)
    parts: dict[str, tuple[float, float]] = {}  # name -> (wall s, CPU s)

    def timed(name: str, work: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        value = work()
        parts[name] = (time.perf_counter() - wall, time.process_time() - cpu)
        return value

    chunks = AUTO_IMATRIX_CHUNKS if args.imatrix_chunks is None else (args.imatrix_chunks or None)
    computed = timed("importance matrix", lambda: compute_imatrix(source, None, max_chunks=chunks, progress=False,
                                                                  n_threads=args.threads))
    imatrix = write_imatrix_gguf(computed, out / "imatrix.gguf", force=True)
    print(f"importance matrix: {computed.chunk_count} chunks, {computed.calibration['positions']} positions "
          f"({'all' if chunks is None else f'AUTO reads the first {chunks}'})", flush=True)
    job = timed("plan (quick timings)", lambda: plan_sensitivity(source, None, imatrix, SensitivityOptions(
        method="fast", cache_dir=cache, n_threads=args.threads, workers=args.workers, max_text=args.fast_sample,
        max_images=args.fast_sample)))
    print("\n".join(job.plan.lines()), flush=True)
    timed("per-tensor errors", lambda: job.errors.measure(args.workers))
    result = timed("reference + calibration points", lambda: job.run(progress=False))
    cost = result.cost
    wall_total = sum(wall for wall, _ in parts.values())
    print(f"\nfast sensitivity on {info.path.name}: {weights / 1e9:.3f} B weights ({args.wide_layers} layers at "
          f"MedGemma 4B's widths), {job.plan.error_items} tensor errors, {cost['evaluations']} evaluations; "
          f"estimated {job.plan.estimated_seconds:.0f} s, measured {wall_total:.0f} s wall")
    shapes = [(t.name, t.shape[0], math.prod(t.shape[1:])) for t in info.tensors if len(t.shape) > 1]
    sampled_here = sampled_weights(shapes)
    print("| part | wall s | CPU s | wall per billion weights |")
    print("|---|---|---|---|")
    for name, (wall, cpu) in parts.items():
        print(f"| {name} | {wall:.0f} | {cpu:.0f} | {wall / weights * 1e9:.0f} s |")
    print()
    print("Extrapolated (per-tensor errors by the weights the row sampling quantizes for the exact shapes, the rest"
          " by weights), from the wall time and from the CPU time (what an idle machine's wall time approaches when"
          " the work keeps one core busy; on a busy machine the wall time includes waiting for a core):")
    print("| model | basis | weights | importance matrix | per-tensor errors | reference + calibration points | plan "
          "| total | total without the importance matrix |")
    print("|---|---|---|---|---|---|---|---|---|")
    evaluations_here = calibration_evaluations(args.wide_layers)
    for model, dims in MEDGEMMA.items():
        target = model_shapes(*dims)
        n = sum(width * rows for _, width, rows in target)
        scale = n / weights
        points_scale = scale * calibration_evaluations(dims[4]) / evaluations_here
        for basis, index in (("wall", 0), ("CPU", 1)):
            row = {"importance matrix": parts["importance matrix"][index] * scale,
                   "per-tensor errors": parts["per-tensor errors"][index] * sampled_weights(target) / sampled_here,
                   "reference + calibration points": parts["reference + calibration points"][index] * points_scale,
                   "plan (quick timings)": parts["plan (quick timings)"][index] * scale}
            total = sum(row.values())
            goal = f" (goal <= {GOAL_4B_SECONDS / 60:.0f} min: {'met' if total <= GOAL_4B_SECONDS else 'NOT met'})" \
                if model == "MedGemma 4B" else ""
            print(f"| {model} | {basis} | {n / 1e9:.2f} B | {row['importance matrix'] / 60:.1f} min | "
                  f"{row['per-tensor errors'] / 60:.1f} min | {row['reference + calibration points'] / 60:.1f} min | "
                  f"{row['plan (quick timings)'] / 60:.1f} min | **{total / 60:.1f} min**{goal} | "
                  f"{(total - row['importance matrix']) / 60:.1f} min |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="cache of fixtures, quants and tables")
    parser.add_argument("--steps", type=int, default=300, help="training steps when the fixture is built")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1 is fastest on a busy box)")
    parser.add_argument("--workers", type=int, default=2, help="fast method: tensors quantized in parallel")
    parser.add_argument("--sample", type=int, default=10,
                        help="proxy: calibration conversations (text and image each) for the sensitivity")
    parser.add_argument("--fast-sample", type=int, default=None,
                        help="fast: calibration conversations (default FAST_SAMPLE)")
    parser.add_argument("--methods", default="fast,proxy", help="sensitivity methods compared in part 1")
    parser.add_argument("--agreement-groups", type=int, default=6)
    parser.add_argument("--wide-layers", type=int, default=2, help="layers of the MedGemma-4B-wide checkpoint")
    parser.add_argument("--imatrix-chunks", type=int, default=None,
                        help="chunks of 512 calibration positions of the importance matrix (0: all); part 1: its "
                             "folder's matrix (default all, in out/; else in out-imN/), part 3: the timed one "
                             "(default AUTO's, AUTO_IMATRIX_CHUNKS)")
    parser.add_argument("--skip", default="", help="parts to skip: quality, demo, wide (comma-separated)")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    started = time.perf_counter()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if "quality" not in skip:
        quality(args, workdir)
    if "demo" not in skip:
        print()
        demo(args, workdir)
    if "wide" not in skip:
        print()
        wide(args, workdir)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
