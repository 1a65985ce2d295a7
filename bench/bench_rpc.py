"""A model split across two llama.cpp RPC workers on this machine (loopback, CPU) against the same model loaded
locally, in the same run: time to load, prompt tokens/s and decode tokens/s.

Both run ``ChatModel.generate`` (end of turn ignored, so both decode ``--tokens`` tokens) on the same prompt, in
this process: local = ``runtime.chat.load(n_gpu_layers=0)``; split = ``runtime.rpc_model.load_split`` (what the
engine process of ``load(rpc=...)`` / ``chat --rpc`` / ``serve --rpc`` runs; the pipe between that process and
its caller adds one message per token, not measured here). The two alternate for ``--rounds`` rounds; printed:
medians and ``ratio = split / local`` per measure, and one JSON line.

On loopback the workers compute with the same CPU kernels, so the ratio is the RPC backend's own cost: each
graph split is a round trip per worker per decoded token (weights are sent once, at load). On a real network
add, per token and per worker boundary, one round trip of latency plus the activations (``n_embd`` floats:
10 KiB for MedGemma 4B, 21 KiB for 27B), and the logits from the worker holding the output layer
(262,208 floats, 1 MiB per token) unless a local GPU holds it.

Model (default): the ``mm-vocab262k`` fixture (MedGemma's 262,208-row vocabulary at toy widths), quantized
to ``--quant`` (built once in ``--workdir`` by ``bench_runtime.fixture``); or ``--model X.gguf``.

    .venv/bin/python bench/bench_rpc.py --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medgemma_gguf.processes import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = ("A 67-year-old man presents with three days of productive cough, fever and right-sided pleuritic chest "
          "pain. Summarise the likely differential diagnosis and the first investigations. ") * 6


def start_workers(count: int, threads: int) -> tuple[list[subprocess.Popen], list[str]]:
    from medgemma_gguf.errors import UnavailableError
    from medgemma_gguf.runtime.rpc import Endpoint, probe

    processes, addresses = [], []
    for _ in range(count):
        port = free_port()
        processes.append(subprocess.Popen([sys.executable, "-m", "medgemma_gguf", "worker", "--port", str(port),
                                           "--threads", str(threads)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while True:
            try:
                probe(Endpoint("127.0.0.1", port), timeout=5)
                break
            except UnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        addresses.append(f"127.0.0.1:{port}")
    return processes, addresses


def measure(load, n_tokens: int) -> dict[str, float]:
    """Load (timed), evaluate the prompt and decode ``n_tokens``; tokens/s from the reply's timings."""
    started = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - started
    try:
        prompt = model.prompt([{"role": "user", "content": PROMPT}])
        result = model.generate(prompt, max_tokens=n_tokens, ignore_eos=True).collect()
        timings = result.timings
        return {"load_s": load_s,
                "prompt_tok_s": timings["prompt_positions_evaluated"] / (timings["prompt_ms"] / 1e3),
                "decode_tok_s": timings["decode_tokens_per_s"], "prompt_tokens": prompt.n_positions,
                "tokens": result.token_ids}
    finally:
        model.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a text GGUF instead of the fixture")
    parser.add_argument("--quant", default="Q4_K_M", help="quantize the fixture to this type (F32: as converted)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "medgemma-bench-rpc")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads of the local model and of each worker")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=1024)
    args = parser.parse_args(argv)

    from medgemma_gguf.runtime.chat import load
    from medgemma_gguf.runtime.rpc import parse_endpoints
    from medgemma_gguf.runtime.rpc_model import load_split, prepare_split

    if args.model is None:
        from bench_runtime import fixture

        args.workdir.mkdir(parents=True, exist_ok=True)
        model_path, _ = fixture(args.workdir, "mm-vocab262k", args.quant)
    else:
        model_path = args.model
    processes, addresses = start_workers(args.workers, args.threads)
    try:
        setup = prepare_split(model_path, None, parse_endpoints(addresses), n_ctx=args.ctx)
        print(setup.plan.describe(), flush=True)
        rows: dict[str, list[dict[str, float]]] = {"local": [], "split": []}
        for round_index in range(args.rounds):
            rows["local"].append(measure(lambda: load(model_path, None, n_gpu_layers=0, n_ctx=args.ctx,
                                                      n_threads=args.threads), args.tokens))
            rows["split"].append(measure(lambda: load_split(setup, n_ctx=args.ctx, n_threads=args.threads),
                                         args.tokens))
            same = rows["local"][-1]["tokens"] == rows["split"][-1]["tokens"]
            print(f"round {round_index + 1}: " + "; ".join(
                f"{name} load {r[-1]['load_s']:.2f} s, prompt {r[-1]['prompt_tok_s']:.0f} tok/s, decode "
                f"{r[-1]['decode_tok_s']:.1f} tok/s" for name, r in rows.items()) + f"; same tokens: {same}",
                flush=True)
            if not same:
                print("error: the split model's tokens differ from the local model's", file=sys.stderr)
                return 1
    finally:
        for process in processes:
            process.kill()
            process.wait()
    summary: dict[str, object] = {"model": model_path.name, "workers": args.workers, "threads": args.threads,
                                  "prompt_tokens": rows["local"][0]["prompt_tokens"], "tokens": args.tokens,
                                  "rounds": args.rounds}
    print(f"\nmedians over {args.rounds} rounds ({model_path.name}, {args.workers} workers on loopback, "
          f"{args.threads} thread(s) each; prompt {summary['prompt_tokens']} positions, {args.tokens} tokens):")
    for key, label in (("load_s", "time to load (s)"), ("prompt_tok_s", "prompt tokens/s"),
                       ("decode_tok_s", "decode tokens/s")):
        local = statistics.median(r[key] for r in rows["local"])
        split = statistics.median(r[key] for r in rows["split"])
        summary[key] = {"local": round(local, 3), "split": round(split, 3), "ratio": round(split / local, 3)}
        print(f"  {label:<18} local {local:10.2f}   split {split:10.2f}   ratio {split / local:6.3f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
