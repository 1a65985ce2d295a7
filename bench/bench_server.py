"""Serving throughput: ``serve --parallel 1`` and ``--parallel 4`` against llama-server ``-np 4``, same run.

The load (issue 13): 8 concurrent clients × 4 requests each, 32 generated tokens per request (greedy,
``ignore_eos`` so every request decodes exactly 32), text prompts; then 4 clients with one image each.
Every request streams, so time to first token is measured the same way for every server; each client
sends its next request when the previous one has finished.

Servers (each a separate process on loopback with the same threads, per-slot context and model file):

* ``medgemma-gguf serve --parallel 1`` — one request at a time (the baseline);
* ``medgemma-gguf serve --parallel 4`` — continuous batching, 4 slots;
* ``llama-server -np 4`` built from llama-cpp-python's vendored llama.cpp (the same llama.cpp the wheel
  runs), once, into ``<cache root>/llama-tools/`` by ``bench_eval_vs_llama.build_llama_tool`` (the build
  that script makes ``llama-perplexity`` with); ``-c`` is its total context: 4 × the per-slot context.

Models: the text load runs on a checkpoint with MedGemma 4B's widths (262208 × 2560 embedding,
2560/10240 layers, 8 heads, 4 KV heads of 256; ``--layers`` of them, random weights) quantized to Q8_0;
the image load on the tiny image+text fixture (its SigLIP tower is tiny; a 4B-width mmproj would take
minutes to build per run). Rounds interleave the servers; medians are reported with the ratios
``parallel 4 / parallel 1`` (target ≥ 2 in tokens/s) and ``parallel 4 / llama-server`` (target ≥ 0.9 in
requests/s).

    .venv/bin/python bench/bench_server.py [--rounds 3] [--layers 2] [--threads 2] [--workdir DIR]
        [--llama-server PATH | --no-llama-server] [--json]
    nice -n 10 .venv/bin/python bench/bench_server.py --rounds 1 --threads 2    # on a shared machine
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from medgemma_gguf.processes import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

Q8_0 = 7  # llama_ftype
QUESTIONS = [
    "What is the normal adult resting heart rate?", "List three common causes of iron deficiency anemia.",
    "Describe the typical presentation of community-acquired pneumonia.", "What does an elevated troponin mean?",
    "Explain the difference between type 1 and type 2 diabetes.", "What are the warning signs of a stroke?",
    "How is hypertension staged in adults?", "What findings suggest a pneumothorax on a chest X-ray?",
]


# --- models --------------------------------------------------------------------------------------------
def wide_model(workdir: Path, layers: int) -> Path:
    """The 4B-width text checkpoint (``bench_convert.build_wide_checkpoint``) as a Q8_0 GGUF, built once."""
    out = workdir / f"wide-{layers}l-Q8_0.gguf"
    if out.is_file():
        return out
    from bench_convert import build_wide_checkpoint

    from medgemma_gguf.convert.converter import convert_checkpoint
    from medgemma_gguf.convert.quantize.llama_quantize import run_llama_quantize

    checkpoint = workdir / f"wide-{layers}l"
    print(f"building the 4B-width checkpoint ({layers} layers) in {checkpoint}", flush=True)
    build_wide_checkpoint(checkpoint, layers)
    converted = convert_checkpoint(str(checkpoint), workdir / f"wide-{layers}l-gguf", outtype="bf16", progress=False,
                                   force=True)
    partial = out.with_suffix(".partial")
    run_llama_quantize(converted.text_path, partial, Q8_0)
    partial.rename(out)
    return out


def image_model(workdir: Path) -> tuple[Path, Path]:
    """The tiny image+text fixture (``bench_runtime.fixture``), Q8_0, and its mmproj."""
    from bench_runtime import fixture

    return fixture(workdir, "mm-k256", "Q8_0")


# --- servers -------------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    log: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        import httpx

        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        with open(self.log, "w") as handle:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(self.command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}); see {self.log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start; see {self.log}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def ours(name: str, model: Path, mmproj: Path | None, parallel: int, args: argparse.Namespace, log: Path) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "medgemma_gguf", "serve", str(model), "--parallel", str(parallel),
               "--threads", str(args.threads), "--ctx", str(args.ctx), "--n-gpu-layers", "0", "--port", str(port),
               "--queue", "64", "--max-tokens-limit", str(args.tokens)]
    if mmproj is not None:
        command += ["--mmproj", str(mmproj)]
    return Server(name, command, port, log)


def llama_server(binary: Path, model: Path, mmproj: Path | None, args: argparse.Namespace, log: Path) -> Server:
    port = free_port()
    command = [str(binary), "-m", str(model), "-np", "4", "-c", str(4 * args.ctx), "-t", str(args.threads),
               "-ngl", "0", "--port", str(port), "--host", "127.0.0.1", "--no-webui"]
    if mmproj is not None:
        command += ["--mmproj", str(mmproj), "--no-mmproj-offload"]
    return Server("llama-server -np 4", command, port, log)


# --- the load ------------------------------------------------------------------------------------------
@dataclass
class Result:
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    problems: list[str] = field(default_factory=list)  # what each failed request saw (status and body, or exception)
    wall: float = 0.0

    def summary(self) -> dict[str, float]:
        done = len(self.latency)

        def pct(values: list[float], q: float) -> float:
            return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (
                values[0] if values else float("nan"))

        return {"requests": done, "errors": self.errors, "wall_s": self.wall,
                "requests_per_s": done / self.wall, "tokens_per_s": self.tokens / self.wall,
                "latency_p50_s": pct(self.latency, 50), "latency_p95_s": pct(self.latency, 95),
                "ttft_p50_s": pct(self.ttft, 50), "ttft_p95_s": pct(self.ttft, 95)}


def image_uri(seed: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def one_request(client, url: str, body: dict, result: Result) -> None:
    started = time.perf_counter()
    first = None
    tokens = deltas = 0  # completion tokens (from usage, at the end); content chunks seen so far
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.errors += 1
                result.problems.append(f"HTTP {response.status_code}: {text[:200]}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        deltas += 1
                        first = first or time.perf_counter()
    except Exception as error:  # noqa: BLE001 - counted and said, the load goes on
        result.errors += 1
        result.problems.append(f"{type(error).__name__} after {time.perf_counter() - started:.1f} s, "
                               f"{deltas} content chunks in: {error!r}")
        return
    end = time.perf_counter()
    result.latency.append(end - started)
    result.ttft.append((first or end) - started)
    result.tokens += tokens


async def run_load(port: int, clients: int, per_client: int, tokens: int, images: bool) -> Result:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    result = Result()

    async def client_loop(client, index: int) -> None:
        for turn in range(per_client):
            question = f"{QUESTIONS[(index + turn) % len(QUESTIONS)]} (case {index}.{turn})"
            content: object = question
            if images:
                content = [{"type": "image_url", "image_url": {"url": image_uri(index)}},
                           {"type": "text", "text": "Describe this image."}]
            body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            await one_request(client, url, body, result)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
        result.wall = time.perf_counter() - started
    return result


def median_summary(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def measure(servers: list[Server], rounds: int, clients: int, per_client: int, tokens: int,
            images: bool) -> dict[str, dict[str, float]]:
    results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    for server in servers:  # warm-up: load pages, first-touch allocations
        asyncio.run(run_load(server.port, 1, 1, 4, images))
    for index in range(rounds):
        for server in servers:
            result = asyncio.run(run_load(server.port, clients, per_client, tokens, images))
            summary = result.summary()
            results[server.name].append(summary)
            print(f"  round {index + 1} {server.name:>22}: {summary['requests_per_s']:.3f} req/s, "
                  f"{summary['tokens_per_s']:.1f} tok/s, p50 {summary['latency_p50_s']:.2f} s, "
                  f"TTFT p50 {summary['ttft_p50_s']:.2f} s, errors {summary['errors']}", flush=True)
            for problem in result.problems:
                print(f"    failed request: {problem}", flush=True)
    return {name: median_summary(rows) for name, rows in results.items()}


def table(title: str, medians: dict[str, dict[str, float]]) -> str:
    lines = [f"{title}", "| server | req/s | tokens/s | p50 latency s | p95 latency s | TTFT p50 s | TTFT p95 s | "
             "errors |", "|---|---|---|---|---|---|---|---|"]
    for name, m in medians.items():
        lines.append(f"| {name} | {m['requests_per_s']:.3f} | {m['tokens_per_s']:.1f} | {m['latency_p50_s']:.2f} | "
                     f"{m['latency_p95_s']:.2f} | {m['ttft_p50_s']:.2f} | {m['ttft_p95_s']:.2f} | "
                     f"{int(m['errors'])} |")
    return "\n".join(lines)


def ratios(medians: dict[str, dict[str, float]]) -> dict[str, float]:
    p1, p4 = medians["serve --parallel 1"], medians["serve --parallel 4"]
    out = {"parallel4_over_parallel1_tokens_per_s": p4["tokens_per_s"] / p1["tokens_per_s"]}
    if "llama-server -np 4" in medians:
        out["parallel4_over_llama_server_requests_per_s"] = (p4["requests_per_s"]
                                                             / medians["llama-server -np 4"]["requests_per_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2, help="layers of the 4B-width text model")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx", type=int, default=512, help="context per slot")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--image-clients", type=int, default=4, help="0: no image load")
    parser.add_argument("--workdir", type=Path, default=None, help="default: <cache root>/bench-server")
    parser.add_argument("--llama-server", type=Path, help="a llama-server binary (default: build it in --workdir)")
    parser.add_argument("--no-llama-server", action="store_true")
    parser.add_argument("--vendor", type=Path, help="llama.cpp's source (default: the llama-cpp-python sdist's)")
    parser.add_argument("--jobs", type=int, default=2, help="build jobs for llama-server")
    parser.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = parser.parse_args(argv)
    from medgemma_gguf.cache import cache_root

    workdir = args.workdir or cache_root() / "bench-server"
    workdir.mkdir(parents=True, exist_ok=True)
    binary = None
    if not args.no_llama_server:
        from bench_eval_vs_llama import VENDOR, build_llama_tool

        binary = args.llama_server or build_llama_tool("llama-server", args.vendor or VENDOR, args.jobs)
    text_path = wide_model(workdir, args.layers)
    image_path, mmproj_path = image_model(workdir)
    report: dict[str, object] = {"threads": args.threads, "ctx_per_slot": args.ctx, "rounds": args.rounds,
                                 "layers": args.layers}
    for phase, model, mmproj, clients, per_client, images in (
            ("text", text_path, None, args.clients, args.requests, False),
            ("image", image_path, mmproj_path, args.image_clients, 1, True)):
        if clients == 0:
            continue
        servers = [ours("serve --parallel 1", model, mmproj, 1, args, workdir / f"{phase}-p1.log"),
                   ours("serve --parallel 4", model, mmproj, 4, args, workdir / f"{phase}-p4.log")]
        if binary is not None:
            servers.append(llama_server(binary, model, mmproj, args, workdir / f"{phase}-llama-server.log"))
        print(f"{phase} load: {clients} clients x {per_client} requests x {args.tokens} tokens on {model.name}",
              flush=True)
        try:
            for server in servers:
                server.start()
            medians = measure(servers, args.rounds, clients, per_client, args.tokens, images)
        finally:
            for server in servers:
                server.stop()
        print(table(f"\n{phase} (medians of {args.rounds} rounds)", medians))
        phase_ratios = ratios(medians)
        for key, value in phase_ratios.items():
            print(f"{key} = {value:.2f}")
        print()
        report[phase] = {"medians": medians, "ratios": phase_ratios}
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
