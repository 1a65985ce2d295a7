"""The tiny Gemma 3 / MedGemma checkpoints: published layout, determinism, transformers reads them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from medgemma_gguf.errors import UserError
from medgemma_gguf.fixtures import tiny_checkpoint as tc
from medgemma_gguf.fixtures.tiny_checkpoint import VARIANTS, build_tiny_checkpoint

PUBLISHED_MM_FILES = {
    "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
    "processor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "tokenizer_config.json", "added_tokens.json", "chat_template.json",
}
PUBLISHED_TEXT_FILES = PUBLISHED_MM_FILES - {"preprocessor_config.json", "processor_config.json",
                                             "chat_template.json"}
TEXT_LAYER_SUFFIXES = [
    *(f"self_attn.{p}_proj.weight" for p in "qkvo"), "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight", *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
]
VISION_LAYER_SUFFIXES = [
    *(f"self_attn.{p}_proj.{kind}" for p in ("q", "k", "v", "out") for kind in ("weight", "bias")),
    *(f"{m}.{kind}" for m in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
      for kind in ("weight", "bias")),
]
SPECIAL_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "[multimodal]": 5,
               "<start_of_turn>": 6, "<end_of_turn>": 7, "<start_of_image>": 8, "<end_of_image>": 9,
               "<image_soft_token>": 1024}


# mm-vocab262k (134 MB of weights for the runtime benchmark) is built by bench/bench_runtime.py, not here
BUILT = [name for name, spec in VARIANTS.items() if spec.embedding_rows == tc.EMBEDDING_ROWS]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_checkpoint(root / name, name) for name in BUILT}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return tensors


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _expected_published_names(spec: tc.TinySpec) -> set[str]:
    text_prefix = "language_model.model." if spec.multimodal else "model."
    names = {f"{text_prefix}embed_tokens.weight", f"{text_prefix}norm.weight"}
    names |= {f"{text_prefix}layers.{i}.{s}" for i in range(spec.num_layers) for s in TEXT_LAYER_SUFFIXES}
    if spec.vision is not None:
        tower = "vision_tower.vision_model."
        names |= {f"{tower}embeddings.patch_embedding.weight", f"{tower}embeddings.patch_embedding.bias",
                  f"{tower}embeddings.position_embedding.weight", f"{tower}post_layernorm.weight",
                  f"{tower}post_layernorm.bias", "multi_modal_projector.mm_input_projection_weight",
                  "multi_modal_projector.mm_soft_emb_norm.weight"}
        names |= {f"{tower}encoder.layers.{i}.{s}" for i in range(spec.vision.num_layers)
                  for s in VISION_LAYER_SUFFIXES}
    return names


def _image(size: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# --- layout -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["mm-k256", "mm-deep", "text"])
def test_file_set_matches_the_published_repo(built: dict[str, Path], variant: str) -> None:
    expected = PUBLISHED_MM_FILES if VARIANTS[variant].multimodal else PUBLISHED_TEXT_FILES
    assert {p.name for p in built[variant].iterdir()} == expected


@pytest.mark.parametrize("variant", ["mm-k256", "mm-deep", "text"])
def test_tensor_names_shards_and_index_are_the_published_ones(built: dict[str, Path], variant: str) -> None:
    folder, spec = built[variant], VARIANTS[variant]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    per_shard: dict[str, set[str]] = {}
    total = 0
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with safe_open(str(folder / shard), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            per_shard[shard] = set(handle.keys())
            for name in handle.keys():  # noqa: SIM118
                tensor = handle.get_tensor(name)
                assert tensor.dtype == torch.bfloat16, name
                total += tensor.numel() * tensor.element_size()
    assert all(per_shard.values()), "both shards must hold tensors"
    assert index["metadata"]["total_size"] == total
    assert index["weight_map"] == {n: shard for shard, names in per_shard.items() for n in names}
    assert set(index["weight_map"]) == _expected_published_names(spec)


def test_shapes_follow_the_spec(built: dict[str, Path]) -> None:
    spec, tensors = VARIANTS["mm-deep"], _tensors(built["mm-deep"])
    vision = spec.vision
    assert vision is not None
    text = "language_model.model."
    assert tensors[f"{text}embed_tokens.weight"].shape == (tc.EMBEDDING_ROWS, spec.hidden_size)
    assert tensors[f"{text}layers.0.self_attn.q_proj.weight"].shape == (spec.num_heads * spec.head_dim,
                                                                         spec.hidden_size)
    assert tensors[f"{text}layers.0.self_attn.k_proj.weight"].shape == (spec.num_kv_heads * spec.head_dim,
                                                                         spec.hidden_size)
    assert tensors[f"{text}layers.0.self_attn.q_norm.weight"].shape == (spec.head_dim,)
    assert tensors[f"{text}layers.0.mlp.down_proj.weight"].shape == (spec.hidden_size, spec.intermediate_size)
    assert tensors["multi_modal_projector.mm_input_projection_weight"].shape == (vision.hidden_size,
                                                                                spec.hidden_size)
    assert tensors["vision_tower.vision_model.embeddings.position_embedding.weight"].shape == (
        vision.patches_per_side**2, vision.hidden_size)
    assert tensors["vision_tower.vision_model.embeddings.patch_embedding.weight"].shape == (
        vision.hidden_size, 3, vision.patch_size, vision.patch_size)


def test_k256_text_matrices_have_input_widths_divisible_by_256(built: dict[str, Path]) -> None:
    matrices = {n: t for n, t in _tensors(built["mm-k256"]).items()
                if n.startswith("language_model.") and t.ndim == 2}
    assert matrices
    assert {n: t.shape[1] for n, t in matrices.items() if t.shape[1] % 256} == {}


def test_weights_are_perturbed_away_from_the_default_init(built: dict[str, Path]) -> None:
    tensors = {n: t.float() for n, t in _tensors(built["mm-k256"]).items()}
    gemma_norms = [t for n, t in tensors.items()
                   if t.ndim == 1 and "norm" in n and not n.startswith("vision")]
    assert gemma_norms and all(t.std() > 0.1 for t in gemma_norms)
    biases = [t for n, t in tensors.items() if n.endswith(".bias")]
    assert biases and all(t.abs().max() > 0.01 for t in biases)
    siglip_norm = tensors["vision_tower.vision_model.encoder.layers.0.layer_norm1.weight"]
    assert 0.8 < siglip_norm.mean() < 1.2 and siglip_norm.std() > 0.1


# --- configs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["mm-k256", "mm-deep"])
def test_multimodal_config_looks_like_the_published_one(built: dict[str, Path], variant: str) -> None:
    spec = VARIANTS[variant]
    config = json.loads((built[variant] / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert config["model_type"] == "gemma3" and config["torch_dtype"] == "bfloat16"
    assert (config["boi_token_index"], config["eoi_token_index"], config["image_token_index"]) == (8, 9, 1024)
    assert config["eos_token_id"] == [1, 7]
    text, vision = config["text_config"], config["vision_config"]
    group = ["sliding_attention"] * 5 + ["full_attention"]
    tail = ["sliding_attention"] * (spec.num_layers % 6)
    assert text["layer_types"] == group * (spec.num_layers // 6) + tail
    assert text["query_pre_attn_scalar"] == text["head_dim"]
    assert (text["rope_theta"], text["rope_local_base_freq"]) == (1_000_000.0, 10_000.0)
    assert text["rope_scaling"] == {"factor": 8.0, "rope_type": "linear"}
    assert text["final_logit_softcapping"] is None and text["attn_logit_softcapping"] is None
    assert text["vocab_size"] == 1088
    assert vision["model_type"] == "siglip_vision_model" and vision["vision_use_head"] is False
    assert config["mm_tokens_per_image"] == spec.vision.mm_tokens_per_image  # type: ignore[union-attr]
    assert (vision["image_size"] // vision["patch_size"]) // int(config["mm_tokens_per_image"] ** 0.5) == 4


def test_deep_variant_repeats_the_pattern_with_a_partial_tail(built: dict[str, Path]) -> None:
    text = json.loads((built["mm-deep"] / "config.json").read_text())["text_config"]
    assert text["num_hidden_layers"] > 12 and text["num_hidden_layers"] % 6 != 0
    assert [i for i, t in enumerate(text["layer_types"]) if t == "full_attention"] == [5, 11]


def test_text_variant_is_a_causal_lm_without_vision_files(built: dict[str, Path]) -> None:
    config = json.loads((built["text"] / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    assert "vision_config" not in config and "layer_types" not in config
    assert config["sliding_window_pattern"] == 6 and config["num_hidden_layers"] == 7


@pytest.mark.parametrize("variant", ["mm-k256", "text"])
def test_generation_and_processor_configs(built: dict[str, Path], variant: str) -> None:
    folder = built[variant]
    generation = json.loads((folder / "generation_config.json").read_text())
    ids = (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"])
    assert ids == (2, [1, 7], 0)
    assert generation["cache_implementation"] == "hybrid"
    if variant == "mm-k256":
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        assert pre["image_processor_type"] == "Gemma3ImageProcessor"
        assert pre["size"] == {"height": 224, "width": 224}
        assert pre["image_seq_length"] == 16 and pre["resample"] == 2
        assert json.loads((folder / "processor_config.json").read_text()) == {
            "image_seq_length": 16, "processor_class": "Gemma3Processor"}


def test_transformers_reads_rope_and_layer_types_from_the_published_configs(built: dict[str, Path]) -> None:
    from transformers import AutoConfig

    for variant in ("mm-k256", "text"):
        config = AutoConfig.from_pretrained(built[variant])
        text = getattr(config, "text_config", config)
        assert text.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0,
                                                          "rope_theta": 1_000_000.0}
        assert text.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
        assert text.layer_types == VARIANTS[variant].layer_types


# --- tokenizer --------------------------------------------------------------------------------------------
def test_sentencepiece_ids_of_the_specials(built: dict[str, Path]) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(built["mm-k256"] / "tokenizer.model"))
    assert sp.get_piece_size() == tc.SP_VOCAB_SIZE
    for piece, token_id in SPECIAL_IDS.items():
        if token_id < tc.SP_VOCAB_SIZE:
            assert sp.piece_to_id(piece) == token_id
    assert [sp.id_to_piece(i) for i in (10, 265)] == ["<0x00>", "<0xFF>"]
    assert all(sp.is_byte(i) for i in range(10, 266))
    assert json.loads((built["mm-k256"] / "added_tokens.json").read_text()) == {"<image_soft_token>": 1024}


@pytest.mark.parametrize("variant", ["mm-k256", "mm-hf5", "text"])
def test_markers_are_single_tokens_in_the_hf_tokenizer(built: dict[str, Path], variant: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[variant])
    for content, token_id in SPECIAL_IDS.items():
        assert tokenizer(content, add_special_tokens=False).input_ids == [token_id], content
    assert tokenizer("hi").input_ids[0] == 2  # add_bos_token
    assert tokenizer("hi").input_ids[-1] != 1  # no eos added


def test_fast_tokenizer_matches_sentencepiece(built: dict[str, Path]) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = built["mm-k256"]
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    fast = AutoTokenizer.from_pretrained(folder)
    texts = [line for line in tc.CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line]
    unseen = "unseen: Ωμέγα ẞ ℵ 🦴 ﷺ"
    texts += [unseen, "  leading and trailing  ", "tab\tand\nnewline\n\n", "1234567890",
              "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "x" * 50, ""]
    for text in texts:
        assert fast(text, add_special_tokens=False).input_ids == sp.encode(text), repr(text)
    assert fast.decode(sp.encode(unseen)) == sp.decode(sp.encode(unseen)) == unseen


def test_tokenizer_config_and_chat_template(built: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    folder = built["mm-k256"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["processor_class"] == "Gemma3Processor"
    assert config["extra_special_tokens"] == {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                              "image_token": "<image_soft_token>"}
    decoder = {int(i): row["content"] for i, row in config["added_tokens_decoder"].items()}
    assert decoder == {token_id: content for content, token_id in SPECIAL_IDS.items()}
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    assert template == config["chat_template"] == tc.GEMMA3_CHAT_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hello "},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye"}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == ("<bos><start_of_turn>user\nBe brief.\n\nHello<end_of_turn>\n<start_of_turn>model\nHi."
                        "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


# --- transformers loads and runs them ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["mm-k256", "mm-deep", "mm-hf5"])
def test_transformers_loads_multimodal_with_no_missing_keys_and_runs(built: dict[str, Path],
                                                                     variant: str) -> None:
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    folder, spec = built[variant], VARIANTS[variant]
    vision = spec.vision
    assert vision is not None
    model, info = Gemma3ForConditionalGeneration.from_pretrained(folder, output_loading_info=True,
                                                                 dtype=torch.float32)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    processor = AutoProcessor.from_pretrained(folder)
    chat = [{"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this X-ray"}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    logits = []
    for seed in (0, 1):
        inputs = processor(text=prompt, images=_image(vision.image_size, seed), return_tensors="pt",
                           add_special_tokens=False)
        expansion = ("\n\n<start_of_image>" + "<image_soft_token>" * vision.mm_tokens_per_image
                     + "<end_of_image>\n\n")
        decoded = processor.tokenizer.decode(inputs["input_ids"][0])
        assert decoded.startswith("<bos><start_of_turn>user\nYou are an expert radiologist.\n\n")
        assert decoded.count(expansion) == 1
        assert int((inputs["input_ids"] == tc.IMAGE_SOFT_TOKEN_ID).sum()) == vision.mm_tokens_per_image
        assert tuple(inputs["pixel_values"].shape) == (1, 3, vision.image_size, vision.image_size)
        with torch.no_grad():
            logits.append(model(**inputs).logits[0])
    for out in logits:
        assert out.shape[-1] == tc.EMBEDDING_ROWS and torch.isfinite(out).all()
        assert out.std(dim=-1).min() > 0.1  # not flat over the vocabulary
        assert (out[1:] - out[:-1]).abs().max() > 0.1  # positions differ
    assert (logits[0][-1] - logits[1][-1]).abs().max() > 1e-3  # the image reaches the text


def test_transformers_loads_the_text_variant_and_runs_past_the_sliding_window(built: dict[str, Path]) -> None:
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    folder = built["text"]
    model, info = Gemma3ForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    ids = AutoTokenizer.from_pretrained(folder)("The patient has a cough and a fever. " * 30,
                                               return_tensors="pt").input_ids
    assert ids.shape[1] > 10 * VARIANTS["text"].sliding_window
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert torch.isfinite(logits).all() and logits.std(dim=-1).min() > 0.1
    assert len(set(logits.argmax(-1).tolist())) > 1


def test_hf5_holds_the_k256_weights_in_the_transformers_5_layout(built: dict[str, Path]) -> None:
    hf5, k256 = _tensors(built["mm-hf5"]), _tensors(built["mm-k256"])
    assert {p.name for p in built["mm-hf5"].glob("*.safetensors")} == {"model.safetensors"}
    assert any(n.startswith("vision_tower.embeddings.") for n in hf5)
    assert not any(".vision_model." in n for n in hf5)
    assert any(n.startswith("language_model.model.layers.") for n in hf5)
    renamed = {n.replace("vision_tower.", "vision_tower.vision_model.", 1): t for n, t in hf5.items()}
    assert renamed.keys() == k256.keys()
    assert all(torch.equal(renamed[n], k256[n]) for n in k256)
    assert json.loads((built["mm-hf5"] / "config.json").read_text())["dtype"] == "bfloat16"
    config = json.loads((built["mm-hf5"] / "tokenizer_config.json").read_text())
    assert "added_tokens_decoder" not in config
    assert config["image_token"] == "<image_soft_token>" and config["boi_token"] == "<start_of_image>"


# --- determinism and inputs -------------------------------------------------------------------------------
def test_the_full_vocabulary_variant_has_medgemmas_padded_rows() -> None:
    spec = VARIANTS["mm-vocab262k"]
    config = tc.published_config(spec)
    assert config["text_config"]["vocab_size"] == tc.REAL_VOCAB_ROWS == 262208
    assert spec.reasoning_markers and spec.hidden_size == VARIANTS["mm-k256"].hidden_size


@pytest.mark.parametrize("variant", BUILT)
def test_builds_are_byte_identical(built: dict[str, Path], tmp_path: Path, variant: str) -> None:
    tc._sentencepiece_model.cache_clear()  # retrain the tokenizer too
    again = build_tiny_checkpoint(tmp_path / "again", variant)
    assert _digests(again) == _digests(built[variant])


def test_another_seed_changes_weights_but_not_layout(built: dict[str, Path], tmp_path: Path) -> None:
    other = build_tiny_checkpoint(tmp_path / "seed1", "mm-deep", seed=1)
    first, second = _tensors(built["mm-deep"]), _tensors(other)
    assert first.keys() == second.keys()
    assert all(first[n].shape == second[n].shape and not torch.equal(first[n], second[n]) for n in first)
    assert (other / "tokenizer.model").read_bytes() == (built["mm-deep"] / "tokenizer.model").read_bytes()


def test_an_existing_empty_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert build_tiny_checkpoint(tmp_path / "empty", "mm-deep") == tmp_path / "empty"
    assert {p.name for p in (tmp_path / "empty").iterdir()} == PUBLISHED_MM_FILES


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown tiny checkpoint variant 'mm-huge'; choose one of mm-k256"):
        build_tiny_checkpoint(tmp_path / "x", "mm-huge")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_bad_seed_is_refused(tmp_path: Path, seed: object) -> None:
    with pytest.raises(UserError, match="seed must be a non-negative integer"):
        build_tiny_checkpoint(tmp_path / "x", "mm-deep", seed=seed)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_folder_or_a_file_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for target in ("full", "file"):
        with pytest.raises(UserError, match="already exists and is not an empty folder"):
            build_tiny_checkpoint(tmp_path / target, "mm-deep")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(folder: Path, multimodal: bool, reasoning_markers: bool = False) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tc, "_write_tokenizer_files", fail)
    with pytest.raises(OSError, match="disk full"):
        build_tiny_checkpoint(tmp_path / "broken", "mm-deep")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_parent_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(UserError, match="choose a writable folder"):
        build_tiny_checkpoint(tmp_path / "blocker" / "sub" / "ckpt", "mm-deep")


def test_building_leaves_the_callers_torch_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    build_tiny_checkpoint(tmp_path / "ckpt", "mm-deep")
    assert torch.equal(torch.rand(4), expected)
