"""The ``README.md`` model card of an output folder, generated from its ``manifest.json``, GGUF headers and
evaluation report, ready for the Hugging Face Hub.

The card starts with the YAML front matter the Hub reads (``ModelCardData``): ``base_model`` (the source repo)
with ``base_model_relation: quantized``, so the Hub lists the repo under the source model's quantizations;
``license`` / ``license_name`` / ``license_link`` copied from the source's card (MedGemma: Google's Health AI
Developer Foundations terms); ``pipeline_tag`` (``image-text-to-text`` with an mmproj, else
``text-generation``); ``library_name: gguf``; ``tags`` (gguf, llama.cpp, the source's tags such as medical);
``quantized_by``. What is not known — a local checkpoint without a card has no Hub id and no license — is
left out of the metadata and the card says so, rather than guessing. ``check_card`` checks front matter
offline with the rules the Hub's ``/api/validate-yaml`` applies to these keys.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from medgemma_gguf.atomic import write_text_atomic
from medgemma_gguf.gguf_info import read_gguf_info
from medgemma_gguf.hub import REPO_ID, snapshot_repo
from medgemma_gguf.manifest import Manifest

CARD_NAME = "README.md"
BPW_NOTE = ("Bits per weight = 8 × bytes of the quantizable tensors (the 2-D+ weight matrices: token embedding, "
            "attention and feed-forward) / their number of weights; the F32 norms are not counted. Size is the "
            "whole file (all parts of a split model).")
QUANTIZED_BY = "medgemma-gguf"
BASE_TAGS = ("gguf", "llama.cpp", "medgemma-gguf")
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
# the Hub's tasks that fit a chat model (huggingface.js tasks); a card with another is refused here
PIPELINE_TAGS = ("image-text-to-text", "text-generation", "visual-question-answering", "image-to-text",
                 "text2text-generation", "question-answering", "summarization", "feature-extraction")
NOTICE = ("MedGemma is not a medical device: its outputs are not clinical advice and need review by a qualified "
          "professional. Use is governed by Google's Health AI Developer Foundations terms "
          "(https://developers.google.com/health-ai-developer-foundations/terms).")
OLLAMA_VISION = "0.30.4"  # the first Ollama that loads a separate mmproj GGUF (convert/quantize/export.py)
_YAML_BLOCK = re.compile(r"^(\s*---\n)([\S\s]*?)(\n---[ \t]*(\n|$))")  # huggingface_hub's REGEX_YAML_BLOCK


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes} B"


def source_repo(manifest: Manifest) -> str | None:
    """The Hub id of the folder's source: the repo id convert was given, or the repo of a Hub-cache snapshot
    folder (``…/models--google--medgemma-4b-it/snapshots/<sha>``); None for another local folder."""
    given = str(manifest.source.get("repo_or_path") or "")
    snapshot = snapshot_repo(given)
    if snapshot:
        return snapshot[0]
    if manifest.source.get("revision") and REPO_ID.match(given) and not Path(given).exists():
        return given
    return None


def card_metadata(folder: Path, manifest: Manifest) -> tuple[dict[str, Any], list[str]]:
    """(front matter, what is missing and why) for the folder's card (module docstring)."""
    texts = manifest.present(folder, "text")
    metadata = read_gguf_info(folder / texts[0].path).metadata if texts else {}
    base = source_repo(manifest)
    data: dict[str, Any] = {}
    missing: list[str] = []
    if base:
        data.update(base_model=base, base_model_relation="quantized")
    else:
        local = Path(str(manifest.source.get("repo_or_path") or "?")).name
        missing.append(f"base_model (the source, the local folder `{local}`, is not a Hub repo: add "
                       "`base_model: OWNER/NAME` and `base_model_relation: quantized` by hand)")
    license_id = metadata.get("general.license")
    if license_id:
        data["license"] = str(license_id)
        if metadata.get("general.license.name"):
            data["license_name"] = str(metadata["general.license.name"])
        if metadata.get("general.license.link"):
            data["license_link"] = str(metadata["general.license.link"])
    else:
        missing.append("license (the source declared none: copy license, license_name and license_link from "
                       "the original model's card)")
    data["pipeline_tag"] = "image-text-to-text" if manifest.present(folder, "mmproj") else "text-generation"
    data["library_name"] = "gguf"
    source_tags = metadata.get("general.tags") or []
    data["tags"] = list(dict.fromkeys([*BASE_TAGS, *(str(t) for t in source_tags)]))
    data["quantized_by"] = str(metadata.get("general.quantized_by") or QUANTIZED_BY)
    return data, missing


