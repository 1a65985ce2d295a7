"""Conversion speed and peak memory on a checkpoint with MedGemma 4B's real widths.

Builds (once, cached under --workdir) a text-only Gemma 3 checkpoint with the 4B's widths — a
262208 x 2560 embedding, 2560/10240 layers — and a few layers, then converts it to BF16 in a child
process while sampling its memory.  Prints peak anonymous memory divided by the largest tensor
(the streaming target: about 1x, not the model size), and, when --llama-cpp-dir points at llama.cpp's
source (e.g. the llama-cpp-python sdist's vendor/llama.cpp), the same run of llama.cpp's own
convert_hf_to_gguf.py as the baseline: time and memory ratios ours / theirs.

    .venv/bin/python bench/bench_convert.py [--layers 2] [--llama-cpp-dir PATH] [--adapter-rank 16]

With ``--adapter-rank R`` it also converts with a PEFT LoRA adapter merged (every linear layer, rank R)
and prints its time and memory against the plain conversion of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REAL_4B = {"hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8, "num_key_value_heads": 4,
           "head_dim": 256, "vocab_size": 262208}


def build_wide_checkpoint(folder: Path, layers: int) -> int:
    """A Gemma3ForCausalLM checkpoint at the 4B's widths; returns the largest tensor's bytes."""
    import torch
    from safetensors.torch import save_file

    from medgemma_gguf.fixtures.tiny_checkpoint import build_tiny_checkpoint

    if (folder / "config.json").is_file():
        return REAL_4B["vocab_size"] * REAL_4B["hidden_size"] * 2
    tiny = folder.with_name(folder.name + "-tokenizer")
    build_tiny_checkpoint(tiny, "text")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        if (tiny / name).is_file():
            shutil.copy(tiny / name, folder / name)
    config = json.loads((tiny / "config.json").read_text())
    config.update(REAL_4B, num_hidden_layers=layers, query_pre_attn_scalar=REAL_4B["head_dim"])
    config.pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    h, ff, hd = REAL_4B["hidden_size"], REAL_4B["intermediate_size"], REAL_4B["head_dim"]
    q, kv = REAL_4B["num_attention_heads"] * hd, REAL_4B["num_key_value_heads"] * hd
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(REAL_4B["vocab_size"], h), "model.norm.weight": rand(h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
                        p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
                        p + "self_attn.q_norm.weight": rand(hd), p + "self_attn.k_norm.weight": rand(hd),
                        p + "mlp.gate_proj.weight": rand(ff, h), p + "mlp.up_proj.weight": rand(ff, h),
                        p + "mlp.down_proj.weight": rand(h, ff)})
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            tensors[p + norm + ".weight"] = rand(h)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return max(t.numel() * t.element_size() for t in tensors.values())


def build_adapter(folder: Path, layers: int, rank: int) -> int:
    """A PEFT LoRA adapter (rsLoRA, float32 A/B as PEFT saves them) on every linear layer of the wide
    checkpoint; returns the bytes of the largest adapted tensor in float32."""
    import torch
    from safetensors.torch import save_file

    if (folder / "adapter_config.json").is_file():
        return REAL_4B["intermediate_size"] * REAL_4B["hidden_size"] * 4
    folder.mkdir(parents=True, exist_ok=True)
    h, ff, hd = REAL_4B["hidden_size"], REAL_4B["intermediate_size"], REAL_4B["head_dim"]
    q, kv = REAL_4B["num_attention_heads"] * hd, REAL_4B["num_key_value_heads"] * hd
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (ff, h), "mlp.up_proj": (ff, h), "mlp.down_proj": (h, ff)}
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for module, (out_features, in_features) in shapes.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            tensors[key + ".lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * 0.01
            tensors[key + ".lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_rslora": True, "bias": "none",
              "target_modules": sorted(m.split(".")[1] for m in shapes), "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return max(o * i for o, i in shapes.values()) * 4


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) of a process in kB, or (0, 0) once it is gone."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "VmRSS"):
                    values[key] = int(rest.split()[0])
    except FileNotFoundError:
        return 0, 0
    return values.get("RssAnon", 0), values.get("VmRSS", 0)


def measure(command: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall time and peak anonymous / total resident memory of a child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks = [0, 0]

    def sample():
        while process.poll() is None:
            anon, rss = _memory_kb(process.pid)
            peaks[0], peaks[1] = max(peaks[0], anon), max(peaks[1], rss)
            time.sleep(0.02)

    thread = threading.Thread(target=sample)
    thread.start()
    _, err = process.communicate()
    thread.join()
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{err.decode()[-2000:]}")
    return {"seconds": time.perf_counter() - start, "peak_anon_mb": peaks[0] / 1024, "peak_rss_mb": peaks[1] / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medgemma-gguf-bench"))
    parser.add_argument("--llama-cpp-dir", type=Path, help="llama.cpp source with convert_hf_to_gguf.py")
    parser.add_argument("--adapter-rank", type=int, default=0,
                        help="Also convert with a rank-R LoRA adapter merged into every linear layer.")
    args = parser.parse_args()

    checkpoint = args.workdir / f"wide-{args.layers}L"
    largest = build_wide_checkpoint(checkpoint, args.layers)
    model_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    out = args.workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    idle = measure([sys.executable, "-c", "import convert.converter, torch"])
    ours = measure([sys.executable, "-m", "medgemma_gguf", "convert", str(checkpoint), "--outdir", str(out / "ours"),
                    "--outtype", "bf16", "--quiet"])
    print(f"checkpoint: {model_bytes / 1e9:.2f} GB bf16, largest tensor {largest / 1e6:.0f} MB")
    print(f"process baseline (imports only): {idle['peak_anon_mb']:.0f} MB anon")
    growth = ours["peak_anon_mb"] - idle["peak_anon_mb"]
    print(f"medgemma-gguf convert: {ours['seconds']:.1f} s, peak anon {ours['peak_anon_mb']:.0f} MB "
          f"(+{growth:.0f} MB over imports = {growth * 1e6 / 1.048576 / largest:.2f}x the largest tensor, "
          f"{growth * 1.048576e6 / model_bytes:.2f}x the model), peak RSS incl. mmapped file pages "
          f"{ours['peak_rss_mb']:.0f} MB")
    if args.adapter_rank:
        adapter = args.workdir / f"adapter-{args.layers}L-r{args.adapter_rank}"
        largest_adapted = build_adapter(adapter, args.layers, args.adapter_rank)
        merged = measure([sys.executable, "-m", "medgemma_gguf", "convert", str(checkpoint), "--adapter", str(adapter),
                          "--outdir", str(out / "merged"), "--outtype", "bf16", "--quiet"])
        merged_growth = merged["peak_anon_mb"] - idle["peak_anon_mb"]
        print(f"medgemma-gguf convert --adapter (rank {args.adapter_rank}, every linear layer): "
              f"{merged['seconds']:.1f} s, peak anon {merged['peak_anon_mb']:.0f} MB (+{merged_growth:.0f} MB over "
              f"imports = {merged_growth * 1.048576e6 / largest_adapted:.2f}x the largest adapted tensor in float32)")
        print(f"ratios merged/plain: time {merged['seconds'] / ours['seconds']:.2f}, "
              f"peak anon {merged['peak_anon_mb'] / ours['peak_anon_mb']:.2f}")
    if args.llama_cpp_dir:
        env = dict(os.environ, PYTHONPATH=str(args.llama_cpp_dir / "gguf-py"))
        theirs = measure([sys.executable, str(args.llama_cpp_dir / "convert_hf_to_gguf.py"), str(checkpoint),
                          "--outtype", "bf16", "--outfile", str(out / "llama-cpp.gguf")], env=env)
        print(f"llama.cpp convert_hf_to_gguf.py: {theirs['seconds']:.1f} s, peak anon {theirs['peak_anon_mb']:.0f} MB")
        print(f"ratios ours/llama.cpp: time {ours['seconds'] / theirs['seconds']:.2f}, "
              f"peak anon {ours['peak_anon_mb'] / theirs['peak_anon_mb']:.2f}")


if __name__ == "__main__":
    main()
