"""The ``README.md`` model card of an output folder, generated from its ``manifest.json`` and GGUF headers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medgemma_gguf.atomic import write_text_atomic
from medgemma_gguf.gguf_info import read_gguf_info
from medgemma_gguf.manifest import Manifest

CARD_NAME = "README.md"
BPW_NOTE = ("Bits per weight = 8 × bytes of the quantizable tensors (the 2-D+ weight matrices: token embedding, "
            "attention and feed-forward) / their number of weights; the F32 norms are not counted. Size is the "
            "whole file.")


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes} B"


def _license_lines(metadata: dict[str, Any]) -> list[str]:
    license_id = metadata.get("general.license")
    name = metadata.get("general.license.name")
    link = metadata.get("general.license.link")
    if not (license_id or name or link):
        return ["The source declared no license. Check the original model's terms before using or sharing "
                "these files."]
    label = name or license_id
    text = f"These files are derived from the source model and are subject to its license: **{label}**"
    if license_id and name and license_id != name:
        text += f" (`{license_id}`)"
    text += f" — {link}." if link else "."
    return [text, "", "Read and accept those terms before using or redistributing these files."]


def _adapter_lines(adapter: dict[str, Any] | None) -> list[str]:
    """What the card says about a LoRA adapter merged at conversion (the manifest's ``source.adapter``)."""
    if not adapter:
        return []
    where = f"`{adapter.get('repo_or_path')}`" + (f" (revision `{adapter['revision']}`)" if adapter.get("revision")
                                                  else "")
    scaling = "rsLoRA, alpha/√r" if adapter.get("use_rslora") else "alpha/r"
    return [f"Fine-tuned: the LoRA adapter {where} (rank {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, "
            f"{scaling}; weights sha256 `{adapter.get('sha256')}`) is merged into these weights.", ""]


def render_model_card(folder: Path, manifest: Manifest) -> str:
    """The model card text for ``folder``."""
    folder = Path(folder)
    texts = manifest.present(folder, "text")
    mmprojs = manifest.present(folder, "mmproj")
    imatrices = manifest.present(folder, "imatrix")
    metadata = read_gguf_info(folder / texts[0].path).metadata if texts else {}
    source = manifest.source.get("repo_or_path", "unknown")
    revision = manifest.source.get("revision")
    lines = [f"# {manifest.model} — GGUF", "",
             f"GGUF files of `{source}`{f' (revision `{revision}`)' if revision else ''}, converted and quantized "
             "with medgemma-gguf using llama.cpp's quantizer. The text model and the vision projector (mmproj) "
             "are separate files; image input needs both.", "", *_adapter_lines(manifest.source.get("adapter")),
             "## License", "", *_license_lines(metadata), "",
             "## Files", "", "| File | Role | Type | Size | Bits per weight | Notes |", "|---|---|---|---|---|---|"]
    for row in sorted(texts, key=lambda r: -float(r.bits_per_weight or _bpw(folder / r.path))):
        notes = []
        if row.recipe:
            notes.append(f"recipe {row.recipe}")
        if row.imatrix:
            notes.append(f"imatrix {row.imatrix}")
        if row.fallbacks:
            notes.append(f"{len(row.fallbacks)} tensor(s) fell back to another type")
        bpw = row.bits_per_weight or _bpw(folder / row.path)
        lines.append(f"| `{row.path}` | text | {row.type} | {_size(row.bytes)} | {float(bpw):.2f} | "
                     f"{'; '.join(notes)} |")
    for row in mmprojs:
        lines.append(f"| `{row.path}` | mmproj (vision) | {row.type} | {_size(row.bytes)} | | |")
    for row in imatrices:
        lines.append(f"| `{row.path}` | imatrix | {row.type} | {_size(row.bytes)} | | importance matrix |")
    lines += ["", BPW_NOTE, ""]
    example = min(texts, key=lambda r: abs(float(r.bits_per_weight or 16) - 4.8), default=None)
    model = example.path if example else f"{manifest.model}-Q4_K_M.gguf"
    mmproj = mmprojs[0].path if mmprojs else None
    lines += ["## Run", "", "With medgemma-gguf (picks the best quant that fits when given the folder):", "",
              "```sh", f"medgemma-gguf chat {folder.name} --quant {example.type if example else 'Q4_K_M'}"
              + (" --image xray.png" if mmproj else "") + " --prompt \"Describe this X-ray\"",
              f"medgemma-gguf chat {folder.name}/{model}" + (f" --mmproj {folder.name}/{mmproj}" if mmproj else ""),
              "```", ""]
    if mmproj:
        lines += ["With llama.cpp:", "", "```sh",
                  f"llama-mtmd-cli -m {model} --mmproj {mmproj} --image xray.png -p \"Describe this X-ray\"",
                  "```", ""]
    else:
        lines += ["With llama.cpp:", "", "```sh", f"llama-cli -m {model} -cnv", "```", ""]
    lines += ["MedGemma is not a medical device: its outputs need review by a qualified professional.", ""]
    return "\n".join(lines)


def _bpw(path: Path) -> float:
    return read_gguf_info(path).bits_per_weight


def write_model_card(folder: Path, manifest: Manifest | None = None) -> Path:
    """Write ``folder/README.md`` (atomically, replacing the previous card)."""
    folder = Path(folder)
    manifest = manifest or Manifest.load(folder)
    target = folder / CARD_NAME
    write_text_atomic(target, render_model_card(folder, manifest), force=True)
    return target