def check_card(text: str) -> list[str]:
    """What the Hub would refuse in a card's front matter, checked offline: YAML that parses to a mapping;
    ``base_model`` a Hub id (or a list of them); ``base_model_relation`` one of the Hub's four and only with a
    ``base_model``; ``license: other`` with ``license_name`` and ``license_link``; a known ``pipeline_tag``;
    ``tags`` a list of strings. An empty list when it is fine."""
    match = _YAML_BLOCK.match(text)
    if match is None:
        return ["the card has no YAML front matter"]
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as exc:
        return [f"the front matter does not parse as YAML ({str(exc).splitlines()[0]})"]
    if not isinstance(data, dict):
        return ["the front matter is not a mapping of keys to values"]
    problems = []
    base = data.get("base_model")
    bases = base if isinstance(base, list) else [base] if base is not None else []
    if any(not isinstance(b, str) or not REPO_ID.match(b) for b in bases):
        problems.append(f"base_model must be a Hub id OWNER/NAME (or a list of them), got {base!r}")
    relation = data.get("base_model_relation")
    if relation is not None:
        if relation not in BASE_MODEL_RELATIONS:
            problems.append(f"base_model_relation must be one of {', '.join(BASE_MODEL_RELATIONS)}, got {relation!r}")
        if not bases:
            problems.append("base_model_relation needs a base_model")
    if data.get("license") == "other" and not (data.get("license_name") and data.get("license_link")):
        problems.append("license: other needs license_name and license_link")
    elif "license" in data and not (isinstance(data["license"], str) and re.fullmatch(r"[a-z0-9][a-z0-9.+-]*",
                                                                                     data["license"])):
        problems.append(f"license must be a Hub license id such as apache-2.0 or other, got {data['license']!r}")
    if "pipeline_tag" in data and data["pipeline_tag"] not in PIPELINE_TAGS:
        problems.append(f"pipeline_tag must be one of {', '.join(PIPELINE_TAGS)}, got {data['pipeline_tag']!r}")
    tags = data.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        problems.append(f"tags must be a list of strings, got {tags!r}")
    return problems


def _report_kl(folder: Path) -> dict[str, float]:
    """Each file's mean KL divergence from the folder's evaluation report (``report/report.json``), by name."""
    path = folder / "report" / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    rows = data.get("rows") if isinstance(data, dict) else data
    out = {}
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and isinstance(row.get("file"), str) and isinstance(row.get("kld_mean"), int | float):
            out[PurePosixPath(row["file"].replace("\\", "/")).name] = float(row["kld_mean"])
    return out


