"""Exports for other tools: an Ollama ``Modelfile`` for one quant of a folder, and the stock ``llama-quantize``
command line that reproduces a recipe (UD-* or AUTO) without medgemma-gguf.

Ollama (``export ollama DIR --quant Q4_K_M``): ``FROM`` lines for the text GGUF (each part of a split
model) and the mmproj, paths relative to the Modelfile; a Go ``TEMPLATE`` rendering Gemma 3's chat format
(the system prompt at the start of the first user turn, ``<start_of_turn>model`` to generate) — Ollama has
no built-in ``gemma3`` renderer; ``PARAMETER stop "<end_of_turn>"`` and the model's sampling defaults from
its ``general.sampling.*`` keys (MedGemma: top_k 64, top_p 0.95); the license. Ollama loads a separate
mmproj (it classifies a GGUF with ``general.type = mmproj`` as a projector layer) since v0.30.4
(ollama/ollama commit 5f56a28, "server: classify mmproj GGUFs as projector layers", PR #16472): the
Modelfile says ``REQUIRES 0.30.4`` when it has one; older Ollama runs such a model as text only.

llama-quantize (``export llama-quantize DIR --recipe R``): a recipe gives every quantizable tensor an explicit
type. llama-quantize's ``--tensor-type PATTERN=TYPE`` lowercases PATTERN and applies the first pattern that
``std::regex_search`` finds in a tensor's name, and only then skips llama.cpp's own mix for that tensor
(tools/quantize/quantize.cpp, src/llama-quant.cpp: ``llama_tensor_get_type``), so the command names every
planned tensor — one pattern per tensor kind and type, listing the layers (``blk\\.(0|1|33)\\.ffn_down\\.weight
=q6_k``) — and passes the recipe's base as the file type (a recipe with an unquantized base: ``Q8_0`` with
every tensor overridden and ``--override-kv general.file_type=int:N``, as medgemma-gguf itself writes it).
The folder's importance matrix is passed with ``--imatrix`` (the default policy of ``quantize``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType, LlamaFileType

from medgemma_gguf.atomic import write_text_atomic
from medgemma_gguf.errors import ExistsError, UserError, setting
from medgemma_gguf.gguf_info import SPLIT_NAME, read_gguf_info
from medgemma_gguf.quant_types import recipe_file_type, tensor_kind

T = GGMLQuantizationType
MODELFILE_MARK = "# Modelfile written by medgemma-gguf export ollama"
OLLAMA_MMPROJ_VERSION = "0.30.4"
HAI_DEF = ("MedGemma is governed by Google's Health AI Developer Foundations terms of use: "
           "https://developers.google.com/health-ai-developer-foundations/terms . It is not a medical device; "
           "its outputs are not clinical advice.")
# Gemma 3's chat format (as its tokenizer.chat_template renders it) in Ollama's Go template language
GEMMA3_TEMPLATE = """{{- $system := "" }}
{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}
{{- $first := true }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $first $system }}{{ $system }}

