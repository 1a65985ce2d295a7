"""Runtime speed: decode tokens/s of ``ChatModel.generate`` against a raw llama-cpp-python loop with the same
sampler chain, at MedGemma's real 262,208-row vocabulary and at the tiny 1k one; and the time to first
token of an image prompt.

For each fixture and each sampler setting — greedy, and top-k 64 / top-p 0.95 / temperature 1 (MedGemma's
generation defaults) with a fixed seed — both decoders run in the same process on the same loaded model
(two llama.cpp contexts with the same threads, context and batch sizes), ``--tokens`` tokens each (end of
turn ignored, so both decode the same count):

* ours: ``ChatModel.generate(prompt, ignore_eos=True, ...)`` — N samples through the request's llama.cpp
  sampler chain, N-1 single-token decodes, and the reply's text (UTF-8, stop strings, reasoning split);
* raw: llama-cpp-python's C API in the plainest loop — ``llama_sampler_sample`` on a chain built by hand
  with the same samplers, ``llama_decode`` of a one-token batch. Its prompt is evaluated as ours is (the
  last token alone), so with the same seed both draw the same tokens; the script checks that.

The two loops run interleaved token by token (one raw step inside each of ours, through ``generate``'s
``should_stop`` hook, timed apart), so whatever else the machine is doing falls on both alike. Steps are
timed with the wall clock or, with ``--clock cpu``, the main thread's CPU time (with ``--threads 1``
llama.cpp computes on that thread alone). Repeated ``--rounds`` times; printed: the medians, ``ratio =
ours / raw`` (the median of the rounds' ratios; goal >= 0.97), and one JSON line.

The harness is not perfectly even-handed: the two contexts' buffers sit in different memory and the steps
share the caches in a fixed order. Each round therefore also runs a control — the raw loop itself in ours'
place, on ChatModel's context, against the same reference — and ``controlled = ratio / control`` compares
``ChatModel.generate`` with the raw loop on the same context in the same slot.

The loop's own cost is measured apart too: the same ``generate`` with llama.cpp's sampling and decoding
replaced by no-ops (replaying the tokens drawn), in CPU time per token; against the raw loop's time per
token it bounds the ratio from below, whatever the noise.

The fixtures are built, converted and quantized here (``--quant``, default Q4_K_M) in ``--workdir``,
once: the tiny ``mm-k256`` (1,088-row vocabulary) and ``mm-vocab262k`` (the same widths with MedGemma's
padded vocabulary: every token's logits cost what the real model's do).

    .venv/bin/python bench/bench_runtime.py --threads 2 [--tokens 96] [--rounds 5]
    .venv/bin/python bench/bench_runtime.py --threads 1 --clock cpu --rounds 9    # on a shared machine
    .venv/bin/python bench/bench_runtime.py --model X.gguf --mmproj Y.gguf     # any GGUF instead
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

FIXTURES = {"1k": "mm-k256", "262k": "mm-vocab262k"}
CASES = {"greedy": {"temperature": 0.0},
         "top-k 64 / top-p 0.95 / temp 1": {"temperature": 1.0, "top_k": 64, "top_p": 0.95, "seed": 1234}}
QUESTION = [{"role": "user", "content": "What is the normal adult resting heart rate?"}]
CLOCK = time.perf_counter  # --clock cpu: time.thread_time


def fixture(workdir: Path, variant: str, quant: str) -> tuple[Path, Path]:
    """Build, convert and quantize (once per workdir) a tiny fixture; its text GGUF and mmproj."""
    from medgemma_gguf.convert.converter import convert_checkpoint
    from medgemma_gguf.convert.quantize.llama_quantize import quantize_file, resolve_quants
    from medgemma_gguf.fixtures.tiny_checkpoint import build_tiny_checkpoint

    checkpoint, out = workdir / f"ckpt-{variant}", workdir / f"gguf-{variant}"
    if not (checkpoint / "config.json").is_file():
        build_tiny_checkpoint(checkpoint, variant)
    if not out.is_dir():
        convert_checkpoint(str(checkpoint), out, outtype="f32", mmproj_type="f32", progress=False)
    source = next(out.glob(f"ckpt-{variant}-F32.gguf"))
    mmproj = next(out.glob("mmproj-*.gguf"))
    if quant.upper() == "F32":
        return source, mmproj
    target = out / f"ckpt-{variant}-{quant.upper()}.gguf"
    if not target.is_file():
        quantize_file(source, target, resolve_quants([quant])[0], progress=False)
    return target, mmproj


class RawLoop:
    """llama-cpp-python's C API in the plainest decode loop — sample, decode one token — on a second context
    of the model ``ChatModel`` loaded (same weights; its own KV cache)."""

    def __init__(self, engine, n_threads: int, *, own_context: bool = True):
        import llama_cpp

        self.lc = llama_cpp
        self.own_context = own_context
        if own_context:
            params = llama_cpp.llama_context_default_params()
            params.n_ctx, params.n_batch, params.n_ubatch = engine.n_ctx, engine.n_batch, engine.n_ubatch
            params.n_threads = params.n_threads_batch = n_threads
            self.ctx = llama_cpp.llama_init_from_model(llama_cpp.llama_get_model(engine.llama_context), params)
        else:  # the engine's own context (the control below)
            self.ctx = engine.llama_context
        self.token = (llama_cpp.llama_token * 1)()
        self.chain = None
        self.tokens: list[int] = []
        self.seconds = 0.0

    def start(self, prompt_ids: list[int], settings: dict) -> None:
        """Evaluate the prompt (its last token alone, as ChatModel does) and build the chain."""
        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        for ids in (prompt_ids[:-1], prompt_ids[-1:]):
            array = (lc.llama_token * len(ids))(*ids)
            if lc.llama_decode(self.ctx, lc.llama_batch_get_one(array, len(ids))) != 0:
                raise RuntimeError("llama_decode failed")
        params = lc.llama_sampler_chain_default_params()
        params.no_perf = True
        self.chain = lc.llama_sampler_chain_init(params)
        if settings["temperature"] == 0:
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_greedy())
        else:
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_top_k(settings["top_k"]))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_top_p(settings["top_p"], 1))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_temp(settings["temperature"]))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_dist(settings["seed"]))
        self.tokens, self.seconds = [], 0.0

    def sample(self) -> None:
        """One sample (timed)."""
        started = CLOCK()
        self.token[0] = self.lc.llama_sampler_sample(self.chain, self.ctx, -1)
        self.seconds += CLOCK() - started
        self.tokens.append(self.token[0])

    def step(self) -> None:
        """One sample and the decode of the sampled token (timed)."""
        lc, token = self.lc, self.token
        started = CLOCK()
        token[0] = lc.llama_sampler_sample(self.chain, self.ctx, -1)
        lc.llama_decode(self.ctx, lc.llama_batch_get_one(token, 1))
        self.seconds += CLOCK() - started
        self.tokens.append(token[0])

    def decode_last(self) -> None:
        """Decode the token sampled last (timed)."""
        started = CLOCK()
        self.lc.llama_decode(self.ctx, self.lc.llama_batch_get_one(self.token, 1))
        self.seconds += CLOCK() - started

    def finish(self) -> None:
        self.lc.llama_sampler_free(self.chain)

    def close(self) -> None:
        if self.own_context:
            self.lc.llama_free(self.ctx)


def interleaved(model, raw: RawLoop, prompt, prompt_ids: list[int], settings: dict,
                n_tokens: int) -> tuple[float, float, bool]:
    """Tokens/s of ours and of the raw loop, run step by step together; whether they drew the same tokens."""
    model.reset()
    raw.start(prompt_ids, settings)
    inside = 0.0  # time spent in the hook (the raw step included), taken out of ours

    def hook() -> bool:  # called once per token of ours, before its decode
        nonlocal inside
        entered = CLOCK()
        raw.step()
        inside += CLOCK() - entered
        return False

    stream = model.generate(prompt, max_tokens=n_tokens, ignore_eos=True, should_stop=hook, **settings)
    started = CLOCK()
    result = stream.collect()
    ours_seconds = CLOCK() - started - inside
    raw.sample()  # the raw loop's last sample (ours ended on its N-th sample too)
    raw.finish()
    assert result.completion_tokens == n_tokens == len(raw.tokens)
    return (n_tokens - 1) / ours_seconds, (n_tokens - 1) / raw.seconds, result.token_ids == raw.tokens


def control(model, twin: RawLoop, raw: RawLoop, prompt_ids: list[int], settings: dict, n_tokens: int) -> float:
    """The harness measuring itself: the raw loop on ChatModel's context in ours' place (same interleaving)
    against the raw loop on the second context; their speed ratio (1 for an even-handed harness)."""
    model.reset()
    twin.start(prompt_ids, settings)
    raw.start(prompt_ids, settings)
    twin.sample()
    for _ in range(n_tokens - 1):
        raw.step()
        twin.decode_last()
        twin.sample()
    raw.sample()
    twin.finish()
    raw.finish()
    model.reset()  # the twin left the engine's cache unaccounted for
    return raw.seconds / twin.seconds


def loop_cost_us(model, prompt, tokens: list[int], n_tokens: int) -> float:
    """Microseconds per token that ChatModel's decode loop spends outside llama.cpp: the same ``generate``
    with llama.cpp's sampling and decoding replaced by no-ops (the stub replays ``tokens``, so the reply's
    text is built as in the real run)."""
    class Replay:
        def __init__(self):
            self.i = -1

        def sample(self) -> int:
            self.i += 1
            return tokens[self.i % len(tokens)]

        def close(self) -> None:
            pass

    engine = model.engine
    engine.new_sampler, engine.decode_next = lambda *_args, **_kwargs: Replay(), lambda _token: None
    try:
        model.reset()
        stream = model.generate(prompt, max_tokens=n_tokens, ignore_eos=True)
        started = time.thread_time()
        stream.collect()
        return (time.thread_time() - started) / n_tokens * 1e6
    finally:
        del engine.new_sampler, engine.decode_next  # the class's methods again
        model.reset()


def image_ttft(model, rounds: int) -> float:
    """Median ms from a cleared cache to the first token of a one-image prompt."""
    import numpy as np

    image = np.random.default_rng(0).integers(0, 256, size=(model.image_size, model.image_size, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                             {"type": "image", "image": image}]}]
    times = []
    for _ in range(rounds):
        model.reset()
        times.append(model.chat(messages, max_tokens=1).timings["time_to_first_token_ms"])
    return statistics.median(times)


def bench_file(label: str, model_path: Path, mmproj_path: Path | None, args: argparse.Namespace) -> list[dict]:
    from medgemma_gguf.runtime.chat import load

    model = load(model_path, mmproj_path, n_gpu_layers=args.n_gpu_layers, n_ctx=args.ctx, n_threads=args.threads)
    prompt = model.prompt(QUESTION)
    prompt_ids = prompt.flat_ids(-1)
    raw = RawLoop(model.engine, args.threads)
    twin = RawLoop(model.engine, args.threads, own_context=False)
    rows = []
    try:
        for case, settings in CASES.items():
            interleaved(model, raw, prompt, prompt_ids, settings, min(8, args.tokens))  # warm up
            mine, theirs, controls, same = [], [], [], True
            for _ in range(args.rounds):
                ours_speed, raw_speed, same_tokens = interleaved(model, raw, prompt, prompt_ids, settings,
                                                                 args.tokens)
                mine.append(ours_speed)
                theirs.append(raw_speed)
                same = same and same_tokens
                controls.append(control(model, twin, raw, prompt_ids, settings, args.tokens))
            raw_us = 1e6 / statistics.median(theirs)
            cost = loop_cost_us(model, prompt, raw.tokens, 20 * args.tokens)
            ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
            rows.append({"fixture": label, "model": model_path.name, "vocab": model.engine.n_vocab, "case": case,
                         "ours_tok_s": statistics.median(mine), "raw_tok_s": statistics.median(theirs),
                         "ratio": statistics.median(ratios), "control": statistics.median(controls),
                         "ratio_controlled": statistics.median(r / c for r, c in zip(ratios, controls, strict=True)),
                         "same_tokens": same, "loop_cost_us": cost, "raw_us_per_token": raw_us,
                         "ratio_bound": raw_us / (raw_us + cost)})
        if model.has_vision:
            rows.append({"fixture": label, "model": model_path.name, "case": "image time to first token",
                         "image_tokens": model.image_tokens, "ttft_ms": image_ttft(model, args.rounds)})
    finally:
        raw.close()
        model.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a text GGUF instead of the fixtures")
    parser.add_argument("--mmproj", type=Path, help="its mmproj (image time to first token)")
    parser.add_argument("--fixtures", default="1k,262k", help="which fixtures: 1k, 262k (comma-separated)")
    parser.add_argument("--quant", default="Q4_K_M", help="quantize the fixtures to this type (F32: as converted)")
    parser.add_argument("--tokens", type=int, default=96, help="tokens per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock, or the main thread's CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "medgemma-bench-runtime")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter

    if args.model is not None:
        files = [(args.model.stem, args.model, args.mmproj)]
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        files = [(name, *fixture(args.workdir, FIXTURES[name], args.quant)) for name in args.fixtures.split(",")]
    rows = []
    for label, model_path, mmproj_path in files:
        rows += bench_file(label, model_path, mmproj_path, args)
    print(f"{args.threads} threads, {args.clock} clock, {args.tokens} tokens x {args.rounds} rounds (medians; ratio "
          "goal >= 0.97)")
    for row in rows:
        if "ttft_ms" in row:
            print(f"{row['fixture']:>5}  image prompt time to first token: {row['ttft_ms']:.1f} ms "
                  f"({row['image_tokens']} image tokens)")
            continue
        print(f"{row['fixture']:>5}  {row['case']:<32} ours {row['ours_tok_s']:8.1f} tok/s  raw loop "
              f"{row['raw_tok_s']:8.1f} tok/s  ratio {row['ratio']:.3f} (control {row['control']:.3f}: "
              f"controlled {row['ratio_controlled']:.3f})  same tokens: {'yes' if row['same_tokens'] else 'NO'}")
        print(f"{'':>5}  {'':<32} ours outside llama.cpp {row['loop_cost_us']:.1f} us/token of "
              f"{row['raw_us_per_token']:.0f}: ratio >= {row['ratio_bound']:.4f}")
    print(json.dumps({"threads": args.threads, "clock": args.clock, "tokens": args.tokens, "rounds": args.rounds,
                      "quant": args.quant, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