def _front_matter(data: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


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


def render_model_card(folder: Path, manifest: Manifest, *, repo_id: str | None = None) -> str:
    """The model card text for ``folder``; ``repo_id``: the Hub repository it is published as (``push``), for
    the usage lines that download from it."""
    folder = Path(folder)
    texts = manifest.present(folder, "text")
    mmprojs = manifest.mmprojs(folder)
    imatrices = manifest.present(folder, "imatrix")
    metadata = read_gguf_info(folder / texts[0].path).metadata if texts else {}
    data, missing = card_metadata(folder, manifest)
    kl = _report_kl(folder)
    source = str(manifest.source.get("repo_or_path", "unknown"))
    shown = data.get("base_model") or Path(source).name  # a local folder by its name only: cards get published
    revision = manifest.source.get("revision")
    lines = [f"# {manifest.model} — GGUF", "",
             f"GGUF files of `{shown}`{f' (revision `{revision}`)' if revision else ''}, "
             "converted and quantized with medgemma-gguf using llama.cpp's quantizer. The "
             "text model and the vision projector (mmproj) are separate files; image input needs both.", "",
             f"> {NOTICE}", "", *_adapter_lines(manifest.source.get("adapter"))]
    if missing:
        lines += ["Not known, so not in this card's metadata: " + "; ".join(missing) + ".", ""]
    lines += ["## License", "", *_license_lines(metadata), "",
              "## Files", "", "| File | Role | Type | Size | Bits per weight | KL vs reference | Notes |",
              "|---|---|---|---|---|---|---|"]
    for row in sorted(texts, key=lambda r: -float(r.bits_per_weight or _bpw(folder / r.path))):
        notes = []
        if row.recipe:
            notes.append(f"recipe {row.recipe}")
        if row.imatrix:
            notes.append(f"imatrix {row.imatrix}")
        if row.fallbacks:
            notes.append(f"{len(row.fallbacks)} tensor(s) fell back to another type")
        if len(row.part_paths) > 1:
            notes.append(f"{len(row.part_paths)} parts (llama.cpp split): load the first")
        bpw = row.bits_per_weight or _bpw(folder / row.path)
        kld = f"{kl[row.path]:.4f}" if row.path in kl else ""
        lines.append(f"| `{row.path}` | text | {row.type} | {_size(row.bytes)} | {float(bpw):.2f} | {kld} | "
                     f"{'; '.join(notes)} |")
    for row in mmprojs:
        lines.append(f"| `{row.path}` | mmproj (vision) | {row.type} | {_size(row.bytes)} | | | |")
    for row in imatrices:
        lines.append(f"| `{row.path}` | imatrix | {row.type} | {_size(row.bytes)} | | | importance matrix (GGUF "
                     "format; named so that `*.gguf` globs skip it) |")
    lines += ["", BPW_NOTE]
    if kl:
        lines += ["KL: mean KL divergence of each quant's next-token distribution from the unquantized model's, "
                  "measured by `medgemma-gguf eval` (report in `report/`); lower is closer."]
    lines.append("")
    lines += _usage_lines(folder, manifest, texts, mmprojs, repo_id)
    return _front_matter(data) + "\n" + "\n".join(lines)


def _usage_lines(folder: Path, manifest: Manifest, texts: list[Any], mmprojs: list[Any],
                 repo_id: str | None) -> list[str]:
    example = min(texts, key=lambda r: abs(float(r.bits_per_weight or 16) - 4.8), default=None)
    model = example.path if example else f"{manifest.model}-Q4_K_M.gguf"
    quant = example.type if example else "Q4_K_M"
    mmproj = mmprojs[0].path if mmprojs else None
    image = " --image xray.png" if mmproj else ""
    here = folder.name
    lines = ["## Run", "", "With medgemma-gguf (given a folder it picks the best quant that fits, and the mmproj "
             "beside it):", "", "```sh"]
    if repo_id:
        lines += [f"medgemma-gguf pull {repo_id}:{quant}",
                  f"medgemma-gguf chat hf:{repo_id}:{quant}{image} --prompt \"Describe this X-ray\""]
    lines += [f"medgemma-gguf chat {here} --quant {quant}{image} --prompt \"Describe this X-ray\"", "```", "",
              "With llama.cpp's server (OpenAI-compatible API and a web page on http://127.0.0.1:8080):", "",
              "```sh"]
    if repo_id:
        lines.append(f"llama-server -hf {repo_id}:{quant}")
    lines += [f"llama-server -m {model}" + (f" --mmproj {mmproj}" if mmproj else ""), "```", "",
              "With llama.cpp's command line:", "", "```sh",
              f"llama-mtmd-cli -m {model} --mmproj {mmproj} --image xray.png -p \"Describe this X-ray\"" if mmproj
              else f"llama-cli -m {model} -cnv", "```", ""]
    lmstudio = f"search for `{repo_id}` in LM Studio's model search, or " if repo_id else ""
    lines += [f"With LM Studio: {lmstudio}put `{model}`" + (f" and `{mmproj}`" if mmproj else "")
              + " together in one folder two levels under LM Studio's models folder "
              f"(`~/.lmstudio/models/<publisher>/{here}/`); LM Studio recognises the projector by `mmproj` in its "
              "name.", ""]
    lines += ["With Ollama: write a Modelfile (Gemma 3's chat template, `<end_of_turn>` as the stop string, the "
              "model's sampling defaults) and create the model:", "", "```sh",
              f"medgemma-gguf export ollama {here} --quant {quant}",
              f"ollama create {manifest.model.lower()} -f {here}/Modelfile", "```", ""]
    if mmproj:
        lines += [f"Ollama {OLLAMA_VISION} or later loads the separate mmproj for images; older Ollama runs the model "
                  "as text only.", ""]
    return lines


def _bpw(path: Path) -> float:
    return read_gguf_info(path).bits_per_weight


def write_model_card(folder: Path, manifest: Manifest | None = None) -> Path:
    """Write ``folder/README.md`` (atomically, replacing the previous card)."""
    folder = Path(folder)
    manifest = manifest or Manifest.load(folder)
    target = folder / CARD_NAME
    write_text_atomic(target, render_model_card(folder, manifest), force=True)
    return target
