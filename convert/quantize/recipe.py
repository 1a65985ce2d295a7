"""Quantization recipes: a base ggml type plus ordered rules, turned into per-tensor types for one model.

A recipe is a TOML file (the bundled ones are in ``convert/recipes/``)::

    name = "UD-Q4_K_XL"
    description = "..."
    base = "Q4_K"                 # every quantizable tensor no rule names

    [[rules]]
    tensors = ["attn_v", "attn_k"] # tensor kinds (see KINDS), or `pattern = "<regex>"` on full names
    layers = "all"                 # optional: "all", "first 2", "last 1/8", "12.5%" fractions, "0-3, 7", or a list
    type = "Q6_K"
    why = "..."                    # which tensors get more bits and why (required in the bundled recipes)

Rules apply in order and a later rule overrides an earlier one for the tensors both select, so general
rules come first and exceptions after. ``optional = true`` lets a rule select nothing in a model (a rule
for ``output`` when the output is tied to ``token_embd``); any other rule that selects no tensor, a
tensor kind that does not exist, a layer beyond the model or a type llama.cpp cannot quantize to is an
error naming the file and line. The quantizable tensors are the ones llama.cpp's quantizer may change:
weights (``*.weight``) with two or more dimensions that are not norms.

``plan_recipe`` returns every quantizable tensor's planned type; ``QuantPlan.overrides`` are the
llama.cpp tensor-type overrides that ask for exactly that (one exact-name pattern per tensor, so
llama.cpp's own mixture logic never changes a planned type — only its shape fallbacks can).
``auto_quant.mix_to_recipe_toml`` writes recipes in this format (exact-name ``pattern`` rules).
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from medgemma_gguf.errors import UserError
from medgemma_gguf.gguf_info import is_quantizable
from medgemma_gguf.quant_types import GLOBAL_KINDS, KINDS, TENSOR_TYPES, tensor_kind

RECIPES_DIR = Path(__file__).with_name("recipes")
T = GGMLQuantizationType

# ggml types llama.cpp's quantizer can write for a tensor, and the tensor kinds: medgemma_gguf.quant_types
QUANT_TYPES: dict[str, GGMLQuantizationType] = {row.name: row.type for row in TENSOR_TYPES}
RULE_KEYS = {"tensors", "pattern", "layers", "type", "why", "optional"}
TOP_KEYS = {"name", "description", "base", "rules"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Rule:
    """One recipe rule, with the line of its ``[[rules]]`` header for error messages."""

    index: int  # 1-based position in the file
    tensors: tuple[str, ...]
    pattern: str | None
    layers: tuple[str, ...] | None
    type: GGMLQuantizationType
    why: str
    optional: bool
    line: int | None

    def describe(self) -> str:
        selector = f"pattern {self.pattern!r}" if self.pattern else ",".join(self.tensors)
        layers = f" layers {', '.join(self.layers)}" if self.layers else ""
        return f"{selector}{layers} -> {self.type.name}"


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe file."""

    name: str
    description: str
    base: GGMLQuantizationType
    rules: tuple[Rule, ...]
    source: str  # file path, or "<builtin NAME>"
    sha256: str  # of the file text: identifies the recipe in manifests
    text: str = field(repr=False, default="")

    def line_of(self, rule: Rule | None, key: str | None = None) -> str:
        """``file:line`` of a rule (and its key when found), for error messages."""
        if rule is None:
            line = _key_line(self.text, None, key) if key else None
        else:
            line = _key_line(self.text, rule.index - 1, key) if key else rule.line
        return f"{self.source}:{line}" if line else self.source


@dataclass(frozen=True)
class TensorSpec:
    """The little the planner needs about a tensor: name and ggml shape (``shape[0]`` = row length)."""

    name: str
    shape: tuple[int, ...]


@dataclass
class QuantPlan:
    """Planned type (and the reason) of every quantizable tensor of one model under one recipe."""

    recipe: Recipe
    types: dict[str, GGMLQuantizationType]
    reasons: dict[str, str]
    n_layers: int

    @property
    def overrides(self) -> list[tuple[str, GGMLQuantizationType]]:
        """llama.cpp tensor-type overrides: an exact-name regex for every planned tensor."""
        return [(f"^{re.escape(name)}$", qtype) for name, qtype in self.types.items()]

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for qtype in self.types.values():
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        return dict(sorted(counts.items()))


# --- parsing --------------------------------------------------------------------------------------------
def _rule_header_lines(text: str) -> list[int]:
    return [number for number, line in enumerate(text.splitlines(), 1) if re.match(r"^\s*\[\[\s*rules\s*\]\]", line)]


def _key_line(text: str, rule_index: int | None, key: str | None) -> int | None:
    """Line of ``key = ...`` inside the ``rule_index``-th ``[[rules]]`` table (top level when None)."""
    lines = text.splitlines()
    headers = _rule_header_lines(text)
    if rule_index is None:
        start, end = 0, (headers[0] - 1 if headers else len(lines))
    elif rule_index < len(headers):
        start = headers[rule_index]
        end = headers[rule_index + 1] - 1 if rule_index + 1 < len(headers) else len(lines)
    else:
        return None
    if key is not None:
        for number in range(start, end):
            if re.match(rf"^\s*{re.escape(key)}\s*=", lines[number]):
                return number + 1
    return headers[rule_index] if rule_index is not None else None


