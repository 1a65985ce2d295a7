"""Hugging Face Gemma 3 / MedGemma checkpoint -> GGUF text model + separate mmproj + manifest."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from medgemma_gguf.atomic import StagedOutputs
from medgemma_gguf.convert.checkpoint import Checkpoint, TensorInfo
from medgemma_gguf.convert.config import ModelConfig, read_config
from medgemma_gguf.convert.gguf_stream import PlannedTensor, stored_nbytes, write_gguf
from medgemma_gguf.convert.metadata import (
    TEXT_ARCH,
    GeneralInfo,
    add_general,
    add_mmproj_hparams,
    add_sampling,
    add_text_hparams,
    add_vocab,
    general_info,
    read_card_metadata,
    sampling_defaults,
)
from medgemma_gguf.convert.peft_adapter import TIED_OUTPUT_SOURCE, MergedTensors, PeftAdapter, output_plan
from medgemma_gguf.convert.tensor_names import Component, is_vision_head, map_tensor_name
from medgemma_gguf.convert.tensor_types import (
    FILE_TYPES,
    MMPROJ_OUTTYPES,
    TEXT_OUTTYPES,
    mmproj_tensor_type,
    parse_outtype,
    text_tensor_type,
    type_label,
)
from medgemma_gguf.convert.vocab import Vocab, read_vocab
from medgemma_gguf.errors import UserError, setting
from medgemma_gguf.gguf_info import read_gguf_header, read_gguf_info
from medgemma_gguf.gguf_split import part_paths, same_model_file, split_size
from medgemma_gguf.hub import ResolvedSource, resolve_source, snapshot_repo
from medgemma_gguf.integrity import record_then_commit, recover_folder
from medgemma_gguf.manifest import MANIFEST_NAME, Manifest, entry_for

log = logging.getLogger(__name__)
SOURCE_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote."""

    name: str
    text_path: Path
    mmproj_path: Path | None
    manifest_path: Path
    skipped: bool = False  # the folder already held this conversion (same inputs, files intact)


