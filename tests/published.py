"""Folders laid out as the published MedGemma GGUF repositories are (Unsloth, ggml-org, bartowski), made from
the tiny ``mm-k256`` fixture with their file names and no manifest.json.

The quants are written by llama.cpp's quantizer alone (no medgemma-gguf metadata), as the published files
are: their type is only in ``general.file_type`` and the tensor types. Unsloth's ``UD-Q4_K_XL`` is a
``Q4_K_M`` file whose tensor types differ (here: the bundled UD-Q4_K_XL recipe, applied as llama-quantize's
``--tensor-type`` overrides). Used by the layout tests and by the stand-in Hub's repositories.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

LAYOUTS = ("unsloth", "ggml-org", "bartowski")
MODEL = "medgemma-4b-it"


def llama_quantize(source: Path, target: Path, ftype: int, overrides=()) -> Path:
    """``target`` quantized from ``source`` by llama.cpp's own quantizer, nothing else written into it."""
    from medgemma_gguf.convert.quantize.llama_quantize import run_llama_quantize

    run_llama_quantize(source, target, ftype, overrides=overrides, n_threads=1)
    return target


class QuantStore:
    """Every quant the layouts need, made once from the F32 text GGUF and copied into each layout."""

    def __init__(self, folder: Path, text_f32: Path, mmprojs: dict[str, Path]):
        self.folder = Path(folder)
        self.text_f32 = Path(text_f32)
        self.mmprojs = mmprojs  # "F16" / "BF16" / "F32" -> an mmproj of that type
        self._made: dict[str, Path] = {}

    def get(self, label: str) -> Path:
        if label not in self._made:
            import llama_cpp

            from medgemma_gguf.convert.quantize.recipe import builtin_recipe, plan_recipe
            from medgemma_gguf.gguf_info import read_gguf_info

            target = self.folder / f"q-{label}.gguf"
            if label == "UD-Q4_K_XL":
                plan = plan_recipe(builtin_recipe("UD-Q4_K_XL"), read_gguf_info(self.text_f32).tensors)
                llama_quantize(self.text_f32, target, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, plan.overrides)
            else:
                ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{label}")
                llama_quantize(self.text_f32, target, ftype)
            self._made[label] = target
        return self._made[label]

    def place(self, label: str, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        source = self.mmprojs[label[len("mmproj:"):]] if label.startswith("mmproj:") else self.get(label)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy(source, target)
        return target


def legacy_imatrix(path: Path) -> Path:
    """A small importance matrix in llama.cpp's legacy format (bartowski's ``.imatrix``): not a GGUF."""
    name = b"blk.0.attn_q.weight"
    values = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    path.write_bytes(struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 1, 4) + values)
    return path


def make_layout(kind: str, folder: Path, store: QuantStore) -> Path:
    """``folder`` laid out as ``kind`` publishes MedGemma (see the module docstring); returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "unsloth":  # unsloth/medgemma-4b-it-GGUF
        files = {f"{MODEL}-Q4_K_M.gguf": "Q4_K_M", f"{MODEL}-UD-Q4_K_XL.gguf": "UD-Q4_K_XL",
                 f"{MODEL}-Q8_0.gguf": "Q8_0", "mmproj-F16.gguf": "mmproj:F16", "mmproj-BF16.gguf": "mmproj:BF16",
                 "mmproj-F32.gguf": "mmproj:F32"}
    elif kind == "ggml-org":  # ggml-org/gemma-3-4b-it-GGUF's pattern
        files = {f"{MODEL}-Q4_K_M.gguf": "Q4_K_M", f"{MODEL}-Q8_0.gguf": "Q8_0", f"{MODEL}-f16.gguf": "F16",
                 "mmproj-model-f16.gguf": "mmproj:F16"}
    elif kind == "bartowski":  # bartowski/google_medgemma-4b-it-GGUF
        files = {f"google_{MODEL}-Q4_K_M.gguf": "Q4_K_M", f"google_{MODEL}-Q6_K.gguf": "Q6_K",
                 f"mmproj-google_{MODEL}-f16.gguf": "mmproj:F16"}
        legacy_imatrix(folder / f"google_{MODEL}.imatrix")
    else:
        raise ValueError(kind)
    for name, label in files.items():
        store.place(label, folder / name)
    return folder


def native_pixels(size: int, seed: int):
    """A smooth random RGB image (uint8 array) at the model's native size."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [np.sin(2 * np.pi * (x * rng.uniform(1, 4) + y * rng.uniform(1, 4)) + rng.uniform(0, 6))
                for _ in range(3)]
    return ((np.stack(channels, axis=-1) * 0.5 + 0.5) * 255).clip(0, 255).astype(np.uint8)


def save_png(pixels, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(pixels).save(path)
    return path