def parse_type(value: Any, where: str) -> GGMLQuantizationType:
    """A ggml type name llama.cpp can quantize to (case-insensitive)."""
    if isinstance(value, str) and value.upper() in QUANT_TYPES:
        return QUANT_TYPES[value.upper()]
    raise UserError(f"{where}: type {value!r} is not a ggml type llama.cpp can quantize to; use one of "
                    f"{', '.join(QUANT_TYPES)}")


def _string_list(value: Any, where: str, key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise UserError(f"{where}: {key} must be a string or a list of strings")
    return tuple(v.strip() for v in items)


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and check a recipe's text (not yet against a model); UserError naming the line on problems."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: not valid TOML ({exc}); fix the recipe file") from exc
    draft = Recipe(name="", description="", base=T.F32, rules=(), source=source, sha256="", text=text)
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise UserError(f"{draft.line_of(None, unknown[0])}: unknown key {unknown[0]!r}; a recipe has "
                        f"{', '.join(sorted(TOP_KEYS))}")
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UserError(f"{draft.line_of(None, 'name')}: name must be set to letters, digits, '.', '_' or '-' "
                        f"(it becomes part of the file name), got {name!r}")
    if "base" not in data:
        raise UserError(f"{source}: no base type; add e.g. base = \"Q4_K\"")
    base = parse_type(data["base"], draft.line_of(None, "base"))
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise UserError(f"{draft.line_of(None, 'rules')}: rules must be [[rules]] tables")
    headers = _rule_header_lines(text)
    rules = []
    for i, raw in enumerate(raw_rules):
        line = headers[i] if i < len(headers) else None
        rules.append(_parse_rule(raw, i + 1, line, draft))
    return Recipe(name=name, description=str(data.get("description", "")), base=base, rules=tuple(rules),
                  source=source, sha256=hashlib.sha256(text.encode()).hexdigest(), text=text)


def _parse_rule(raw: dict[str, Any], index: int, line: int | None, recipe: Recipe) -> Rule:
    probe = Rule(index, (), None, None, T.F32, "", False, line)

    def where(key: str | None = None) -> str:
        return f"{recipe.line_of(probe, key)}: rule {index}"

    unknown = sorted(set(raw) - RULE_KEYS)
    if unknown:
        raise UserError(f"{where(unknown[0])}: unknown key {unknown[0]!r}; a rule has {', '.join(sorted(RULE_KEYS))}")
    if ("tensors" in raw) == ("pattern" in raw):
        raise UserError(f"{where()}: give exactly one of tensors = [...] (tensor kinds) or pattern = \"<regex>\"")
    tensors: tuple[str, ...] = ()
    pattern = None
    if "tensors" in raw:
        tensors = _string_list(raw["tensors"], where("tensors"), "tensors")
        for kind in tensors:
            if kind not in KINDS:
                raise UserError(f"{where('tensors')}: unknown tensor kind {kind!r}; use one of {', '.join(KINDS)} "
                                "or a pattern")
    else:
        pattern = raw["pattern"]
        if not isinstance(pattern, str) or not pattern:
            raise UserError(f"{where('pattern')}: pattern must be a non-empty regular expression string")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(f"{where('pattern')}: pattern {pattern!r} is not a valid regex ({exc})") from exc
    layers = _string_list(raw["layers"], where("layers"), "layers") if "layers" in raw else None
    if layers is not None:
        if pattern is not None:
            raise UserError(f"{where('layers')}: layers only go with tensors = [...], not with a pattern")
        global_kinds = [k for k in tensors if k in GLOBAL_KINDS]
        if global_kinds:
            raise UserError(f"{where('layers')}: {global_kinds[0]} is not a layer tensor; drop layers or the kind")
        for spec in layers:
            _layer_set(spec, 1000, where("layers"))  # syntax check; bounds are checked against the model
    if "type" not in raw:
        raise UserError(f"{where()}: no type; add e.g. type = \"Q6_K\"")
    qtype = parse_type(raw["type"], where("type"))
    why = raw.get("why", "")
    if not isinstance(why, str):
        raise UserError(f"{where('why')}: why must be a string")
    optional = raw.get("optional", False)
    if not isinstance(optional, bool):
        raise UserError(f"{where('optional')}: optional must be true or false")
    return Rule(index, tensors, pattern, layers, qtype, why.strip(), optional, line)


def _count(amount: str, n_layers: int, where: str, spec: str) -> int:
    """A layer count: an integer, a fraction ``1/8`` or a percentage ``12.5%`` of the depth (rounded up)."""
    amount = amount.strip()
    try:
        if amount.endswith("%"):
            fraction = float(amount[:-1]) / 100
        elif "/" in amount:
            top, bottom = amount.split("/")
            fraction = int(top) / int(bottom)
        else:
            return int(amount)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{where}: cannot read the layer count in {spec!r}; write e.g. 'first 2', 'last 1/8', "
                        "'first 12.5%'") from None
    if not 0 < fraction <= 1:
        raise UserError(f"{where}: {spec!r} is not a fraction of the depth between 0 and 1")
    return max(1, math.ceil(fraction * n_layers - 1e-9))


