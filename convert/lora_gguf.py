"""PEFT LoRA adapter -> GGUF LoRA adapter in llama.cpp's format (``medgemma-gguf convert-adapter``).

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes and ``llama_adapter_lora_init`` reads:
``general.architecture = gemma3``, ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha`` (float32), no hyperparameters or vocabulary, and for each adapted base tensor
``<gguf name>.lora_a`` (PEFT's A, numpy ``(r, in)``, ggml ne ``[in, r]``) and ``<gguf name>.lora_b``
(PEFT's B, numpy ``(out, r)``, ggml ne ``[r, out]``), untransposed.

Scale. llama.cpp multiplies ``B·A`` by ``user_scale · alpha / r`` with ``r = lora_b.ne[0]`` (the
tensor's rank) — it has no rsLoRA, and its converter ignores ``use_rslora``. Here ``alpha`` is written
so that ``alpha / r`` is PEFT's scale: ``lora_alpha · sqrt(r)`` with rsLoRA (``√r`` folded into alpha);
when ranks or ``alpha_pattern`` make the per-tensor scales disagree with one alpha, the remaining factor
is folded into that tensor's B. At scale 1 the adapter computes exactly PEFT's ``scale · B·A``.

Refused, naming the fix (merge with ``convert BASE --adapter ADAPTER``): vision-tower targets (libmtmd,
which runs the mmproj, cannot apply LoRA), embedding LoRA (llama.cpp shares Gemma 3's embedding with the
output matrix and would apply the embedding adapter there in the wrong orientation) and
``modules_to_save`` copies (not LoRA). An adapter whose names or shapes are not the base's is refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch
from gguf import GGMLQuantizationType

from medgemma_gguf.atomic import StagedOutputs
from medgemma_gguf.convert.config import read_config
from medgemma_gguf.convert.converter import expected_shapes
from medgemma_gguf.convert.gguf_stream import PlannedTensor, write_gguf
from medgemma_gguf.convert.metadata import TEXT_ARCH
from medgemma_gguf.convert.peft_adapter import LoraPair, PeftAdapter
from medgemma_gguf.convert.tensor_types import ADAPTER_OUTTYPES, F16, FILE_TYPES, Q8_0, parse_outtype, type_label
from medgemma_gguf.errors import InputError, MismatchError, NotFoundError, setting
from medgemma_gguf.gguf_info import read_gguf_info
from medgemma_gguf.hub import resolve_source
from medgemma_gguf.integrity import record_then_commit, recover_folder
from medgemma_gguf.manifest import MANIFEST_NAME, Manifest, entry_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseShapes:
    """What an adapter is checked against: the base's tensor shapes (PyTorch order) and where they came from."""

    description: str  # how errors name the base
    shapes: dict[str, tuple[int, ...]]
    record: dict[str, Any]  # what the manifest records about the base


@dataclass(frozen=True)
class AdapterResult:
    name: str
    path: Path
    manifest_path: Path
    alpha: float


def base_shapes(base: str, *, token: str | None = None, revision: str | None = None) -> BaseShapes:
    """The base model's text tensor shapes from a GGUF file, a medgemma-gguf output folder, a checkpoint
    folder (its config.json) or a Hub repo id (only config.json is downloaded)."""
    path = Path(base).expanduser()
    if path.is_file():
        return _gguf_shapes(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / MANIFEST_NAME).is_file():
        texts = Manifest.load(path).present(path, "text")
        if not texts:
            raise NotFoundError(f"{path / MANIFEST_NAME} lists no text GGUF; pass the base GGUF file to "
                                f"{setting('base')}")
        return _gguf_shapes(path / texts[0].path)
    resolved = resolve_source(base, token=token, revision=revision, patterns=["config.json"],
                              what="the base checkpoint folder (with config.json), a base GGUF file")
    if not (resolved.folder / "config.json").is_file():
        raise NotFoundError(f"{resolved.folder} has no config.json; {setting('base')} takes the base GGUF file, its "
                            "medgemma-gguf output folder, or the base checkpoint (folder or Hub repo id)")
    config = read_config(resolved.folder)
    shapes = expected_shapes(config)
    shapes.setdefault("output.weight", shapes["token_embd.weight"])
    return BaseShapes(resolved.repo_or_path, shapes,
                      {"repo_or_path": resolved.repo_or_path, "revision": resolved.revision})


def _gguf_shapes(path: Path) -> BaseShapes:
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise InputError(f"{path} is not a GGUF file; {setting('base')} takes the base GGUF, folder or checkpoint")
    info = read_gguf_info(path)
    if info.architecture != TEXT_ARCH:
        hint = " (an mmproj: pass the text model)" if info.architecture == "clip" else ""
        raise MismatchError(f"{path} is a {info.architecture or 'non-model'} GGUF{hint}; a Gemma 3 LoRA adapter needs "
                            "the gemma3 text model as its base")
    shapes = {t.name: tuple(reversed(t.shape)) for t in info.tensors}
    shapes.setdefault("output.weight", shapes["token_embd.weight"])
    return BaseShapes(str(path), shapes, {"gguf": path.name, "general.name": info.metadata.get("general.name")})


def _merge_fix(adapter: PeftAdapter) -> str:
    return f"merge it into the model instead: medgemma-gguf convert BASE --adapter {adapter.repo_or_path}"


