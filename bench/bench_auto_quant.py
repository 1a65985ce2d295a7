"""AUTO (measured-sensitivity mixes) against llama.cpp's and the UD recipes at matched file sizes.

In one run on the trained fixture (``convert.trained_fixture``, built under --workdir when missing): convert
to an F32 GGUF + F32 mmproj, compute one imatrix on the bundled calibration set, quantize Q4_K_M,
UD-Q4_K_XL, Q3_K_M, UD-Q3_K_XL and IQ2_M with it, measure the sensitivity table (cached), then make an
AUTO quant at each baseline's file size (``--target-size`` = its bytes) through the same CLI code path.
Every file is scored by quant_eval against the F32 GGUF on the held-out text and the medqa-mini and
vqa-mini slices (data the sensitivity measurement never saw: it uses the calibration set). Prints the
mean-KL ratio AUTO / baseline at equal size, and how well the sensitivity proxy ranks (group, type) pairs
against direct measurement (Spearman).

    .venv/bin/python bench/bench_auto_quant.py --workdir /tmp/auto-bench [--threads 1] [--sample 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BASELINES = ("Q4_K_M", "UD-Q4_K_XL", "Q3_K_M", "UD-Q3_K_XL", "IQ2_M")
GOAL_VS_Q4_K_M = 0.85


def _folder(workdir: Path, steps: int) -> Path:
    """The converted trained fixture (built and converted once)."""
    from medgemma_gguf.convert.converter import convert_checkpoint
    from medgemma_gguf.fixtures.trained_fixture import build_trained_fixture

    checkpoint = workdir / "trained"
    if not (checkpoint / "config.json").is_file():
        print(f"training the fixture ({steps} steps) into {checkpoint} ...", flush=True)
        build_trained_fixture(checkpoint, steps=steps)
    out = workdir / "out"
    if not (out / "manifest.json").is_file():
        convert_checkpoint(str(checkpoint), out, outtype="f32", mmproj_type="f32", progress=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="cache of fixture, quants and tables")
    parser.add_argument("--steps", type=int, default=300, help="training steps when the fixture is built")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1 is fastest on a busy box)")
    parser.add_argument("--sample", type=int, default=10,
                        help="calibration conversations (text and image each) for the sensitivity")
    parser.add_argument("--method", choices=("proxy", "measured"), default="proxy")
    parser.add_argument("--agreement-groups", type=int, default=6)
    args = parser.parse_args(argv)

    from medgemma_gguf.convert.quantize.folder import auto_quantize_folder, quantize_folder
    from medgemma_gguf.convert.quantize.sensitivity import proxy_agreement
    from medgemma_gguf.manifest import Manifest
    from medgemma_gguf.quant_eval.evaluate import Candidate, evaluate_candidates, load_slices
    from medgemma_gguf.quant_eval.reference import GGUFReference, ReferenceCache, reference_parts
    from medgemma_gguf.quant_eval.slices import load_heldout_text

    started = time.perf_counter()
    workdir = args.workdir.resolve()
    out = _folder(workdir, args.steps)
    cache = workdir / "cache"
    baselines = quantize_folder(out, ",".join(BASELINES), imatrix="auto", progress=False, n_threads=args.threads)
    manifest = Manifest.load(out)
    imatrix = out / manifest.find("imatrix")[0].path
    source = out / next(r.path for r in manifest.find("text") if r.type.upper() == "F32")
    mmproj = out / manifest.find("mmproj")[0].path
    autos = {}
    for base in baselines:
        made = auto_quantize_folder(out, target_size=f"{base.bytes}B", imatrix=imatrix, sensitivity_method=args.method,
                                    cache_dir=cache, max_text=args.sample, max_images=args.sample, progress=False,
                                    n_threads=args.threads)
        autos[base.type_name] = made
    sensitivity = next(iter(autos.values())).sensitivity
    print(f"sensitivity ({sensitivity.meta['method']}): {sensitivity.meta['groups']} groups x "
          f"{len(sensitivity.meta['candidates'])} types, cost {json.dumps(sensitivity.cost)}"
          f"{' (from cache)' if sensitivity.from_cache else ''}", flush=True)

    reference = GGUFReference(str(source), cache / "reference", mmproj=mmproj, n_threads=args.threads)
    slices = load_slices(["medqa-mini", "vqa-mini"])
    parts = reference_parts(reference, ReferenceCache(cache / "reference"), heldout=load_heldout_text(),
                            slices=slices)
    reference.close()
    image_size = max(int(p.meta.get("image_size") or 0) for p in parts)
    files = [b.path for b in baselines] + [a.result.path for a in autos.values()]
    rows = evaluate_candidates([Candidate(path, mmproj) for path in files], parts, slices, reference.signature,
                               image_size, n_threads=args.threads, measure_speed=False)
    by_file = {Path(r.path or r.file).name: r for r in rows}
    for row in rows:
        if not row.ok:
            print(f"error: {row.file}: {row.error}", file=sys.stderr)
            return 1

    print()
    print("| baseline | bytes | bpw | mean KL | image KL | AUTO | bytes (Δ%) | bpw | mean KL | image KL | KL ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    for base in baselines:
        auto = autos[base.type_name].result
        b, a = by_file[base.path.name], by_file[auto.path.name]
        ratio = a.kld.mean / b.kld.mean
        ratios[base.type_name] = ratio
        delta = 100 * (auto.bytes - base.bytes) / base.bytes
        print(f"| {base.type_name} | {base.bytes} | {base.bpw:.2f} | {b.kld.mean:.5f} | {b.image_kld.mean:.5f} "
              f"| {auto.type_name} | {auto.bytes} ({delta:+.2f}) | {auto.bpw:.2f} | {a.kld.mean:.5f} "
              f"| {a.image_kld.mean:.5f} | {ratio:.3f} |")

    agreement = proxy_agreement(sensitivity, source, mmproj, imatrix, n_groups=args.agreement_groups, n_types=4,
                                cache_dir=cache, n_threads=args.threads, progress=False)
    print()
    print(f"proxy vs measured ΔKL on {len(agreement.pairs)} (group, type) pairs: Spearman {agreement.spearman:.3f} "
          f"overall, {agreement.spearman_within_group:.3f} within groups (cost {json.dumps(agreement.cost)})")
    goal_q4 = ratios["Q4_K_M"] <= GOAL_VS_Q4_K_M
    goal_ud = all(ratios[name] <= 1.0 for name in ratios if name.startswith("UD-"))
    print(f"goal AUTO <= {GOAL_VS_Q4_K_M}x Q4_K_M: {'met' if goal_q4 else 'NOT met'} ({ratios['Q4_K_M']:.3f}); "
          f"never worse than UD at equal size: {'met' if goal_ud else 'NOT met'}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
