"""Choose one ggml type per tensor group from measured sensitivity under a size, bpw or VRAM budget.

The input is a *sensitivity table*: for each tensor group ``g`` (one layer's ``attn_q``, ``ffn_down``, …,
or ``token_embd`` / ``output``) and each candidate ggml type ``t``, the measured KL increase ``ΔKL(g, t)``
when only ``g`` is stored as ``t`` and everything else stays at high precision.  The bytes of ``g`` at
``t`` come from its element counts and ``gguf.GGML_QUANT_SIZES``; a type whose block size does not divide
a row length of ``g`` is not a candidate for ``g``.

Additivity assumption: the KL increase of a whole mix is predicted as ``Σ_g ΔKL(g, t_g)``.  Errors of
different tensors do interact (they compound through the residual stream), so the prediction is a
ranking device, not a promise; measure the quantized model afterwards (quant_eval) to know its real KL.

The allocator minimises ``Σ ΔKL`` subject to ``Σ bytes ≤ capacity`` — a multiple-choice knapsack:

* ``dp``: dynamic programming over a byte axis in buckets of ``q`` bytes.  Costs are first taken relative
  to each group's smallest candidate.  ``q`` is the greatest common divisor of those extra byte costs when
  ``groups × (capacity / gcd)`` cells fit in ``max_cells``: the DP is then exact.  Otherwise ``q`` grows
  until the table fits; each option's bytes are rounded UP to whole buckets and the capacity DOWN, so
  every DP answer fits the exact budget (it may give away less than ``groups × q`` bytes).  The choice is
  then re-checked against the exact byte budget and topped up by single-group switches that still fit.
* ``greedy``: start every group at its smallest type, then take upgrades along each group's lower convex
  hull of (bytes, ΔKL) in order of ΔKL saved per byte, skipping those that do not fit; then the same
  top-up; a final check that the total fits.
* ``auto`` (default): the exact DP when it fits in ``max_cells``; otherwise both the bucketed DP and the
  greedy, keeping the lower predicted ΔKL.

A budget below the smallest mix (every group at its smallest candidate) or above the unquantized size
(every counted group at the table's reference type) is a UserError stating that feasible range.

Budgets (module functions turn each into a capacity over the groups it counts):

* ``SizeBudget`` — file bytes: the counted groups plus the tensors outside the table (norms, at their
  source type) plus an estimate of the GGUF header and alignment padding.
* ``BpwBudget`` — bits per weight over the quantized (table) tensors' elements only.
* ``VramBudget`` — what must fit on the GPU for ``n_ctx``: every layer and the output layer, the KV cache,
  the mmproj, the compute buffers and the CUDA headroom, as ``runtime.offload`` plans them for a full
  offload (``n_gpu_layers = n_layers + 1``).  Only tensors llama.cpp puts on the GPU count: all ``blk.*``
  tensors, ``output_norm``, ``output`` — or ``token_embd`` when the output is tied to it (llama.cpp then
  loads it a second time as the output matrix).  An untied ``token_embd`` stays on the CPU, so it costs
  nothing here and gets its most accurate candidate.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from medgemma_gguf.errors import UserError, setting
from medgemma_gguf.gguf_info import GgufInfo, read_gguf_info, tensor_nbytes
from medgemma_gguf.runtime.context_settings import ContextSettings
from medgemma_gguf.runtime.offload import (
    DEFAULT_HEADROOM_BYTES,
    MemoryModel,
    read_text_model,
    read_vision_model,
)
from medgemma_gguf.sizes import format_size

TABLE_FORMAT = "medgemma-gguf-sensitivity"
TABLE_VERSION = 1
DEFAULT_MAX_CELLS = 20_000_000  # DP table cells (one byte each for the back-pointers)
MIN_BUCKETS = 256  # below this many buckets the rounded DP is not trusted: greedy only
HEADER_SLACK_BYTES = 16 * 1024  # metadata a quantized file adds (file type, quantize version, imatrix keys)
GGUF_ALIGNMENT = 32
METHODS = ("auto", "dp", "greedy")

_GROUP_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_]+)$")


# ---------------------------------------------------------------------------------------------------
# Sensitivity table


def ggml_type(name: str | GGMLQuantizationType) -> GGMLQuantizationType:
    """The ggml type for a name such as ``"q4_k"`` or ``"Q4_K"``; UserError for unknown names."""
    if isinstance(name, GGMLQuantizationType):
        return name
    try:
        qtype = GGMLQuantizationType[str(name).upper()]
    except KeyError:
        raise UserError(f"unknown ggml type {name!r}; use a name such as Q4_K, Q6_K, Q8_0, BF16") from None
    if qtype not in GGML_QUANT_SIZES:
        raise UserError(f"ggml type {qtype.name} has no known block size; update the gguf package")
    return qtype


@dataclass(frozen=True)
class GroupShape:
    """Tensors that always share one type.

    ``name`` is ``blk.N.KIND`` or ``KIND`` (``token_embd``, ``output``); ``tensors`` holds (GGUF tensor
    name, ggml shape) pairs, ``shape[0]`` being the row length.
    """

    name: str
    tensors: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def layer(self) -> int | None:
        match = _GROUP_NAME.match(self.name)
        return int(match.group(1)) if match and match.group(1) is not None else None

    @property
    def kind(self) -> str:
        match = _GROUP_NAME.match(self.name)
        return match.group(2) if match else self.name

    @property
    def n_elements(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors)

    def fits(self, qtype: GGMLQuantizationType) -> bool:
        """Whether ``qtype``'s block size divides every row length of the group."""
        block = GGML_QUANT_SIZES[qtype][0]
        return all(shape[0] % block == 0 for _, shape in self.tensors)

    def n_bytes(self, qtype: GGMLQuantizationType) -> int:
        return sum(tensor_nbytes(qtype, shape) for _, shape in self.tensors)