def _layer_set(spec: str, n_layers: int, where: str) -> set[int]:
    """Layers selected by one spec: 'all', 'first N', 'last N' (N a count, fraction or %), or '0-3, 7'."""
    text = spec.strip().lower()
    if text == "all":
        return set(range(n_layers))
    words = text.split(None, 1)
    if words[0] in ("first", "last") and len(words) == 2:
        count = _count(words[1], n_layers, where, spec)
        if count < 1 or count > n_layers:
            raise UserError(f"{where}: {spec!r} selects {count} layers but the model has {n_layers}")
        return set(range(count)) if words[0] == "first" else set(range(n_layers - count, n_layers))
    chosen: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UserError(f"{where}: cannot read layers {spec!r}; write 'all', 'first 2', 'last 1/8', or "
                            "ranges like '0-3, 7'")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high < low:
            raise UserError(f"{where}: layer range {part.strip()!r} runs backwards")
        if high >= n_layers:
            raise UserError(f"{where}: layer {high} is beyond this model's {n_layers} layers (0-{n_layers - 1})")
        chosen.update(range(low, high + 1))
    return chosen


def load_recipe(path: Path | str) -> Recipe:
    """Read a recipe file (a bundled name like ``UD-Q4_K_XL`` is also accepted)."""
    path = Path(path)
    if not path.is_file():
        if str(path) in builtin_recipe_names():
            return builtin_recipe(str(path))
        raise UserError(f"recipe file {path} not found; pass a .toml recipe or one of "
                        f"{', '.join(builtin_recipe_names())}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe {path} ({exc}); pass a UTF-8 TOML file") from exc
    return parse_recipe(text, str(path))


def builtin_recipe_names() -> list[str]:
    """Names of the bundled recipes (file stems in ``convert/recipes``)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def builtin_recipe(name: str) -> Recipe:
    """A bundled recipe by name."""
    path = RECIPES_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"no bundled recipe {name!r}; choose one of {', '.join(builtin_recipe_names())}")
    recipe = parse_recipe(path.read_text(encoding="utf-8"), f"<builtin {path.name}>")
    if recipe.name != name:
        raise UserError(f"bundled recipe {path.name} is named {recipe.name!r}; its name must match the file")
    return recipe


# --- planning -------------------------------------------------------------------------------------------
def _as_specs(tensors: Iterable[Any]) -> list[TensorSpec]:
    return [TensorSpec(t.name, tuple(t.shape)) for t in tensors]


def plan_recipe(recipe: Recipe, tensors: Iterable[Any]) -> QuantPlan:
    """Every quantizable tensor's type under ``recipe`` (``tensors``: objects with ``name`` and ggml ``shape``).

    UserError (naming the recipe line) for a rule that selects no tensor unless it is optional.
    """
    specs = [t for t in _as_specs(tensors) if is_quantizable(t.name, t.shape)]
    layered = [tensor_kind(t.name) for t in specs]
    n_layers = 1 + max((layer for _, layer in layered if layer is not None), default=-1)
    types = {t.name: recipe.base for t in specs}
    reasons = {t.name: f"base type {recipe.base.name}" for t in specs}
    for rule in recipe.rules:
        where = f"{recipe.line_of(rule)}: rule {rule.index} ({rule.describe()})"
        selected = _select(rule, specs, layered, n_layers, f"{recipe.line_of(rule, 'layers')}: rule {rule.index}")
        if not selected and not rule.optional:
            what = f"pattern {rule.pattern!r}" if rule.pattern else f"tensor kind(s) {', '.join(rule.tensors)}"
            present = sorted({kind for kind, _ in layered})
            raise UserError(f"{where}: {what} matches no tensor of this model (its kinds: {', '.join(present)}); "
                            "fix the rule or mark it optional = true")
        for name in selected:
            types[name] = rule.type
            reasons[name] = f"rule {rule.index}: {rule.why or rule.describe()}"
    return QuantPlan(recipe=recipe, types=types, reasons=reasons, n_layers=n_layers)


def _select(rule: Rule, specs: list[TensorSpec], layered: list[tuple[str, int | None]], n_layers: int,
            where: str) -> list[str]:
    if rule.pattern is not None:
        regex = re.compile(rule.pattern)
        return [t.name for t in specs if regex.search(t.name)]
    layers: set[int] | None = None
    if rule.layers is not None:
        if n_layers == 0:
            raise UserError(f"{where}: this model has no layers to select")
        layers = set().union(*(_layer_set(spec, n_layers, where) for spec in rule.layers))
    return [t.name for t, (kind, layer) in zip(specs, layered, strict=True)
            if kind in rule.tensors and (layers is None or layer is None or layer in layers)]
