"""Runtime speed: decode tokens/s of ``runtime.chat`` over llama-cpp-python's own greedy loop, and the time
to first token of an image prompt.

Both decoders load the same GGUF in the same process with the same threads and context; each round runs
ours then theirs on the same prompt for ``--tokens`` greedy tokens (end-of-turn ignored, so every round
decodes the same count), and the best round of each is kept (the least disturbed by other processes).

* ours: ``ChatModel.generate(prompt, ignore_eos=True)`` — timed from after the prompt is evaluated to the
  last token: N argmax samples, N-1 single-token decodes, UTF-8 piece decoding;
* theirs: ``llama_cpp.Llama(model).generate(prompt_ids, temp=0)`` — timed from its first token to its
  N-th: N-1 decodes and samples with llama.cpp's sampler chain.

Prints ``decode ratio = ours / theirs`` (target >= 0.97) and the image prompt's time to first token
(image encode + prompt decode + first sample, from a cleared cache), as text and one JSON line.

    .venv/bin/python bench/bench_runtime.py --model X.gguf --mmproj Y.gguf [--tokens 128] [--rounds 5]
    .venv/bin/python bench/bench_runtime.py          # builds and converts the tiny mm-k256 fixture first
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tiny_fixture(workdir: Path) -> tuple[Path, Path]:
    """Build and convert (once per workdir) the tiny image+text fixture; its F32 text GGUF and mmproj."""
    from medgemma_gguf.convert.converter import convert_checkpoint
    from medgemma_gguf.fixtures.tiny_checkpoint import build_tiny_checkpoint

    checkpoint, out = workdir / "ckpt-mm-k256", workdir / "gguf-mm-k256"
    if not (checkpoint / "config.json").is_file():
        build_tiny_checkpoint(checkpoint, "mm-k256")
    if not out.is_dir():
        result = convert_checkpoint(str(checkpoint), out, outtype="f32", mmproj_type="f32", progress=False)
        return result.text_path, result.mmproj_path
    return next(out.glob("ckpt*.gguf")), next(out.glob("mmproj-*.gguf"))


def ours_decode(model, prompt, n_tokens: int) -> float:
    """Tokens/s of our decode loop after ``prompt``."""
    model.reset()
    stream = model.generate(prompt, max_tokens=n_tokens, ignore_eos=True)
    started = time.perf_counter()
    result = stream.collect()
    elapsed = time.perf_counter() - started
    assert result.completion_tokens == n_tokens
    return (n_tokens - 1) / elapsed


def raw_decode(llm, prompt_ids: list[int], n_tokens: int) -> float:
    """Tokens/s of llama-cpp-python's ``Llama.generate`` greedy loop after ``prompt_ids``."""
    llm.reset()
    started = 0.0
    tokens = llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, reset=True)
    for count, _token in enumerate(tokens, start=1):
        if count == 1:
            started = time.perf_counter()
        if count == n_tokens:
            break
    return (n_tokens - 1) / (time.perf_counter() - started)


def image_ttft(model, rounds: int) -> float:
    """Median ms from a cleared cache to the first token of a one-image prompt."""
    import numpy as np

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(model.image_size, model.image_size, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                             {"type": "image", "image": image}]}]
    times = []
    for _ in range(rounds):
        model.reset()
        result = model.chat(messages, max_tokens=1)
        times.append(result.timings["time_to_first_token_ms"])
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="text GGUF (default: the tiny fixture, built here)")
    parser.add_argument("--mmproj", type=Path, help="mmproj GGUF for the image time to first token")
    parser.add_argument("--tokens", type=int, default=128, help="greedy tokens per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "medgemma-bench-runtime")
    args = parser.parse_args(argv)

    import llama_cpp

    from medgemma_gguf.runtime.chat import load

    model_path, mmproj_path = args.model, args.mmproj
    if model_path is None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        model_path, mmproj_path = tiny_fixture(args.workdir)
    model = load(model_path, mmproj_path, n_gpu_layers=args.n_gpu_layers, n_ctx=args.ctx, n_threads=args.threads)
    prompt = model.prompt([{"role": "user", "content": "What is the normal adult resting heart rate?"}])
    prompt_ids = prompt.flat_ids(-1)
    if prompt.n_positions + args.tokens > args.ctx:
        parser.error("--tokens does not fit in --ctx after the prompt")
    llm = llama_cpp.Llama(str(model_path), n_ctx=args.ctx, n_threads=args.threads, n_threads_batch=args.threads,
                          n_gpu_layers=args.n_gpu_layers, n_batch=model.engine.n_batch, verbose=False)
    ours, theirs = [], []
    ours_decode(model, prompt, min(8, args.tokens))  # warm both up
    raw_decode(llm, prompt_ids, min(8, args.tokens))
    for _ in range(args.rounds):
        ours.append(ours_decode(model, prompt, args.tokens))
        theirs.append(raw_decode(llm, prompt_ids, args.tokens))
    ttft = image_ttft(model, args.rounds) if model.has_vision else None
    report = {"model": str(model_path), "mmproj": str(mmproj_path) if mmproj_path else None,
              "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
              "ours_tokens_per_s": max(ours), "llama_cpp_tokens_per_s": max(theirs),
              "decode_ratio": max(ours) / max(theirs),
              "decode_ratio_median": statistics.median(ours) / statistics.median(theirs),
              "image_tokens": model.image_tokens or None, "image_ttft_ms": ttft}
    print(f"model: {model_path.name}" + (f" + {mmproj_path.name}" if mmproj_path else "") + f", {args.threads} threads")
    print(f"decode: ours {report['ours_tokens_per_s']:.1f} tok/s, llama-cpp-python Llama.generate "
          f"{report['llama_cpp_tokens_per_s']:.1f} tok/s (best of {args.rounds} x {args.tokens} tokens)")
    print(f"decode ratio ours / llama-cpp-python: {report['decode_ratio']:.3f} (median rounds: "
          f"{report['decode_ratio_median']:.3f}; target >= 0.97)")
    if ttft is not None:
        print(f"image prompt time to first token: {ttft:.1f} ms ({model.image_tokens} image tokens, median)")
    print(json.dumps(report))
    llm.close()
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