@dataclass(frozen=True)
class TensorGroup(GroupShape):
    """A group with the measured ΔKL of each candidate type."""

    delta_kl: Mapping[GGMLQuantizationType, float]

    @property
    def candidates(self) -> tuple[GGMLQuantizationType, ...]:
        """The measured types whose block size fits, smallest first."""
        usable = [t for t in self.delta_kl if self.fits(t)]
        return tuple(sorted(usable, key=lambda t: (self.n_bytes(t), self.delta_kl[t], t.name)))


@dataclass(frozen=True)
class ModelLayout:
    """A model's groups and each group's candidate types, before any sensitivity is measured: enough for the
    budgets and their feasible range (``check_budget``)."""

    reference_type: GGMLQuantizationType
    groups: tuple[GroupShape, ...]
    candidates: Mapping[str, tuple[GGMLQuantizationType, ...]]


@dataclass(frozen=True)
class SensitivityTable:
    """Measured ΔKL per group and candidate type, against a model whose tensors are at ``reference_type``."""

    reference_type: GGMLQuantizationType
    groups: tuple[TensorGroup, ...]
    notes: str = ""

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise UserError("the sensitivity table lists a group twice; give each group once")
        if not self.groups:
            raise UserError("the sensitivity table has no groups; measure at least one tensor group")
        seen: set[str] = set()
        for group in self.groups:
            if not group.tensors:
                raise UserError(f"group {group.name} has no tensors; list its GGUF tensor names and shapes")
            for tensor, shape in group.tensors:
                if tensor in seen:
                    raise UserError(f"tensor {tensor} is in two groups; put each tensor in one group")
                seen.add(tensor)
                if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
                    raise UserError(f"tensor {tensor} has the bad shape {shape}; shapes are positive integers")
            for qtype, value in group.delta_kl.items():
                if not math.isfinite(value):
                    raise UserError(f"ΔKL of {group.name} at {qtype.name} is {value}; re-measure it (finite numbers)")
            if not group.candidates:
                raise UserError(
                    f"group {group.name} has no candidate type whose block size divides its row length "
                    f"{group.tensors[0][1][0]}; measure a type such as Q8_0, F16 or BF16 for it"
                )

    def group(self, name: str) -> TensorGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def to_json(self) -> str:
        """The table as JSON text (``read_sensitivity_table`` reads it back)."""
        data = {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "reference_type": self.reference_type.name,
            "notes": self.notes,
            "groups": [
                {
                    "name": g.name,
                    "tensors": [{"name": n, "shape": list(s)} for n, s in g.tensors],
                    "delta_kl": {t.name: float(v) for t, v in sorted(g.delta_kl.items(), key=lambda kv: kv[0].name)},
                }
                for g in self.groups
            ],
        }
        return json.dumps(data, indent=1) + "\n"


