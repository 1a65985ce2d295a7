"""Long context: the planner against llama.cpp's own allocations, speed and accuracy of each KV setting.

One run, four parts (each can be skipped):

1. ``memory``: header-only GGUFs with MedGemma 4B's and 27B's real shapes (all layers, the 262,208-row
   vocabulary, 5 local : 1 global, window 1024; ``fixtures.shape_gguf``). For n_ctx 4K / 32K / 128K and each
   setting (f16 with the full-size and the small sliding-window cache, q8_0, q4_0, K q8_0 + V f16 without
   flash attention), llama.cpp's dry run (``no_alloc``: what it would allocate, without allocating it, as its
   own ``fit`` measures) reports the KV cache and compute buffer; the planner predicts both. Prints the
   ratio planner / llama.cpp (goal: within 5 %; the tests require equality on the fixtures).
2. ``table``: what users read — GPU memory for MedGemma 4B and 27B (Q4_K_M-like weights, mmproj for 4B,
   every layer offloaded, 1 GiB headroom) per context and KV setting, from the planner (extrapolation:
   the same arithmetic part 1 checks, at sizes this machine cannot allocate).
3. ``speed``: a real context on a 6-layer file of MedGemma 4B's widths (one 5:1 group; zero weights, the
   speed does not depend on the values): prompt and decode tokens/s of each setting against the
   baseline this runtime used before (llama-cpp-python's defaults: full-size SWA cache, f16, no flash
   attention), in the same run, ``--rounds`` rounds, medians.
4. ``kl``: accuracy of the quantized KV caches on the trained fixture (``fixtures.trained_fixture``,
   built and converted to an F32 GGUF under --workdir when missing): the held-out text evaluation slice in
   windows of --kl-ctx tokens, every position's logits with a q8_0 / q4_0 K and V cache against the f16
   cache (flash attention on for all three), mean KL and top-1 agreement. Caveat: a 6-layer, 256-wide model
   trained for minutes is not MedGemma — real models have outlier channels in K that make KV quantization
   costlier — so these numbers rank the settings, they do not predict MedGemma's KL.

    .venv/bin/python bench/bench_kv.py --workdir /tmp/kv-bench [--parts memory,table,speed,kl] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1024**2
GiB = 1024**3
CONTEXTS = (4096, 32768, 131072)


def memory_settings(n_ctx: int):
    from medgemma_gguf.runtime.context_settings import ContextSettings

    common = dict(n_ctx=n_ctx, n_outputs_max=1)
    return [
        ("f16, full-size SWA cache", ContextSettings(**common, swa_full=True)),
        ("f16 (default)", ContextSettings(**common)),
        ("q8_0", ContextSettings(**common, type_k="q8_0", type_v="q8_0")),
        ("q4_0", ContextSettings(**common, type_k="q4_0", type_v="q4_0")),
        ("K q8_0, V f16, no flash attention", ContextSettings(**common, type_k="q8_0", flash_attn="off")),
    ]


def part_memory(workdir: Path) -> list[float]:
    from medgemma_gguf.fixtures.shape_gguf import MEDGEMMA_SHAPES, write_shape_gguf
    from medgemma_gguf.runtime.engine import dry_run_allocations
    from medgemma_gguf.runtime.offload import plan_offload

    ratios = []
    print("\n== memory: planner vs llama.cpp's dry run (MiB; ratio planner / llama.cpp) ==")
    print(f"{'model':<13} {'n_ctx':>7}  {'setting':<34} {'KV llama':>10} {'KV plan':>10} {'ratio':>6}  "
          f"{'compute llama':>13} {'compute plan':>12} {'ratio':>6}")
    for name, shape in MEDGEMMA_SHAPES.items():
        path = write_shape_gguf(workdir / f"{name}-shape.gguf", shape)
        for n_ctx in CONTEXTS:
            grid = memory_settings(n_ctx)
            found = dry_run_allocations(path, [s for _, s in grid])
            for (label, settings), alloc in zip(grid, found, strict=True):
                plan = plan_offload(path, gpu_available=False, settings=settings)
                kv_llama = sum(c.mib for c in alloc.kv_caches)
                kv_plan = sum(plan.kv.layer_bytes) / MiB
                compute_llama = alloc.compute_mib["CPU"]
                compute_plan = plan.text_compute / MiB
                r_kv, r_compute = kv_plan / kv_llama, compute_plan / compute_llama
                ratios += [r_kv, r_compute]
                print(f"{name:<13} {n_ctx:>7}  {label:<34} {kv_llama:>10.2f} {kv_plan:>10.2f} {r_kv:>6.3f}  "
                      f"{compute_llama:>13.2f} {compute_plan:>12.2f} {r_compute:>6.3f}", flush=True)
    worst = max(abs(r - 1) for r in ratios)
    print(f"largest deviation: {worst * 100:.2f} % (goal: within 5 %)")
    return ratios


def part_table(workdir: Path) -> None:
    from medgemma_gguf.fixtures.shape_gguf import MEDGEMMA_SHAPES, Q4_K_M_MIX, write_shape_gguf, write_siglip_mmproj
    from medgemma_gguf.gguf_info import read_gguf_info, tensor_nbytes
    from medgemma_gguf.runtime.context_settings import ContextSettings
    from medgemma_gguf.runtime.offload import plan_offload

    print("\n== table: GPU memory with every layer offloaded (Q4_K_M-like weights, 1 GiB headroom included) ==")
    kinds = [("f16 full SWA", dict(swa_full=True)), ("f16", {}), ("q8_0", dict(type_k="q8_0", type_v="q8_0")),
             ("q4_0", dict(type_k="q4_0", type_v="q4_0"))]
    print(f"{'model':<13} {'n_ctx':>7}  " + "  ".join(f"{k:>13}" for k, _ in kinds) + "   (GiB; KV of the f16 row)")
    for name, shape in MEDGEMMA_SHAPES.items():
        path = write_shape_gguf(workdir / f"{name}-q4km.gguf", shape, mix=Q4_K_M_MIX)
        mmproj = write_siglip_mmproj(workdir / f"{name}-mmproj.gguf", shape.n_embd) if name.endswith("4b") else None
        weights = sum(tensor_nbytes(t.ggml_type, t.shape) for t in read_gguf_info(path).tensors) / GiB
        for n_ctx in (4096, 8192, 32768, 65536, 131072):
            cells = []
            kv_f16 = 0.0
            for label, extra in kinds:
                settings = ContextSettings(n_ctx=n_ctx, n_outputs_max=1, **extra)
                plan = plan_offload(path, gpu_available=True, vram_bytes=1024 * GiB, mmproj_path=mmproj,
                                    settings=settings)
                cells.append(f"{(plan.gpu_bytes + plan.headroom_bytes) / GiB:>13.2f}")
                if label == "f16":
                    kv_f16 = plan.gpu_kv / GiB
            print(f"{name:<13} {n_ctx:>7}  " + "  ".join(cells) + f"   (weights {weights:.2f}, KV {kv_f16:.2f})",
                  flush=True)


def part_speed(workdir: Path, threads: int, rounds: int, prompt_tokens: int, decode_tokens: int) -> None:
    import numpy as np

    from medgemma_gguf.fixtures.shape_gguf import MEDGEMMA_SHAPES, write_shape_gguf
    from medgemma_gguf.runtime.context_settings import ContextSettings
    from medgemma_gguf.runtime.engine import Engine

    path = write_shape_gguf(workdir / "medgemma-4b-6layers.gguf", MEDGEMMA_SHAPES["medgemma-4b"], n_layers=6)
    n_ctx = 4096
    grid = [("baseline: f16, full SWA, no flash attn", ContextSettings(n_ctx=n_ctx, swa_full=True, flash_attn="off",
                                                                       n_outputs_max=1)),
            ("f16 (default: small SWA, flash auto)", ContextSettings(n_ctx=n_ctx, n_outputs_max=1)),
            ("q8_0", ContextSettings(n_ctx=n_ctx, type_k="q8_0", type_v="q8_0", n_outputs_max=1)),
            ("q4_0", ContextSettings(n_ctx=n_ctx, type_k="q4_0", type_v="q4_0", n_outputs_max=1))]
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(4, 262000, prompt_tokens)]
    times: dict[str, tuple[list[float], list[float]]] = {label: ([], []) for label, _ in grid}
    engine = Engine(path, n_threads=threads, create_context=False)
    try:
        for _ in range(rounds):
            for label, settings in grid:
                engine.create_context(settings)
                start = time.perf_counter()
                engine.eval_tokens(prompt, logits="last")
                middle = time.perf_counter()
                for i in range(decode_tokens):
                    engine.eval_tokens([prompt[i]], logits="last")
                end = time.perf_counter()
                times[label][0].append(prompt_tokens / (middle - start))
                times[label][1].append(decode_tokens / (end - middle))
    finally:
        engine.close()
    print(f"\n== speed: 6 layers of MedGemma 4B's widths, n_ctx {n_ctx}, {prompt_tokens}-token prompt then "
          f"{decode_tokens} decoded, {threads} thread(s), median of {rounds} ==")
    base_prompt, base_decode = (statistics.median(v) for v in times[grid[0][0]])
    for label, _ in grid:
        p, d = (statistics.median(v) for v in times[label])
        print(f"{label:<40} prompt {p:8.1f} tok/s ({p / base_prompt:5.2f}x)   decode {d:7.2f} tok/s "
              f"({d / base_decode:5.2f}x)", flush=True)


def trained_gguf(workdir: Path) -> Path:
    from medgemma_gguf.convert.converter import convert_checkpoint
    from medgemma_gguf.fixtures.trained_fixture import build_trained_fixture

    checkpoint = workdir / "trained"
    if not (checkpoint / "config.json").is_file():
        print("training the fixture (once; ~3-6 min on 2 cores) ...", flush=True)
        build_trained_fixture(checkpoint)
    out = workdir / "trained-gguf"
    if not (out / "manifest.json").is_file():
        convert_checkpoint(str(checkpoint), out, outtype="f32", mmproj_type="f16", force=True, progress=False)
    return next(p for p in out.glob("*-F32.gguf") if not p.name.startswith("mmproj"))


def part_kl(workdir: Path, threads: int, n_ctx: int, max_windows: int) -> None:
    import numpy as np

    from medgemma_gguf.quant_eval.metrics import kl_divergence_full, kld_statistics
    from medgemma_gguf.quant_eval.slices import load_heldout_text
    from medgemma_gguf.runtime.context_settings import ContextSettings
    from medgemma_gguf.runtime.engine import Engine

    path = trained_gguf(workdir)
    settings = {name: ContextSettings(n_ctx=n_ctx, n_ubatch=n_ctx, type_k=name, type_v=name, flash_attn="on")
                for name in ("f16", "q8_0", "q4_0")}
    engine = Engine(path, n_threads=threads, create_context=False)
    try:
        tokens: list[int] = []
        for chunk in load_heldout_text():
            tokens += engine.tokenize(chunk.text, add_special=False)
        bos = engine.tokenize("", add_special=True)
        windows = [bos + tokens[i:i + n_ctx - len(bos)] for i in range(0, len(tokens), n_ctx - len(bos))]
        windows = [w for w in windows if len(w) == n_ctx][:max_windows]
        logits: dict[str, list[np.ndarray]] = {name: [] for name in settings}
        for name, one in settings.items():
            engine.create_context(one)
            for window in windows:
                engine.reset()
                logits[name].append(engine.eval_tokens(window, logits="all").astype(np.float64))
    finally:
        engine.close()
    n_swa = 32
    print(f"\n== kl: quantized KV vs f16 KV on the trained fixture ({path.name}; held-out text, {len(windows)} "
          f"windows of {n_ctx} tokens = {len(windows) * n_ctx} positions; sliding window {n_swa}; flash attention "
          "on) ==")
    reference = np.concatenate(logits["f16"])
    for name in ("q8_0", "q4_0"):
        candidate = np.concatenate(logits[name])
        kl = kl_divergence_full(reference, candidate)
        stats = kld_statistics(kl)
        top1 = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
        print(f"{name}: mean KL {stats['mean']:.3g} ± {stats['mean_stderr']:.2g}, 99th percentile {stats['p99']:.3g}, "
              f"max {stats['max']:.3g}, top-1 agreement {top1 * 100:.2f} %", flush=True)
    print("caveat: a 6-layer, 256-wide model trained briefly, not MedGemma; the numbers rank the settings only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--parts", default="memory,table,speed,kl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--kl-ctx", type=int, default=512)
    parser.add_argument("--kl-windows", type=int, default=16)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    if "memory" in parts:
        part_memory(args.workdir)
    if "table" in parts:
        part_table(args.workdir)
    if "speed" in parts:
        part_speed(args.workdir, args.threads, args.rounds, args.prompt_tokens, args.decode_tokens)
    if "kl" in parts:
        part_kl(args.workdir, args.threads, args.kl_ctx, args.kl_windows)


if __name__ == "__main__":
    main()
