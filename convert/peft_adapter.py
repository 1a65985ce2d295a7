"""PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``, as PEFT and Unsloth save
them): read, check against a base model, and give each adapted tensor's ``scale · B·A``.

What an adapter computes (PEFT's ``LoraLayer``): ``W' = W + scale · B @ A`` with ``A`` of shape
``(r, in)``, ``B`` of shape ``(out, r)`` and ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
``use_rslora``; ``alpha_pattern`` overrides ``lora_alpha`` per module (matched as PEFT matches it) and
each module's rank is its tensors' (``rank_pattern`` is already in their shapes). An embedding LoRA
(``lora_embedding_A`` ``(r, vocab)``, ``lora_embedding_B`` ``(n_embd, r)``) adds ``scale · (B @ A)ᵀ``.
``modules_to_save`` tensors (a full trained ``embed_tokens`` / ``lm_head``, Google's MedGemma notebook
recipe) replace the base tensor.

Tensor names: PEFT stores ``base_model.model.<module>.lora_A.weight`` with ``<module>`` the module path
in the model it was trained on — transformers 5.x (``model.language_model.layers.N…``,
``model.vision_tower.encoder…``), older transformers (``language_model.model.layers.N…``,
``vision_tower.vision_model.encoder…``) or text-only Gemma3ForCausalLM (``model.layers.N…``). Each is
mapped through the converter's one table (``tensor_names``) to its GGUF name, which is what joins it to
the base model whatever layout the base was saved in.

Refused with one line naming them, before anything is written: other PEFT types (LoHa, LoKr, IA³, AdaLoRA,
prompt tuning, …), DoRA, QALoRA, activated LoRA, LoRA biases, trained base biases, trainable tokens,
layer replication, raw-parameter targets, convolution targets, initialisations that change the base
weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, unless converted to plain LoRA), and embedding tensors
with more rows than the base vocabulary (tokens added in fine-tuning: the GGUF vocabulary would need them
too). An adapter whose modules or shapes are not the base model's is refused as made for another model.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medgemma_gguf.convert.tensor_names import Component, is_vision_head, map_tensor_name
from medgemma_gguf.errors import InputError, MismatchError, NotFoundError, setting
from medgemma_gguf.hashing import sha256_of
from medgemma_gguf.hub import resolve_source

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"]

# adapter_config.json options that change what the adapter computes beyond W + scale·B·A (true = in use)
UNSUPPORTED_OPTIONS: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QALoRA (use_qalora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
}
# initialisations that also change the base weights in training: A/B alone do not give the trained model
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# tensor name pieces that only other adapter kinds store
UNSUPPORTED_TENSORS: dict[str, str] = {
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    "trainable_tokens": "trainable tokens (trainable_tokens_delta)",
    "lora_E": "AdaLoRA (lora_E)",
}
PREFIX = "base_model.model."
_LINEAR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight$")
_EMBEDDING = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_embedding_(?P<half>[AB])$")
TIED_OUTPUT_SOURCE = "<adapter: output.weight>"  # PlannedTensor.source_name of an untied output written by a merge


@dataclass(frozen=True)
class LoraPair:
    """One adapted base tensor."""

    module: str  # PEFT module path, e.g. model.language_model.layers.0.self_attn.q_proj
    gguf_name: str  # blk.0.attn_q.weight
    component: Component
    a_key: str
    b_key: str
    rank: int
    scale: float  # what B·A is multiplied by
    embedding: bool = False

    @property
    def is_vision(self) -> bool:
        return self.component is not Component.TEXT


@dataclass(frozen=True)
class Replacement:
    """A ``modules_to_save`` tensor: a full trained copy that replaces the base tensor."""

    module: str
    gguf_name: str
    key: str
    shape: tuple[int, ...]


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class PeftAdapter:
    """A PEFT LoRA adapter folder, checked on opening (config and tensor names), tensors read lazily."""

    def __init__(self, folder: Path, *, repo_or_path: str, revision: str | None, is_hub: bool):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.repo_or_path = repo_or_path
        self.revision = revision
        self.is_hub = is_hub
        config_path = self.folder / ADAPTER_CONFIG
        weights = self.folder / ADAPTER_WEIGHTS
        if not config_path.is_file():
            raise NotFoundError(f"{self.folder} has no {ADAPTER_CONFIG}; {setting('adapter')} takes a PEFT adapter "
                                "folder as model.save_pretrained() writes it, or its Hub repo id")
        if not weights.is_file():
            if (self.folder / "adapter_model.bin").is_file():
                raise InputError(f"{self.folder} has only adapter_model.bin; save the adapter with safetensors "
                                 "(model.save_pretrained(..., safe_serialization=True)) and pass that")
            raise NotFoundError(f"{self.folder} has no {ADAPTER_WEIGHTS}; the adapter download is incomplete")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{config_path} is not valid JSON; re-download or re-save the adapter") from exc
        self.weights_path = weights
        try:
            self._handle = safe_open(str(weights), framework="pt")
            self.shapes = {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._handle.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises SafetensorError, a plain Exception subclass
            raise InputError(f"{weights} is not a readable safetensors file; re-download or re-save the "
                             "adapter") from exc
        self._check_config()
        self.lora_alpha = float(self.config["lora_alpha"])
        self.use_rslora = bool(self.config.get("use_rslora"))
        self.pairs, self.replacements, self.skipped = self._read_tensors()

    @classmethod
    def open(cls, source: str, *, token: str | None = None, revision: str | None = None) -> PeftAdapter:
        """A local adapter folder, or a Hub repo id downloaded (only the adapter's files) into the cache."""
        resolved = resolve_source(source, token=token, revision=revision, patterns=ADAPTER_FILES,
                                  what="the adapter folder (with adapter_config.json)")
        return cls(resolved.folder, repo_or_path=resolved.repo_or_path, revision=resolved.revision,
                   is_hub=resolved.is_hub)

    @property
    def name(self) -> str:
        """``my-adapter`` for ``user/my-adapter`` or a folder ``my-adapter``."""
        return self.repo_or_path.rstrip("/").split("/")[-1] if self.is_hub else self.folder.name

    def provenance(self) -> dict[str, Any]:
        """What a manifest records about the adapter: where it came from and which bytes were used."""
        record = {"repo_or_path": self.repo_or_path, "revision": self.revision,
                  "sha256": sha256_of(self.weights_path), "config_sha256": sha256_of(self.folder / ADAPTER_CONFIG),
                  "peft_type": "LORA", "r": self.config.get("r"), "lora_alpha": self.config.get("lora_alpha"),
                  "use_rslora": self.use_rslora,
                  "base_model_name_or_path": self.config.get("base_model_name_or_path")}
        if self.replacements:
            record["modules_to_save"] = sorted({r.module for r in self.replacements})
        return record

    # reading -----------------------------------------------------------------------------------------
    def _check_config(self) -> None:
        config = self.config
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise InputError(f"{self.folder} is a {config.get('peft_type')!r} adapter; only LoRA adapters "
                             "(peft_type LORA) can be merged or converted")
        used = [what for key, what in UNSUPPORTED_OPTIONS.items() if config.get(key)]
        if used:
            raise InputError(f"the adapter in {self.folder} uses {', '.join(used)}; only plain LoRA (W + scale·B·A) "
                             "can be merged or converted: merge it in PEFT (merge_and_unload) and convert the result")
        init = str(config.get("init_lora_weights", "")).lower()
        if init.startswith(BASE_CHANGING_INITS):
            raise InputError(f"the adapter in {self.folder} was initialised with {init} (init_lora_weights), which "
                             "also changes the base weights; save it as a plain LoRA with PEFT's save_pretrained("
                             "..., path_initial_model_for_weight_conversion=...) and pass that")
        if config.get("bias", "none") not in ("none", None):
            raise InputError(f"the adapter in {self.folder} trains base biases (bias={config['bias']!r}); only "
                             "bias='none' adapters can be merged: merge it in PEFT and convert the result")
        alpha = config.get("lora_alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise InputError(f"{self.folder / ADAPTER_CONFIG}: lora_alpha must be a number > 0, got {alpha!r}")
        if any(not isinstance(v, int | float) or v <= 0 for v in (config.get("alpha_pattern") or {}).values()):
            raise InputError(f"{self.folder / ADAPTER_CONFIG}: every alpha_pattern value must be a number > 0")

    def _read_tensors(self) -> tuple[list[LoraPair], list[Replacement], list[str]]:
        halves: dict[tuple[str, bool], dict[str, str]] = {}
        replacements: list[Replacement] = []
        skipped: list[str] = []
        saved = set(self.config.get("modules_to_save") or [])
        embedding_modules = {m["module"] for m in map(_EMBEDDING.match, self.shapes) if m}

        def embedded(module: str) -> bool:
            return module in embedding_modules
        for key in sorted(self.shapes):
            for piece, what in UNSUPPORTED_TENSORS.items():
                if piece in key:
                    raise InputError(f"the adapter in {self.folder} holds {what} tensors ({key}); only plain LoRA "
                                     "can be merged or converted: merge it in PEFT and convert the result")
            match = _LINEAR.match(key) or _EMBEDDING.match(key)
            if match:
                halves.setdefault((match["module"], match.re is _EMBEDDING), {})[match["half"]] = key
                continue
            module = key[len(PREFIX):].removesuffix(".weight") if key.startswith(PREFIX) else key
            if key.endswith(".weight") and any(module == m or module.endswith("." + m) for m in saved):
                replacements.append(self._replacement(module, key))
                continue
            if key.endswith(".base_layer.weight") and embedded(module.removesuffix(".base_layer")):
                # PEFT saves the (possibly resized) base embedding with an embedding LoRA: it is the base it loads
                replacements.append(self._replacement(module.removesuffix(".base_layer"), key))
                continue
            raise InputError(f"unexpected tensor {key} in {self.weights_path.name}: not a LoRA A/B matrix nor a "
                             "modules_to_save weight; this adapter cannot be merged or converted")
        pairs = []
        for (module, embedding), parts in sorted(halves.items()):
            if set(parts) != {"A", "B"}:
                missing = ({"A", "B"} - set(parts)).pop()
                raise InputError(f"the adapter has lora_{missing} for {module} missing; re-save the adapter")
            pair = self._pair(module, embedding, parts["A"], parts["B"])
            if pair is None:
                skipped.append(module)
            else:
                pairs.append(pair)
        if skipped:
            log.info("ignoring the adapter's %d module(s) in SigLIP's pooling head, which Gemma 3 does not use",
                     len(skipped))
        if not pairs and not replacements:
            raise InputError(f"the adapter in {self.folder} adapts no tensor that Gemma 3 uses; nothing to merge")
        return pairs, replacements, skipped

    def _target(self, module: str) -> tuple[str, Component] | None:
        tensor = module + ".weight"
        mapped = map_tensor_name(tensor)
        if mapped is None:
            if is_vision_head(tensor):
                return None
            raise MismatchError(f"the adapter targets {module}, which is not a Gemma 3 / MedGemma module; it was "
                                "trained on another kind of model")
        return mapped.gguf, mapped.component

    def _pair(self, module: str, embedding: bool, a_key: str, b_key: str) -> LoraPair | None:
        target = self._target(module)
        if target is None:
            return None
        a_shape, b_shape = self.shapes[a_key], self.shapes[b_key]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise InputError(f"the adapter's LoRA on {module} has {len(a_shape)}-D matrices (a convolution); only "
                             "linear and embedding layers can be merged or converted")
        rank = a_shape[0]
        if b_shape[1] != rank:
            raise InputError(f"the adapter's lora_A and lora_B for {module} disagree on the rank ({rank} vs "
                             f"{b_shape[1]}); the adapter file is damaged")
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module, self.lora_alpha))
        scale = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        return LoraPair(module, target[0], target[1], a_key, b_key, rank, scale, embedding)

    def _replacement(self, module: str, key: str) -> Replacement:
        target = self._target(module)
        if target is None or target[0] not in ("token_embd.weight", "output.weight"):
            raise InputError(f"the adapter saves a full copy of {module} (modules_to_save); only embed_tokens and "
                             "lm_head copies can be merged: merge it in PEFT and convert the result")
        return Replacement(module, target[0], key, self.shapes[key])

    # checks against a base ---------------------------------------------------------------------------
    @property
    def vision_pairs(self) -> list[LoraPair]:
        return [p for p in self.pairs if p.is_vision]

    def check_base(self, expected: dict[str, tuple[int, ...]], base: str) -> None:
        """MismatchError unless every adapted tensor exists in the base with the shape the adapter implies.

        ``expected``: GGUF name -> shape in PyTorch order (out, in), ``output.weight`` included even when
        the base ties it to the embedding. Nothing is read but the shapes.
        """
        seen: dict[str, str] = {}
        for pair in self.pairs:
            if pair.gguf_name in seen:
                raise InputError(f"the adapter adapts {pair.gguf_name} twice ({seen[pair.gguf_name]} and "
                                 f"{pair.module}): it mixes two model layouts")
            seen[pair.gguf_name] = pair.module
            if pair.gguf_name not in expected:
                raise MismatchError(f"the adapter adapts {pair.module}, which {base} does not have; it was made for "
                                    f"another base model (pass the base it was trained on)")
            a, b = self.shapes[pair.a_key], self.shapes[pair.b_key]
            implied = (a[1], b[0]) if pair.embedding else (b[0], a[1])
            if implied != expected[pair.gguf_name]:
                raise MismatchError(self._shape_message(pair.module, implied, expected[pair.gguf_name], base,
                                                        pair.embedding))
        for rep in self.replacements:
            want = expected["token_embd.weight"]
            if rep.shape != want:
                raise MismatchError(self._shape_message(rep.module, rep.shape, want, base, True))

    @staticmethod
    def _shape_message(module: str, implied: tuple[int, ...], want: tuple[int, ...], base: str, embedding: bool) -> str:
        if embedding and len(implied) == 2 and implied[1] == want[1] and implied[0] > want[0]:
            return (f"the adapter's {module} has {implied[0]} rows but the base vocabulary has {want[0]}: tokens were "
                    "added in fine-tuning, which a merged GGUF cannot carry (its vocabulary is the base's); "
                    "fine-tune without new tokens")
        return (f"the adapter's {module} is {list(implied)} but {base} has {list(want)}; the adapter was made for "
                "another base model (pass the base it was trained on)")

    # data --------------------------------------------------------------------------------------------
    def load(self, key: str) -> torch.Tensor:
        return self._handle.get_tensor(key).to(torch.float32)

    def lora_matrices(self, pair: LoraPair) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` in float32: A ``(r, in)``, B ``(out, r)`` (embedding: ``(r, vocab)``, ``(n_embd, r)``)."""
        return self.load(pair.a_key), self.load(pair.b_key)

    def merge_into(self, weight: torch.Tensor, pair: LoraPair) -> torch.Tensor:
        """``weight += scale · B @ A`` (embedding: ``(B @ A)ᵀ``) in place on a float32 ``(out, in)`` tensor,
        as one BLAS call: no product-sized temporary."""
        a, b = self.lora_matrices(pair)
        if pair.embedding:
            return weight.addmm_(a.T, b.T, alpha=pair.scale)
        return weight.addmm_(b, a, alpha=pair.scale)


# --- merging -------------------------------------------------------------------------------------------


def output_plan(adapter: PeftAdapter, tie_word_embeddings: bool) -> str | None:
    """Where the merged model's output matrix comes from, when it no longer equals the merged embedding.

    Gemma 3 ties ``lm_head`` to ``embed_tokens``. ``None``: still tied (one ``token_embd``, as the base).
    ``"lm_head"``: the adapter saved its own trained ``lm_head`` (PEFT ``modules_to_save``). ``"base"``:
    only the embedding changed (a saved ``embed_tokens``, or a LoRA on it), without ``ensure_weight_tying``:
    the trained model used the base embedding as its output matrix. (PEFT's ``merge_and_unload`` adds an
    embedding LoRA to the shared matrix and so changes the output too, which it warns about; the merged
    GGUF computes what the adapter computed in training.)
    """
    if not tie_word_embeddings:
        return None
    replaced = {r.gguf_name for r in adapter.replacements}
    tied_again = bool(adapter.config.get("ensure_weight_tying") or adapter.config.get("modules_to_tie"))
    if "output.weight" in replaced and not tied_again:
        return "lm_head"
    embedding_lora = any(p.gguf_name == "token_embd.weight" for p in adapter.pairs)
    if ("token_embd.weight" in replaced or embedding_lora) and not tied_again:
        return "base"
    if any(p.gguf_name == "output.weight" for p in adapter.pairs):
        raise InputError("the adapter puts a LoRA on lm_head, which Gemma 3 ties to embed_tokens; PEFT's merge "
                         "then changes both: target embed_tokens instead, or merge it in PEFT and convert the result")
    return None


class MergedTensors:
    """The base checkpoint's tensors with the adapter merged, one tensor at a time (``write_gguf``'s source).

    ``load(source_name)`` returns ``W + scale · B·A`` in float32 for an adapted tensor (a replaced one:
    the adapter's copy, plus any LoRA on it), the base tensor as stored otherwise. Memory: one float32
    copy of the tensor being written (the product is added in place), plus its A and B.
    """

    def __init__(self, checkpoint: Any, adapter: PeftAdapter, gguf_of_source: dict[str, str]):
        self.checkpoint = checkpoint
        self.adapter = adapter
        self.gguf_of_source = gguf_of_source
        self.source_of_gguf = {g: s for s, g in gguf_of_source.items()}
        self.pairs = {p.gguf_name: p for p in adapter.pairs}
        self.replacements = {r.gguf_name: r for r in adapter.replacements}
        self.merged: set[str] = set()

    def load(self, source_name: str) -> torch.Tensor:
        if source_name == TIED_OUTPUT_SOURCE:
            return self._output()
        gguf_name = self.gguf_of_source.get(source_name)
        replacement = self.replacements.get(gguf_name) if gguf_name else None
        base = self.adapter.load(replacement.key) if replacement is not None else self.checkpoint.load(source_name)
        pair = self.pairs.get(gguf_name) if gguf_name else None
        if pair is None:
            return base
        self.merged.add(pair.gguf_name)
        return self.adapter.merge_into(base.to(torch.float32, copy=True), pair)

    def _output(self) -> torch.Tensor:
        replacement = self.replacements.get("output.weight")
        if replacement is not None:
            return self.adapter.load(replacement.key)
        return self.checkpoint.load(self.source_of_gguf["token_embd.weight"])

    def iter_unmerged(self) -> Iterator[str]:
        """Adapted tensors not merged (a plan that skipped them): a bug if any."""
        return iter(sorted(set(self.pairs) - self.merged))