def refuse_vision(adapter: PeftAdapter) -> None:
    """InputError for vision-tower targets: libmtmd cannot apply LoRA to the mmproj (merge instead)."""
    vision = adapter.vision_pairs
    if vision:
        raise InputError(f"the adapter changes the vision tower ({len(vision)} module(s), e.g. {vision[0].module}); "
                         f"llama.cpp cannot apply LoRA to the mmproj at run time; {_merge_fix(adapter)}")


def refuse_runtime_unsupported(adapter: PeftAdapter) -> None:
    """InputError for what llama.cpp cannot apply at run time, with the fix (merge instead)."""
    refuse_vision(adapter)
    merge = _merge_fix(adapter)
    embedding = [p.module for p in adapter.pairs if p.embedding]
    if embedding:
        raise InputError(f"the adapter puts a LoRA on {embedding[0]}; llama.cpp shares Gemma 3's embedding with "
                         f"the output matrix and cannot apply it there; {merge}")
    if adapter.replacements:
        names = ", ".join(sorted({r.module for r in adapter.replacements}))
        raise InputError(f"the adapter saves full copies of {names} (modules_to_save), which a LoRA file cannot "
                         f"carry; {merge}")


def alpha_and_factors(pairs: list[LoraPair]) -> tuple[float, dict[str, float]]:
    """One ``adapter.lora.alpha`` and a per-tensor factor for B such that ``factor · alpha / r`` is each
    pair's PEFT scale (factors are 1 when all pairs share ``scale · r``, the usual case)."""
    products = Counter(round(p.scale * p.rank, 6) for p in pairs)
    alpha = products.most_common(1)[0][0]
    factors = {p.gguf_name: p.scale * p.rank / alpha for p in pairs}
    return alpha, {name: f for name, f in factors.items() if abs(f - 1.0) > 1e-9}


class _AdapterTensors:
    """``write_gguf``'s source: A as stored, B times its factor, in float32."""

    def __init__(self, adapter: PeftAdapter, sources: dict[str, tuple[str, float]]):
        self.adapter = adapter
        self.sources = sources

    def load(self, name: str) -> torch.Tensor:
        key, factor = self.sources[name]
        data = self.adapter.load(key)
        return data * factor if factor != 1.0 else data


def _tensor_type(shape: tuple[int, ...], outtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """Q8_0 only for rows that are whole blocks; F16 otherwise, as llama.cpp's converter falls back."""
    if outtype is Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q8_0][0] != 0:
        return F16
    return outtype


def _layer(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" else -1


def convert_adapter(adapter: str, base: str, outdir: Path, *, outtype: str = "f16", name: str | None = None,
                    force: bool = False, token: str | None = None, revision: str | None = None,
                    base_revision: str | None = None, progress: bool = True) -> AdapterResult:
    """Write ``<outdir>/<name>-LoRA-<TYPE>.gguf`` from a PEFT adapter, checked against ``base``, and record
    it in the folder's manifest (a row of role ``adapter``; a new manifest when the folder has none)."""
    qtype = parse_outtype(outtype, ADAPTER_OUTTYPES, "--outtype")
    outdir = Path(outdir)
    peft = PeftAdapter.open(adapter, token=token, revision=revision)
    refuse_vision(peft)
    shapes = base_shapes(base, token=token, revision=base_revision)
    peft.check_base(shapes.shapes, shapes.description)  # first: tokens added in fine-tuning cannot be merged either
    refuse_runtime_unsupported(peft)
    alpha, factors = alpha_and_factors(peft.pairs)
    if factors:
        log.info("folding per-tensor scales into lora_b for %d tensor(s) (ranks or alpha_pattern differ)",
                 len(factors))
    name = name or peft.name
    path = outdir / f"{name}-LoRA-{type_label(qtype)}.gguf"
    plan: list[PlannedTensor] = []
    sources: dict[str, tuple[str, float]] = {}
    for pair in sorted(peft.pairs, key=lambda p: (_layer(p.gguf_name), p.gguf_name)):
        for suffix, key, factor in (("lora_a", pair.a_key, 1.0), ("lora_b", pair.b_key, factors.get(pair.gguf_name,
                                                                                                     1.0))):
            shape = peft.shapes[key]
            tensor_name = f"{pair.gguf_name}.{suffix}"
            plan.append(PlannedTensor(tensor_name, tensor_name, shape, _tensor_type(shape, qtype)))
            sources[tensor_name] = (key, factor)
    provenance = peft.provenance()

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name)
        writer.add_file_type(FILE_TYPES[qtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, shapes.record.get("general.name") or shapes.description)
        if "revision" in shapes.record and shapes.record["revision"]:
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{shapes.description}")

    recover_folder(outdir)  # finish or undo what a killed run left (medgemma_gguf.integrity)
    manifest = Manifest.load(outdir) if (outdir / MANIFEST_NAME).is_file() else Manifest(
        model=name, source={"repo_or_path": peft.repo_or_path, "revision": peft.revision, "adapter": provenance})
    with StagedOutputs(force=force) as staged:
        temporary = staged.stage(path)
        write_gguf(temporary, TEXT_ARCH, metadata, plan, _AdapterTensors(peft, sources), progress=progress,
                   label=path.name)
        row = entry_for(outdir, temporary, "adapter", type_label(qtype), stored_as=path, adapter=provenance,
                        base=shapes.record, lora_alpha=alpha, tensors=len(plan))
        manifest_path = record_then_commit(outdir, manifest, [row], staged.commit)
    return AdapterResult(name, path, manifest_path, alpha)