{{ end }}{{ .Content }}<end_of_turn>
{{ $first = false }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<start_of_turn>model
{{ end }}
{{- end }}"""
_OLLAMA_PARAMETERS = (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"),
                      ("repeat_penalty", "repeat_penalty"), ("repeat_last_n", "repeat_last_n"))


@dataclass(frozen=True)
class OllamaExport:
    """A written Modelfile and what it points at."""

    path: Path
    model: Path
    mmproj: Path | None
    text: str
    name: str  # a model name for `ollama create`


def _relative(path: Path, base: Path) -> str:
    try:
        return "./" + path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def render_modelfile(model: Path, mmproj: Path | None, base: Path) -> str:
    """The Modelfile text for ``model`` (+ ``mmproj``), paths relative to the folder ``base`` it is written in."""
    from medgemma_gguf.runtime.sampling import model_sampling

    info = read_gguf_info(model)
    sampling = model_sampling(info.metadata)
    name = info.metadata.get("general.name") or model.stem
    lines = [MODELFILE_MARK, f"# {name}: {info.quant_type}, {info.bits_per_weight:.2f} bits per weight",
             f"#   ollama create {_ollama_name(model)} -f {_relative(base / 'Modelfile', Path.cwd())}",
             "# " + HAI_DEF, ""]
    lines += [f"FROM {_relative(part, base)}" for part in info.paths]
    if mmproj is not None:
        lines += [f"# vision: Ollama {OLLAMA_MMPROJ_VERSION} and later load a separate mmproj GGUF as the projector; "
                  "older Ollama runs this model as text only",
                  f"FROM {_relative(mmproj, base)}", f"REQUIRES {OLLAMA_MMPROJ_VERSION}"]
    lines += ["", f'TEMPLATE """{GEMMA3_TEMPLATE}"""', "", 'PARAMETER stop "<end_of_turn>"']
    for field_name, parameter in _OLLAMA_PARAMETERS:
        value = getattr(sampling, field_name)
        if value is not None:
            lines.append(f"PARAMETER {parameter} {value:g}" if isinstance(value, float)
                         else f"PARAMETER {parameter} {value}")
    lines.append(f"# sampling defaults: {sampling.source}")
    license_name = info.metadata.get("general.license.name") or info.metadata.get("general.license")
    license_link = info.metadata.get("general.license.link")
    license_text = f"{license_name}: {license_link}" if license_name and license_link else HAI_DEF
    lines += ["", f'LICENSE """{license_text}"""', ""]
    return "\n".join(lines)


def _ollama_name(model: Path) -> str:
    split = SPLIT_NAME.match(model.name)
    stem = split.group("prefix") if split else model.name.removesuffix(".gguf")
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-") or "medgemma"


def export_ollama(folder: Path, *, quant: str | None = None, output: Path | None = None,
                  force: bool = False) -> OllamaExport:
    """Write an Ollama Modelfile for one quant of ``folder`` (the default rule of ``chat`` when ``quant`` is
    None) and the mmproj found beside it. ``output``: where (default ``folder/Modelfile``); a Modelfile this
    command did not write is replaced only with ``force``."""
    from medgemma_gguf.runtime.quant_choice import choose_quant

    folder = Path(folder)
    choice = choose_quant(folder, n_ctx=4096, quant=quant)
    target = Path(output) if output is not None else folder / "Modelfile"
    if target.exists() and not force and not target.read_text(encoding="utf-8", errors="replace").startswith(
            MODELFILE_MARK):
        raise ExistsError(f"{target} exists and was not written by medgemma-gguf; pass {setting('force')} to replace "
                          "it or choose another output")
    text = render_modelfile(choice.path, choice.mmproj, target.parent)
    write_text_atomic(target, text, force=True)
    return OllamaExport(path=target, model=choice.path, mmproj=choice.mmproj, text=text, name=_ollama_name(choice.path))


# --- llama-quantize -----------------------------------------------------------------------------------------
def tensor_type_flags(types: dict[str, GGMLQuantizationType]) -> list[str]:
    """``--tensor-type`` values that give each tensor of ``types`` its type under llama-quantize's rules
    (lower-cased regex, first match): one per tensor kind and type, with the layers listed."""
    groups: dict[tuple[str, str], list[int]] = {}
    singles: list[str] = []
    layers_of_kind: dict[str, set[int]] = {}
    for name, qtype in types.items():
        kind, layer = tensor_kind(name)
        if layer is None or not re.fullmatch(r"blk\.\d+\.[a-z0-9_]+\.weight", name):
            singles.append(f"^{re.escape(name)}$={qtype.name.lower()}")
            continue
        groups.setdefault((kind, qtype.name.lower()), []).append(layer)
        layers_of_kind.setdefault(kind, set()).add(layer)
    flags = sorted(singles)
    for (kind, type_name), layers in sorted(groups.items()):
        if set(layers) == layers_of_kind[kind]:
            flags.append(rf"^blk\.\d+\.{kind}\.weight$={type_name}")
        else:
            listed = "|".join(str(n) for n in sorted(layers))
            flags.append(rf"^blk\.({listed})\.{kind}\.weight$={type_name}")
    return flags


@dataclass(frozen=True)
class QuantizeCommand:
    """A stock llama-quantize command line, as arguments and as one shell line."""

    argv: list[str]
    recipe: str
    imatrix: Path | None

    @property
    def shell(self) -> str:
        return " ".join(shlex.quote(arg) for arg in self.argv)


def llama_quantize_command(folder: Path, recipe: str | Path, *, use_imatrix: bool = True,
                           output: Path | None = None) -> QuantizeCommand:
    """The llama-quantize command that reproduces ``recipe`` (a bundled name, or a recipe TOML such as the
    folder's ``<model>-AUTO-<bpw>.toml``) on ``folder``'s unquantized text GGUF (module docstring)."""
    from medgemma_gguf.convert.quantize.folder import folder_default_imatrix, quant_path, source_entry
    from medgemma_gguf.convert.quantize.llama_quantize import QuantSpec, needs_imatrix
    from medgemma_gguf.convert.quantize.recipe import load_recipe, plan_recipe
    from medgemma_gguf.manifest import Manifest

    folder = Path(folder)
    manifest = Manifest.load(folder)
    source = source_entry(folder, manifest)
    source_path = folder / source.path
    loaded = load_recipe(recipe)
    info = read_gguf_info(source_path)
    plan = plan_recipe(loaded, info.tensors)
    imatrix = folder_default_imatrix(folder, manifest, source) if use_imatrix else None
    needing = needs_imatrix(QuantSpec(loaded.name, recipe=loaded), info.tensors)
    if needing and imatrix is None:
        raise UserError(f"{loaded.name} needs an importance matrix ({needing[0]}) and {folder} has none for "
                        f"{source.path}; make one with `medgemma-gguf quantize {folder} --imatrix auto ...` first")
    target = Path(output) if output is not None else quant_path(folder, manifest.model,
                                                                QuantSpec(loaded.name, recipe=loaded))
    argv = ["llama-quantize"]
    if imatrix is not None:
        argv += ["--imatrix", str(imatrix)]
    for flag in tensor_type_flags(plan.types):
        argv += ["--tensor-type", flag]
    base = loaded.base
    if base in (T.F32, T.F16, T.BF16):
        argv += ["--override-kv", f"general.file_type=int:{int(recipe_file_type(base))}"]
        file_type = recipe_file_type(T.Q8_0)
    else:
        file_type = recipe_file_type(base)
    argv += ["--override-kv", f"medgemma_gguf.quant=str:{loaded.name}"]
    argv += [str(source_path), str(target), LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")]
    return QuantizeCommand(argv=argv, recipe=loaded.name, imatrix=imatrix)