def parse_sensitivity_table(data: Any, source: str = "the sensitivity table") -> SensitivityTable:
    """A ``SensitivityTable`` from decoded JSON; UserError naming the first problem."""
    fix = "re-create it with the sensitivity measurement"
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise UserError(f"{source} is not a {TABLE_FORMAT} file; {fix}")
    if data.get("version") != TABLE_VERSION:
        raise UserError(f"{source} has version {data.get('version')!r}, this tool reads {TABLE_VERSION}; {fix}")
    groups = []
    try:
        for entry in data["groups"]:
            tensors = tuple((str(t["name"]), tuple(t["shape"])) for t in entry["tensors"])
            delta = {ggml_type(k): float(v) for k, v in entry["delta_kl"].items()}
            groups.append(TensorGroup(name=str(entry["name"]), tensors=tensors, delta_kl=delta))
        reference = ggml_type(data["reference_type"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{source} is malformed ({exc!r} missing or wrong); {fix}") from None
    return SensitivityTable(reference_type=reference, groups=tuple(groups), notes=str(data.get("notes", "")))


def read_sensitivity_table(path: Path | str) -> SensitivityTable:
    """Read a sensitivity table JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"sensitivity table not found: {path}; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path} as JSON ({exc}); pass the sensitivity table file") from None
    return parse_sensitivity_table(data, str(path))


# ---------------------------------------------------------------------------------------------------
# The knapsack


@dataclass(frozen=True)
class Solution:
    """Chosen option index per group, with its exact total bytes and cost."""

    choice: tuple[int, ...]
    total_bytes: int
    total_cost: float
    method: str  # "dp-exact" | "dp-bucketed" | "greedy" | "unconstrained"


class Infeasible(Exception):
    """Even the smallest option of every group exceeds the capacity."""

    def __init__(self, minimum: int):
        super().__init__(f"needs at least {minimum} bytes")
        self.minimum = minimum


def _totals(options: Sequence[Sequence[tuple[int, float]]], choice: Sequence[int]) -> tuple[int, float]:
    return (sum(options[g][i][0] for g, i in enumerate(choice)),
            math.fsum(options[g][i][1] for g, i in enumerate(choice)))


def _smallest(opts: Sequence[tuple[int, float]]) -> int:
    return min(range(len(opts)), key=lambda i: (opts[i][0], opts[i][1]))


def _pareto(opts: Sequence[tuple[int, float]]) -> list[int]:
    """Indices of the options not beaten on both bytes and cost, by increasing bytes (decreasing cost)."""
    kept: list[int] = []
    for i in sorted(range(len(opts)), key=lambda i: (opts[i][0], opts[i][1])):
        if not kept or opts[i][1] < opts[kept[-1]][1]:
            kept.append(i)
    return kept


def _top_up(options: Sequence[Sequence[tuple[int, float]]], choice: list[int], capacity: int) -> None:
    """Apply the best single-group switch that lowers the cost and still fits, until none is left."""
    used = _totals(options, choice)[0]
    while True:
        best: tuple[float, int, int] | None = None
        for g, opts in enumerate(options):
            now_bytes, now_cost = opts[choice[g]]
            for i, (n_bytes, cost) in enumerate(opts):
                gain = now_cost - cost
                if gain > 0 and used - now_bytes + n_bytes <= capacity and (best is None or gain > best[0]):
                    best = (gain, g, i)
        if best is None:
            return
        _, g, i = best
        used += options[g][i][0] - options[g][choice[g]][0]
        choice[g] = i


def _dp(options: Sequence[Sequence[tuple[int, float]]], capacity: int, max_cells: int) -> Solution | None:
    """Multiple-choice knapsack by DP over bytes (exact when the gcd-sized table fits); None if too large."""
    base = [min(b for b, _ in opts) for opts in options]
    room = capacity - sum(base)
    fronts = [_pareto(opts) for opts in options]
    extras = [[options[g][i][0] - base[g] for i in front] for g, front in enumerate(fronts)]
    room = min(room, sum(max(e) for e in extras))
    step = math.gcd(*(e for row in extras for e in row)) or 1
    n = len(options)
    exact = n * (room // step + 1) <= max_cells
    if not exact:
        buckets = max_cells // n - 1
        if buckets < MIN_BUCKETS:
            return None
        step = -(-room // buckets)
    n_buckets = room // step
    best = np.zeros(n_buckets + 1)
    back = np.zeros((n, n_buckets + 1), dtype=np.uint8 if max(map(len, fronts)) < 256 else np.uint16)
    for g, front in enumerate(fronts):
        new = np.full(n_buckets + 1, np.inf)
        for k, i in enumerate(front):
            weight = -(-extras[g][k] // step)  # rounded up: a DP-feasible choice fits the exact budget
            if weight > n_buckets:
                continue
            shifted = best[: n_buckets + 1 - weight] + options[g][i][1]
            better = shifted < new[weight:]
            new[weight:][better] = shifted[better]
            back[g, weight:][better] = k
        best = new
    choice = [0] * n
    cell = n_buckets
    for g in range(n - 1, -1, -1):
        k = int(back[g, cell])
        choice[g] = fronts[g][k]
        cell -= -(-extras[g][k] // step)
    if not exact:
        _top_up(options, choice, capacity)
    total_bytes, total_cost = _totals(options, choice)
    if total_bytes > capacity:  # the re-check against the exact budget
        raise AssertionError(f"DP chose {total_bytes} bytes for a capacity of {capacity}")
    return Solution(tuple(choice), total_bytes, total_cost, "dp-exact" if exact else "dp-bucketed")


def _greedy(options: Sequence[Sequence[tuple[int, float]]], capacity: int) -> Solution:
    """Upgrades along each group's lower convex hull by ΔKL saved per byte, then a top-up."""
    hulls: list[list[int]] = []
    for opts in options:
        hull: list[int] = []
        for i in _pareto(opts):
            while len(hull) >= 2:
                (b0, c0), (b1, c1), (b2, c2) = opts[hull[-2]], opts[hull[-1]], opts[i]
                if (c0 - c1) * (b2 - b1) <= (c1 - c2) * (b1 - b0):  # middle point not on the lower hull
                    hull.pop()
                else:
                    break
            hull.append(i)
        hulls.append(hull)
    position = [0] * len(options)
    choice = [hull[0] for hull in hulls]
    used = sum(options[g][i][0] for g, i in enumerate(choice))
    heap: list[tuple[float, int]] = []

    def push(g: int) -> None:
        if position[g] + 1 < len(hulls[g]):
            (b0, c0), (b1, c1) = options[g][hulls[g][position[g]]], options[g][hulls[g][position[g] + 1]]
            heapq.heappush(heap, (-(c0 - c1) / (b1 - b0), g))

    for g in range(len(options)):
        push(g)
    while heap:
        _, g = heapq.heappop(heap)
        nxt = hulls[g][position[g] + 1]
        extra = options[g][nxt][0] - options[g][choice[g]][0]
        if used + extra <= capacity:
            used += extra
            position[g] += 1
            choice[g] = nxt
            push(g)
    _top_up(options, choice, capacity)
    total_bytes, total_cost = _totals(options, choice)
    if total_bytes > capacity:  # final feasibility check
        raise AssertionError(f"greedy chose {total_bytes} bytes for a capacity of {capacity}")
    return Solution(tuple(choice), total_bytes, total_cost, "greedy")


def solve_knapsack(options: Sequence[Sequence[tuple[int, float]]], capacity: int, method: str = "auto",
                   max_cells: int = DEFAULT_MAX_CELLS) -> Solution:
    """Pick one (bytes, cost) option per group minimising Σ cost with Σ bytes ≤ ``capacity``.

    Raises ``Infeasible`` when even the smallest options do not fit. See the module docstring for methods.
    """
    if method not in METHODS:
        raise UserError(f"unknown allocation method {method!r}; choose one of {', '.join(METHODS)}")
    if not options or any(not opts for opts in options):
        raise ValueError("every group needs at least one option")
    smallest = [_smallest(opts) for opts in options]
    minimum = sum(options[g][i][0] for g, i in enumerate(smallest))
    if minimum > capacity:
        raise Infeasible(minimum)
    cheapest = [min(range(len(opts)), key=lambda i: (opts[i][1], opts[i][0])) for opts in options]
    total_bytes, total_cost = _totals(options, cheapest)
    if total_bytes <= capacity:
        return Solution(tuple(cheapest), total_bytes, total_cost, "unconstrained")
    if method == "greedy":
        return _greedy(options, capacity)
    solution = _dp(options, capacity, max_cells)
    if method == "dp":
        if solution is None:
            raise UserError(f"the DP table would exceed {max_cells} cells; use method 'auto' or 'greedy'")
        return solution
    if solution is not None and solution.method == "dp-exact":
        return solution
    greedy = _greedy(options, capacity)
    return greedy if solution is None or greedy.total_cost < solution.total_cost else solution


# ---------------------------------------------------------------------------------------------------
# Budgets


@dataclass(frozen=True)
class ModelFacts:
    """What budgets need to know about the unquantized text GGUF the table was measured on."""

    path: Path
    info: GgufInfo
    fixed_tensors: tuple[str, ...]  # tensors outside the table: they keep their source type
    header_bytes: int  # estimate of header + alignment padding of the quantized file
    tied_embeddings: bool

    def fixed_bytes(self, names: Iterable[str] | None = None) -> int:
        wanted = set(self.fixed_tensors if names is None else names)
        return sum(t.n_bytes for t in self.info.tensors if t.name in wanted)


Layout = SensitivityTable | ModelLayout  # what budgets count: groups (and their shapes) of one model


def model_facts(gguf_path: Path | str, table: Layout) -> ModelFacts:
    """Check the table against the GGUF's tensors and collect what the budgets need."""
    info = read_gguf_info(gguf_path)
    if info.architecture == "clip":
        raise UserError(f"{info.path} is an mmproj file; pass the unquantized text model GGUF")
    shapes = {t.name: t.shape for t in info.tensors}
    in_table: set[str] = set()
    for group in table.groups:
        for name, shape in group.tensors:
            if name not in shapes:
                raise UserError(f"tensor {name} of the sensitivity table is not in {info.path}; "
                                "measure the table on this model")
            if tuple(shapes[name]) != tuple(shape):
                raise UserError(f"tensor {name} is {list(shapes[name])} in {info.path} but {list(shape)} in the "
                                "sensitivity table; measure the table on this model")
            in_table.add(name)
    fixed = []
    for tensor in info.tensors:
        if tensor.name in in_table:
            continue
        if len(tensor.shape) > 1 and math.prod(tensor.shape[1:]) > 1:
            raise UserError(f"the sensitivity table lacks the matrix {tensor.name} of {info.path}; "
                            "measure every matrix of the model")
        fixed.append(tensor.name)
    file_size = info.path.stat().st_size
    header = file_size - info.total_tensor_bytes + GGUF_ALIGNMENT * len(info.tensors) + HEADER_SLACK_BYTES
    return ModelFacts(path=info.path, info=info, fixed_tensors=tuple(fixed), header_bytes=header,
                      tied_embeddings=info.tensor("output.weight") is None)


@dataclass(frozen=True)
class Capacity:
    """A budget as the allocator sees it: counted groups' bytes ≤ ``capacity``; ``overhead`` is the rest."""

    capacity: int
    counted: frozenset[str]
    overhead: int
    label: str
    flag: str = ""  # the setting the user gave it with (``setting(...)``: each interface words it), if any
    given: str = ""  # that setting and its value, as the refusals name it

    def named(self) -> str:
        """What the user gave, for an error message: the setting and its value, else ``the budget (label)``."""
        return self.given or f"the budget ({self.label})"

    def user_value(self, counted_bytes: int) -> str:
        """The budget's own measure for a mix using ``counted_bytes``."""
        return format_size(counted_bytes + self.overhead)


@dataclass(frozen=True)
class SizeBudget:
    """``--target-size``: the quantized text GGUF's file size in bytes."""

    total_bytes: int

    def capacity(self, table: Layout, facts: ModelFacts) -> Capacity:
        overhead = facts.fixed_bytes() + facts.header_bytes
        return Capacity(self.total_bytes - overhead, frozenset(g.name for g in table.groups), overhead,
                        f"file size {format_size(self.total_bytes)}", setting("target_size"),
                        f"{setting('target_size')} {format_size(self.total_bytes)}")


@dataclass(frozen=True)
class BpwBudget:
    """``--target-bpw``: bits per weight over the table's (quantized) tensors."""

    bits_per_weight: float

    def capacity(self, table: Layout, facts: ModelFacts) -> Capacity:
        n_elements = sum(g.n_elements for g in table.groups)
        capacity = math.floor(self.bits_per_weight * n_elements / 8)
        return _BpwCapacity(capacity, frozenset(g.name for g in table.groups), 0,
                            f"{self.bits_per_weight:g} bits per weight", setting("target_bpw"),
                            f"{setting('target_bpw')} {self.bits_per_weight:g}", n_elements=n_elements)


@dataclass(frozen=True)
class _BpwCapacity(Capacity):
    n_elements: int = 1

    def user_value(self, counted_bytes: int) -> str:
        return f"{8 * counted_bytes / self.n_elements:.3f} bpw"


@dataclass(frozen=True)
class VramBudget:
    """``--vram``/``--ctx``: the whole model on the GPU with a KV cache for ``n_ctx`` (module docstring), in the
    context the runtime creates (``runtime.context_settings``: small SWA cache, f16 KV, flash attention auto,
    one logits row) unless told otherwise."""

    vram_bytes: int
    n_ctx: int
    mmproj_path: Path | None = None
    n_ubatch: int = 512
    flash_attn: str = "auto"
    swa_full: bool = False
    kv_type: str = "f16"
    headroom_bytes: int = DEFAULT_HEADROOM_BYTES

    def breakdown(self, facts: ModelFacts) -> dict[str, int]:
        """Bytes of everything on the GPU that does not depend on the weights' types (``runtime.offload``)."""
        model = read_text_model(facts.path)
        if self.n_ctx < 1:
            raise UserError(f"{setting('auto_ctx')} must be a positive number of tokens, got {self.n_ctx}")
        settings = ContextSettings(n_ctx=self.n_ctx, n_ubatch=self.n_ubatch, flash_attn=self.flash_attn,
                                   swa_full=self.swa_full, type_k=self.kv_type, type_v=self.kv_type, n_outputs_max=1)
        vision = read_vision_model(self.mmproj_path) if self.mmproj_path is not None else None
        plan = MemoryModel(model, vision, settings, True, self.headroom_bytes).plan(model.n_layers + 1,
                                                                                    self.vram_bytes)
        gpu_fixed = [n for n in facts.fixed_tensors if n.startswith("blk.") or n.startswith("output")]
        return {"kv": plan.gpu_kv, "compute": plan.gpu_compute, "mmproj": plan.gpu_mmproj,
                "headroom": self.headroom_bytes, "fixed_weights": facts.fixed_bytes(gpu_fixed)}

    def capacity(self, table: Layout, facts: ModelFacts) -> Capacity:
        parts = self.breakdown(facts)
        overhead = sum(parts.values())
        counted = frozenset(g.name for g in table.groups if on_gpu(g, facts.tied_embeddings))
        return Capacity(self.vram_bytes - overhead, counted, overhead,
                        f"VRAM {format_size(self.vram_bytes)} at context {self.n_ctx}", setting("vram_budget"),
                        f"{setting('vram_budget')} {format_size(self.vram_bytes)} at {setting('auto_ctx')} "
                        f"{self.n_ctx}")


def on_gpu(group: GroupShape, tied_embeddings: bool) -> bool:
    """Whether llama.cpp puts the group on the GPU with a full offload (module docstring)."""
    names = [name for name, _ in group.tensors]
    return all(n.startswith(("blk.", "output.")) or (tied_embeddings and n.startswith("token_embd.")) for n in names)


Budget = SizeBudget | BpwBudget | VramBudget


def parse_budget(target_size: str | None = None, target_bpw: float | None = None, vram: str | None = None,
                 ctx: int | None = None, mmproj: Path | None = None) -> Budget:
    """The one budget given by CLI-style options; UserError unless exactly one is given."""
    from medgemma_gguf.sizes import parse_size

    given = [name for name, value in ((setting("target_size"), target_size), (setting("target_bpw"), target_bpw),
                                      (setting("vram_budget"), vram)) if value is not None]
    if len(given) != 1:
        raise UserError(f"give exactly one of {setting('target_size')}, {setting('target_bpw')}, "
                        f"{setting('vram_budget')} (got {', '.join(given) or 'none'})")
    if ctx is not None and vram is None:
        raise UserError(f"{setting('auto_ctx')} only applies with {setting('vram_budget')}; drop it or add "
                        f"{setting('vram_budget')}")
    if target_size is not None:
        return SizeBudget(parse_size(target_size, setting("target_size")))
    if target_bpw is not None:
        if isinstance(target_bpw, bool) or not isinstance(target_bpw, int | float) or not 0 < target_bpw <= 32:
            raise UserError(f"{setting('target_bpw')} must be a number of bits above 0 and at most 32, got "
                            f"{target_bpw!r}")
        return BpwBudget(float(target_bpw))
    if ctx is None:
        raise UserError(f"{setting('vram_budget')} needs {setting('auto_ctx')} (the context length the model must "
                        "run with), e.g. 8192")
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1:
        raise UserError(f"{setting('auto_ctx')} must be a positive number of tokens, got {ctx!r}")
    return VramBudget(parse_size(str(vram), setting("vram_budget")), ctx, Path(mmproj) if mmproj is not None else None)


# ---------------------------------------------------------------------------------------------------
# Allocation


@dataclass(frozen=True)
class QuantMix:
    """One type per group, as chosen under a budget."""

    types: dict[str, GGMLQuantizationType]
    tensor_types: dict[str, GGMLQuantizationType]
    predicted_delta_kl: float
    counted_bytes: int
    budget: Capacity
    method: str
    group_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Bytes of all groups (counted or not) at their chosen types."""
        return sum(self.group_bytes.values())

    def summary(self) -> str:
        return (f"{self.budget.label}: {self.budget.user_value(self.counted_bytes)} used, predicted ΔKL "
                f"{self.predicted_delta_kl:.6g} (additive), method {self.method}")


def allocate(table: SensitivityTable, budget: Capacity, method: str = "auto",
             max_cells: int = DEFAULT_MAX_CELLS) -> QuantMix:
    """Choose a type per group minimising Σ ΔKL within ``budget``; UserError with the feasible range if none."""
    groups = table.groups
    candidates = [g.candidates for g in groups]
    options = [[(g.n_bytes(t) if g.name in budget.counted else 0, g.delta_kl[t]) for t in cands]
               for g, cands in zip(groups, candidates, strict=True)]
    check_budget(ModelLayout(table.reference_type, groups, {g.name: c for g, c in zip(groups, candidates,
                                                                                       strict=True)}), budget)
    solution = solve_knapsack(options, budget.capacity, method, max_cells)
    types = {g.name: candidates[k][i] for k, (g, i) in enumerate(zip(groups, solution.choice, strict=True))}
    tensor_types = {name: types[g.name] for g in groups for name, _ in g.tensors}
    return QuantMix(types=types, tensor_types=tensor_types, predicted_delta_kl=solution.total_cost,
                    counted_bytes=solution.total_bytes, budget=budget, method=solution.method,
                    group_bytes={g.name: g.n_bytes(types[g.name]) for g in groups})


def feasible_range(layout: ModelLayout, budget: Capacity) -> tuple[int, int]:
    """(smallest, unquantized) counted bytes: every counted group at its smallest candidate, or at the
    reference type."""
    smallest = sum(min(g.n_bytes(t) for t in layout.candidates[g.name]) for g in layout.groups
                   if g.name in budget.counted)
    unquantized = sum(g.n_bytes(layout.reference_type) for g in layout.groups if g.name in budget.counted)
    return smallest, unquantized


def check_budget(layout: ModelLayout, budget: Capacity) -> None:
    """UserError with the feasible range for a budget no mix of the candidates can meet (before any work)."""
    for group in layout.groups:
        if not layout.candidates.get(group.name):
            raise UserError(f"group {group.name} has no candidate type whose block size divides its row length "
                            f"{group.tensors[0][1][0]}; add a type such as Q8_0, F16 or BF16 to the candidates")
    smallest, unquantized = feasible_range(layout, budget)
    flag = budget.flag or "the budget"
    if budget.capacity > unquantized:
        raise UserError(
            f"{budget.named()} is above the unquantized size; feasible range "
            f"{budget.user_value(smallest)} .. {budget.user_value(unquantized)} (unquantized "
            f"{layout.reference_type.name}); lower {flag} or use the unquantized file"
        )
    if budget.capacity < smallest:
        raise UserError(
            f"{budget.named()} is below the smallest possible mix; feasible range "
            f"{budget.user_value(smallest)} (every tensor at its smallest candidate) .. "
            f"{budget.user_value(unquantized)} (unquantized {layout.reference_type.name}); raise {flag}"
        )


# ---------------------------------------------------------------------------------------------------
# Recipe output


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def mix_to_recipe_toml(mix: QuantMix, name: str, base_type: GGMLQuantizationType | None = None,
                       description: str = "") -> str:
    """The mix as a recipe TOML: a base type plus one explicit rule per tensor (exact-name pattern).

    ``base_type`` defaults to the type holding the most bytes; every tensor still gets its own rule, so
    the base only matters for tensors the table does not list.
    """
    if base_type is None:
        by_type: dict[GGMLQuantizationType, int] = {}
        for group, qtype in mix.types.items():
            by_type[qtype] = by_type.get(qtype, 0) + mix.group_bytes[group]
        base_type = max(sorted(by_type, key=lambda t: t.name), key=lambda t: by_type[t])
    lines = [
        "# Written by medgemma-gguf auto-quant from measured per-tensor sensitivity.",
        f"# {mix.summary()}",
        "",
        f"name = {_toml_string(name)}",
        f"description = {_toml_string(description or mix.summary())}",
        f"base = {_toml_string(base_type.name)}",
        "",
    ]
    for tensor, qtype in sorted(mix.tensor_types.items(), key=lambda kv: _tensor_sort_key(kv[0])):
        lines += ["[[rules]]", f"pattern = {_toml_string('^' + re.escape(tensor) + '$')}",
                  f"type = {_toml_string(qtype.name)}", ""]
    return "\n".join(lines)


def _tensor_sort_key(name: str) -> tuple[int, str]:
    match = re.match(r"^blk\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def recipe_tensor_types(text: str) -> dict[str, GGMLQuantizationType]:
    """Per-tensor types of a recipe written by ``mix_to_recipe_toml`` (exact-name rules only)."""
    import tomllib

    data = tomllib.loads(text)
    types: dict[str, GGMLQuantizationType] = {}
    for rule in data.get("rules", []):
        pattern = rule["pattern"]
        if not (pattern.startswith("^") and pattern.endswith("$")):
            raise UserError(f"recipe rule {pattern!r} is not an exact tensor name; this reader needs exact names")
        types[re.sub(r"\\(.)", r"\1", pattern[1:-1])] = ggml_type(rule["type"])
    return types