def output_paths(outdir: Path, name: str, text_type: GGMLQuantizationType,
                 mmproj_type: GGMLQuantizationType, multimodal: bool) -> tuple[Path, Path | None]:
    """``<name>-<TYPE>.gguf`` and ``mmproj-<name>-<TYPE>.gguf`` (None for a text-only model)."""
    text = Path(outdir) / f"{name}-{type_label(text_type)}.gguf"
    mmproj = Path(outdir) / f"mmproj-{name}-{type_label(mmproj_type)}.gguf" if multimodal else None
    return text, mmproj


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor the model must have, with its shape in the checkpoint's (PyTorch) order."""
    t = config.text
    q_dim, kv_dim = t.n_head * t.head_dim, t.n_head_kv * t.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (t.vocab_size, t.n_embd),
                                          "output_norm.weight": (t.n_embd,)}
    if not t.tie_word_embeddings:
        shapes["output.weight"] = (t.vocab_size, t.n_embd)
    for i in range(t.n_layer):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (t.n_embd,), f"blk.{i}.attn_q.weight": (q_dim, t.n_embd),
            f"blk.{i}.attn_k.weight": (kv_dim, t.n_embd), f"blk.{i}.attn_v.weight": (kv_dim, t.n_embd),
            f"blk.{i}.attn_output.weight": (t.n_embd, q_dim), f"blk.{i}.attn_q_norm.weight": (t.head_dim,),
            f"blk.{i}.attn_k_norm.weight": (t.head_dim,), f"blk.{i}.post_attention_norm.weight": (t.n_embd,),
            f"blk.{i}.ffn_norm.weight": (t.n_embd,), f"blk.{i}.ffn_gate.weight": (t.n_ff, t.n_embd),
            f"blk.{i}.ffn_up.weight": (t.n_ff, t.n_embd), f"blk.{i}.ffn_down.weight": (t.n_embd, t.n_ff),
            f"blk.{i}.post_ffw_norm.weight": (t.n_embd,),
        })
    v = config.vision
    if v is not None:
        n_pos = (v.image_size // v.patch_size) ** 2
        shapes.update({
            "v.patch_embd.weight": (v.n_embd, 3, v.patch_size, v.patch_size), "v.patch_embd.bias": (v.n_embd,),
            "v.position_embd.weight": (n_pos, v.n_embd), "v.post_ln.weight": (v.n_embd,),
            "v.post_ln.bias": (v.n_embd,), "mm.input_projection.weight": (v.n_embd, t.n_embd),
            "mm.soft_emb_norm.weight": (v.n_embd,),
        })
        for i in range(v.n_layer):
            for kind in ("attn_q", "attn_k", "attn_v", "attn_out"):
                shapes[f"v.blk.{i}.{kind}.weight"] = (v.n_embd, v.n_embd)
                shapes[f"v.blk.{i}.{kind}.bias"] = (v.n_embd,)
            for norm in ("ln1", "ln2"):
                shapes[f"v.blk.{i}.{norm}.weight"] = (v.n_embd,)
                shapes[f"v.blk.{i}.{norm}.bias"] = (v.n_embd,)
            shapes.update({f"v.blk.{i}.ffn_up.weight": (v.n_ff, v.n_embd), f"v.blk.{i}.ffn_up.bias": (v.n_ff,),
                           f"v.blk.{i}.ffn_down.weight": (v.n_embd, v.n_ff),
                           f"v.blk.{i}.ffn_down.bias": (v.n_embd,)})
    return shapes


def _sort_key(planned: PlannedTensor) -> tuple[int, str]:
    parts = planned.gguf_name.split(".")
    layer = int(parts[parts.index("blk") + 1]) if "blk" in parts else -1
    return layer, planned.gguf_name


def plan_tensors(checkpoint: Checkpoint, config: ModelConfig, text_type: GGMLQuantizationType,
                 mmproj_type: GGMLQuantizationType) -> tuple[list[PlannedTensor], list[PlannedTensor]]:
    """Map and type every checkpoint tensor; refuse unknown, misshapen, duplicate or missing tensors."""
    expected = expected_shapes(config)
    text: list[PlannedTensor] = []
    mmproj: list[PlannedTensor] = []
    seen: dict[str, str] = {}
    for info in checkpoint:
        mapped = map_tensor_name(info.name)
        if mapped is None:
            if is_vision_head(info.name):
                continue
            raise UserError(f"unexpected tensor {info.name} in the checkpoint; it is not part of a Gemma 3 "
                            "model that llama.cpp can run (is this a Gemma 3 checkpoint?)")
        if mapped.gguf == "output.weight" and config.text.tie_word_embeddings:
            continue  # tied to token_embd, as llama.cpp does when output.weight is absent
        if mapped.component is not Component.TEXT and not config.is_multimodal:
            raise UserError(f"tensor {info.name} belongs to a vision tower but config.json describes a "
                            "text-only Gemma3ForCausalLM; the config and weights do not match")
        _check_tensor(info, mapped.gguf, expected, seen)
        seen[mapped.gguf] = info.name
        if mapped.component is Component.TEXT:
            text.append(PlannedTensor(mapped.gguf, info.name, info.shape,
                                      text_tensor_type(info.shape, text_type), mapped.add_one))
        else:
            mmproj.append(PlannedTensor(mapped.gguf, info.name, info.shape,
                                        mmproj_tensor_type(mapped.gguf, info.shape, mmproj_type), mapped.add_one))
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise UserError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs (first: GGUF "
                        f"{missing[0]}); the download is incomplete or the config does not match the weights")
    return sorted(text, key=_sort_key), sorted(mmproj, key=_sort_key)


def _check_tensor(info: TensorInfo, gguf_name: str, expected: dict[str, tuple[int, ...]],
                  seen: dict[str, str]) -> None:
    if gguf_name in seen:
        raise UserError(f"tensors {seen[gguf_name]} and {info.name} both map to {gguf_name}; the checkpoint "
                        "mixes two layouts, re-save it")
    if gguf_name not in expected:
        raise UserError(f"tensor {info.name} ({gguf_name}) is beyond what config.json describes (layer count "
                        "or architecture); the config and weights do not match")
    if info.shape != expected[gguf_name]:
        raise UserError(f"tensor {info.name} has shape {list(info.shape)} but config.json implies "
                        f"{list(expected[gguf_name])}; the config and weights do not match")
    if info.dtype not in SOURCE_DTYPES:
        raise UserError(f"tensor {info.name} is stored as {info.dtype}; convert needs unquantized "
                        "bf16/f16/f32 weights (dequantize the checkpoint first)")


def default_model_name(resolved: ResolvedSource) -> str:
    """``medgemma-4b-it`` for ``google/medgemma-4b-it`` (or its Hub-cache snapshot folder); the folder name for
    another local folder."""
    if resolved.is_hub:
        return resolved.repo_or_path.rstrip("/").split("/")[-1]
    snapshot = snapshot_repo(resolved.folder)
    return snapshot[0].split("/")[-1] if snapshot else resolved.folder.name


def convert_checkpoint(source: str, outdir: Path, *, outtype: str = "bf16", mmproj_type: str = "f16",
                       name: str | None = None, force: bool = False, token: str | None = None,
                       revision: str | None = None, progress: bool = True, adapter: str | None = None,
                       adapter_revision: str | None = None, split_max_size: int | None = None) -> ConvertResult:
    """Convert a Hub repo id or local folder into ``outdir``; see the README for the file layout.

    ``adapter``: a PEFT LoRA adapter (folder or Hub repo id) merged into the weights while they stream:
    each adapted tensor is written as ``W + scale · B·A`` computed in float32 (``convert.peft_adapter``);
    the default name is then ``<base>-<adapter>`` and the manifest records both sources.
    ``split_max_size``: write the text GGUF in llama.cpp's split format, parts of at most that many bytes (0:
    never; None: the default rule of ``medgemma_gguf.gguf_split``, 45 GB parts for files over 49 GB).
    """
    text_type = parse_outtype(outtype, TEXT_OUTTYPES, "--outtype")
    vision_type = parse_outtype(mmproj_type, MMPROJ_OUTTYPES, "--mmproj-type")
    outdir = Path(outdir)
    if adapter_revision and not adapter:
        raise UserError(f"{setting('adapter_revision')} applies with {setting('adapter')} only; add the adapter or "
                        "drop the revision")
    resolved = resolve_source(source, token=token, revision=revision)
    config = read_config(resolved.folder)
    checkpoint = Checkpoint(resolved.folder)
    text_plan, mmproj_plan = plan_tensors(checkpoint, config, text_type, vision_type)
    peft = PeftAdapter.open(adapter, token=token, revision=adapter_revision) if adapter else None
    tensors: Checkpoint | MergedTensors = checkpoint
    if peft is not None:
        text_plan, tensors = _merge_plan(peft, config, checkpoint, text_plan, mmproj_plan, text_type, source)
    vocab = read_vocab(resolved.folder, config.text.vocab_size)
    _check_chat_template(vocab, resolved.folder)
    sampling = sampling_defaults(_json_file(resolved.folder / "generation_config.json"))
    name = name or default_model_name(resolved) + (f"-{peft.name}" if peft is not None else "")
    n_params = sum(math.prod(t.shape) for t in (*text_plan, *mmproj_plan))
    snapshot = None if resolved.is_hub else snapshot_repo(resolved.folder)
    info = general_info(name, read_card_metadata(resolved.folder),
                        source_repo=resolved.repo_or_path if resolved.is_hub else snapshot[0] if snapshot else None,
                        revision=resolved.revision or (snapshot[1] if snapshot else None), n_params=n_params)
    text_path, mmproj_path = output_paths(outdir, name, text_type, vision_type, config.is_multimodal)
    recover_folder(outdir)  # finish or undo what a killed run left (medgemma_gguf.integrity)
    manifest = _load_or_new_manifest(outdir, name, resolved, force,
                                     adapter=peft.provenance() if peft is not None else None)
    outputs = [(path, role, type_label(qtype)) for path, role, qtype in
               ((text_path, "text", text_type), (mmproj_path, "mmproj", vision_type)) if path is not None]
    inputs = _conversion_inputs(resolved, peft, outputs)
    if not force and _up_to_date(outdir, manifest, outputs, inputs):
        log.info("%s already holds this conversion (same source and types, files intact); skipped", outdir)
        return ConvertResult(name, _recorded_path(outdir, manifest, text_path), mmproj_path, outdir / MANIFEST_NAME,
                             skipped=True)

    unsplit = text_path
    part_size = split_size(sum(stored_nbytes(t) for t in text_plan), split_max_size)
    text_parts: list[Path] = []  # a split text model's parts: final names, and the staged files written
    staged_parts: list[Path] = []
    with StagedOutputs(force=force) as staged:
        def name_parts(count: int) -> list[Path]:
            text_parts[:] = part_paths(text_path, count)
            staged_parts[:] = [staged.stage(part) for part in text_parts]
            return staged_parts

        text_tmp = staged.stage(text_path) if not part_size else text_path
        mmproj_tmp = staged.stage(mmproj_path) if mmproj_path else None
        write_gguf(text_tmp, TEXT_ARCH, lambda w: _text_metadata(w, config, vocab, info, text_type, sampling),
                   text_plan, tensors, progress=progress, label=text_path.name, split_max_size=part_size,
                   name_parts=name_parts)
        if mmproj_tmp is not None and mmproj_path is not None:
            preprocessor = _preprocessor_config(resolved.folder)
            write_gguf(mmproj_tmp, "clip", lambda w: _mmproj_metadata(w, config, preprocessor, info, vision_type),
                       mmproj_plan, tensors, progress=progress, label=mmproj_path.name)
        if isinstance(tensors, MergedTensors) and (left := list(tensors.iter_unmerged())):
            raise RuntimeError(f"adapted tensors not merged: {left}")  # a planning bug; nothing is committed
        rows = []
        temporaries = [text_tmp] if mmproj_tmp is None else [text_tmp, mmproj_tmp]
        for (path, role, label), temporary in zip(outputs, temporaries, strict=True):
            if role == "text" and text_parts:  # split: the staged parts' headers, recorded under the final names
                headers = [read_gguf_header(part) for part in staged_parts]
                written = replace(headers[0], tensors=tuple(t for h in headers for t in h.tensors))
                row = entry_for(outdir, staged_parts[0], role, label, parts=staged_parts, stored_as=text_parts[0],
                                inputs=inputs, bits_per_weight=round(written.bits_per_weight, 4),
                                tensor_types=written.quantizable_type_counts())
                rows.append(replace(row, parts=[dict(part, path=final.relative_to(outdir).as_posix())
                                                for part, final in zip(row.parts, text_parts, strict=True)]))
                continue
            written = read_gguf_info(temporary)
            rows.append(entry_for(outdir, temporary, role, label, stored_as=path, inputs=inputs,
                                  bits_per_weight=round(written.bits_per_weight, 4),
                                  tensor_types=written.quantizable_type_counts()))
        kept = text_parts[0].name if text_parts else text_path.name
        manifest.files = [row for row in manifest.files if row.path == kept
                          or not same_model_file(row.path, unsplit.name)]  # the other layout's row, from before
        manifest_path = record_then_commit(outdir, manifest, rows, staged.commit)
    if text_parts:
        text_path = text_parts[0]
    return ConvertResult(name, text_path, mmproj_path, manifest_path)


def _conversion_inputs(resolved: ResolvedSource, peft: PeftAdapter | None,
                       outputs: list[tuple[Path, str, str]]) -> dict:
    """What a conversion is made from: the source (a Hub commit, or a local folder's file names, sizes and
    modification times), the adapter's provenance and the output types. A rerun with the same inputs whose
    files are intact is skipped (so a command killed after converting resumes without ``--force``)."""
    import hashlib

    if resolved.is_hub and resolved.revision:
        fingerprint = f"hub:{resolved.repo_or_path}@{resolved.revision}"
    else:
        digest = hashlib.sha256(b"medgemma-gguf source files v1\n")
        for path in sorted(p for p in Path(resolved.folder).iterdir() if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        fingerprint = "files:" + digest.hexdigest()
    return {"source": fingerprint, "adapter": peft.provenance() if peft is not None else None,
            "types": {role: label for _, role, label in outputs}}


def _up_to_date(outdir: Path, manifest: Manifest, outputs: list[tuple[Path, str, str]], inputs: dict) -> bool:
    """Whether every output exists (a split model: every part), is recorded with these inputs and still has its
    recorded size and sha256."""
    from medgemma_gguf.hashing import sha256_of

    for path, role, label in outputs:
        row = next((r for r in manifest.files if same_model_file(r.path, path.name)), None)
        if row is None or row.role != role or row.type != label or row.inputs != inputs:
            return False
        recorded = [(p["path"], p["bytes"], p["sha256"]) for p in row.parts] or [(row.path, row.bytes, row.sha256)]
        if not all((outdir / name).is_file() and (outdir / name).stat().st_size == size for name, size, _ in recorded):
            return False
        if not all(sha256_of(outdir / name) == sha for name, _, sha in recorded):
            return False
    return True


def _recorded_path(outdir: Path, manifest: Manifest, path: Path) -> Path:
    """Where the manifest records the model ``path`` names: itself, or the first part of its split form."""
    row = next((r for r in manifest.files if same_model_file(r.path, path.name)), None)
    return outdir / row.path if row is not None else path


def _check_chat_template(vocab: Vocab, folder: Path) -> None:
    """Refuse a chat template that does not render a standard conversation within the runtime's limits
    (``runtime.prompt.check_template``): written into the GGUF, it would hang ``chat`` and block ``serve``.
    A template that merely rejects the conversation (a role it does not support) is written with a warning."""
    from medgemma_gguf.errors import ResourceError
    from medgemma_gguf.runtime.prompt import (
        TEMPLATE_MAX_CHARS,
        TEMPLATE_MAX_SECONDS,
        TemplateLimitError,
        check_template,
    )

    if not vocab.chat_template:
        return
    bos = vocab.tokens[vocab.special_ids["bos"]] if "bos" in vocab.special_ids else ""
    try:
        check_template(vocab.chat_template, bos_token=bos)
    except TemplateLimitError as exc:
        raise ResourceError(f"the chat template of {folder} {exc.what} on a standard four-message conversation "
                            f"(limits: {TEMPLATE_MAX_SECONDS:g} s, {TEMPLATE_MAX_CHARS} characters); fix the "
                            "checkpoint's chat_template (chat_template.jinja/.json or tokenizer_config.json) and "
                            "convert again") from exc
    except UserError as exc:
        log.warning("%s: the chat template does not render a standard conversation (%s); written as it is", folder,
                    exc)


def _text_metadata(writer, config: ModelConfig, vocab: Vocab, info: GeneralInfo,
                   qtype: GGMLQuantizationType, sampling: dict[str, int | float]) -> None:
    add_general(writer, info, FILE_TYPES[qtype])
    add_sampling(writer, sampling)
    add_text_hparams(writer, config)
    add_vocab(writer, vocab)


def _mmproj_metadata(writer, config: ModelConfig, preprocessor: dict, info: GeneralInfo,
                     qtype: GGMLQuantizationType) -> None:
    add_general(writer, info, FILE_TYPES[qtype])
    add_mmproj_hparams(writer, config, preprocessor)


def _json_file(path: Path) -> dict:
    """A JSON object file of the checkpoint ({} when absent)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}); re-download it") from exc
    return data if isinstance(data, dict) else {}


def _preprocessor_config(folder: Path) -> dict:
    """Image processor settings: ``preprocessor_config.json`` as published, or the ``image_processor``
    section of ``processor_config.json`` as transformers 5.x writes it."""
    merged: dict = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc.msg}); re-download it") from exc
        merged.update(data.get("image_processor", {}) if name == "processor_config.json" else data)
    return merged


def _merge_plan(peft: PeftAdapter, config: ModelConfig, checkpoint: Checkpoint, text_plan: list[PlannedTensor],
                mmproj_plan: list[PlannedTensor], text_type: GGMLQuantizationType,
                base: str) -> tuple[list[PlannedTensor], MergedTensors]:
    """Check the adapter against the base's shapes; the text plan (plus an untied output matrix when the
    merge unties it) and the merging tensor source."""
    expected = expected_shapes(config)
    vocab_shape = (config.text.vocab_size, config.text.n_embd)
    expected.setdefault("output.weight", vocab_shape)
    peft.check_base(expected, base)
    if config.text.tie_word_embeddings and output_plan(peft, True) is not None:
        text_plan = sorted([*text_plan, PlannedTensor("output.weight", TIED_OUTPUT_SOURCE, vocab_shape,
                                                      text_tensor_type(vocab_shape, text_type))], key=_sort_key)
    gguf_of_source = {t.source_name: t.gguf_name for t in (*text_plan, *mmproj_plan)}
    log.info("merging %d LoRA tensor pair(s)%s from %s", len(peft.pairs),
             f" and {len(peft.replacements)} saved module(s)" if peft.replacements else "", peft.repo_or_path)
    return text_plan, MergedTensors(checkpoint, peft, gguf_of_source)


def _load_or_new_manifest(outdir: Path, name: str, resolved: ResolvedSource, force: bool,
                          adapter: dict | None = None) -> Manifest:
    """The folder's manifest to extend; another model's manifest is only replaced with ``force``.

    A merged model's source also records the adapter (``source.adapter``: repo or path, revision, the
    sha256 of its weights and config, rank, alpha, rsLoRA).
    """
    source: dict[str, Any] = {"repo_or_path": resolved.repo_or_path, "revision": resolved.revision}
    if adapter is not None:
        source["adapter"] = adapter
    if (outdir / MANIFEST_NAME).is_file():
        manifest = Manifest.load(outdir)
        if manifest.model == name and manifest.source == source:
            return manifest
        if not force:
            raise UserError(f"{outdir / MANIFEST_NAME} describes {manifest.model} from "
                            f"{manifest.source.get('repo_or_path')}; use another {setting('outdir')}, or "
                            f"{setting('force')} to replace it")
        log.warning("replacing %s, which described another model or source", outdir / MANIFEST_NAME)
    return Manifest(model=name, source=source)
