"""LoRA fine-tunes: PEFT adapters made by ``peft`` itself on the tiny fixtures (random A and B, text and
vision-tower targets, rsLoRA on and off, rank/alpha patterns, modules_to_save).

* ``convert --adapter``: the merged GGUF's logits and image embeddings equal PEFT's ``merge_and_unload()``
  model in transformers (the converter's equivalence tolerances); either PEFT key layout gives the same file.
* ``convert-adapter``: llama.cpp applying the GGUF adapter to the base GGUF gives the merged GGUF's logits
  (F32 adapter: the equivalence tolerances; F16 / Q8_0: their rounding); scale 0 gives the base exactly.
* Mismatched adapters and unsupported PEFT types are refused with one line, and nothing is written.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from medgemma_gguf.convert.converter import convert_checkpoint
from medgemma_gguf.convert.lora_gguf import alpha_and_factors, convert_adapter
from medgemma_gguf.convert.peft_adapter import PeftAdapter
from medgemma_gguf.errors import InputError, MismatchError, NotFoundError, UserError
from medgemma_gguf.hashing import sha256_of
from medgemma_gguf.quant_eval.metrics import kl_divergence_full
from medgemma_gguf.runtime.engine import Engine, ImagePart
from medgemma_gguf.runtime.lora import LoraFile, ModelIds, parse_lora_specs

VARIANT = "mm-k256"
# every linear module PEFT's "all-linear" would pick in the language model and the SigLIP encoder
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "out_proj", "fc1", "fc2"]
TEXT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# rsLoRA with per-module ranks and alphas: llama.cpp's one alpha cannot express it, so B carries the rest
# a LoRA on the (tied) embedding: PEFT also saves the base embedding with it
EMBEDDING_LORA = {"targets": r".*language_model.*\.(embed_tokens|q_proj)"}
PATTERNED = {"targets": TEXT_TARGETS, "rslora": True, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 8}}


def _ids(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(300, 1000, size=n - 1).tolist()


def _peft_merged(folder, adapter, merge: bool = True):
    """transformers + peft: the base checkpoint with the adapter merged by ``merge_and_unload`` (or applied
    unmerged, as in training, with ``merge=False``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    multimodal = json.loads((folder / "config.json").read_text())["architectures"][0] != "Gemma3ForCausalLM"
    cls = Gemma3ForConditionalGeneration if multimodal else AutoModelForCausalLM
    base = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, adapter)
    return (model.merge_and_unload() if merge else model).eval()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _gguf_logits(path, ids, settings=None):
    with Engine(path, n_ctx=512, n_threads=1, settings=settings) as engine:
        return engine.eval_tokens(ids, logits="all")


def _assert_equivalent(ours, reference):
    """The converter's equivalence bounds (tests/test_convert_equivalence.py)."""
    assert np.abs(ours - reference).max() <= 1e-2
    assert kl_divergence_full(reference, ours).mean() <= 1e-5


def _nothing_written(outdir) -> bool:
    return not outdir.exists() or not any(outdir.iterdir())


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_checkpoint, peft_adapter):
    """``merged(**adapter_options) -> ConvertResult``: the F32 conversion of VARIANT with that adapter merged."""
    done = {}

    def get(**options):
        key = repr(sorted(options.items()))
        if key not in done:
            outdir = tmp_path_factory.mktemp("merged")
            done[key] = convert_checkpoint(str(tiny_checkpoint(VARIANT)), outdir, outtype="f32", mmproj_type="f32",
                                           adapter=str(peft_adapter(VARIANT, **options)), progress=False)
        return done[key]

    return get


# --- merging ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_gguf_equals_peft_merge_and_unload(rslora, tiny_checkpoint, peft_adapter, merged, converted):
    from PIL import Image
    from transformers import AutoProcessor

    folder = tiny_checkpoint(VARIANT)
    adapter = peft_adapter(VARIANT, targets=ALL_TARGETS, rslora=rslora, seed=int(rslora))
    result = merged(targets=ALL_TARGETS, rslora=rslora, seed=int(rslora))
    reference_model = _peft_merged(folder, adapter)
    ids = _ids(320)
    reference = _hf_logits(reference_model, ids)
    ours = _gguf_logits(result.text_path, ids)
    _assert_equivalent(ours, reference)
    base = _gguf_logits(converted(VARIANT).text_path, ids)
    assert np.abs(base - reference).max() > 1.0  # the adapter matters: the test could fail

    size = json.loads((folder / "config.json").read_text())["vision_config"]["image_size"]
    pixels = np.random.default_rng(3).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    pixel_values = AutoProcessor.from_pretrained(folder).image_processor(Image.fromarray(pixels),
                                                                         return_tensors="pt").pixel_values
    with torch.no_grad():
        features = reference_model.get_image_features(pixel_values=pixel_values.float())
    features = getattr(features, "pooler_output", features)
    expected = (features[0] if isinstance(features, (list, tuple)) else features).reshape(-1, features.shape[-1])
    expected = expected.numpy()

    def embeddings(files):
        with Engine(files.text_path, files.mmproj_path, n_threads=1) as engine:
            return engine.encode_image(ImagePart(pixels))

    def cosine(x, y):
        return ((x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))).min()

    assert cosine(embeddings(result), expected) >= 0.999
    assert cosine(embeddings(converted(VARIANT)), expected) < 0.99  # the vision-tower LoRA was merged

    source = json.loads(result.manifest_path.read_text())["source"]
    assert source["repo_or_path"] == str(folder)
    assert source["adapter"]["repo_or_path"] == str(adapter) and source["adapter"]["use_rslora"] is rslora
    assert source["adapter"]["sha256"] == sha256_of(adapter / "adapter_model.safetensors")


def test_text_only_model_merges_like_peft(tmp_path, tiny_checkpoint, peft_adapter):
    """MedGemma 27B text is a Gemma3ForCausalLM: its adapters say ``model.layers.N…``."""
    folder = tiny_checkpoint("text")
    adapter = peft_adapter("text", targets=["q_proj", "v_proj", "o_proj", "down_proj"], rslora=True)
    result = convert_checkpoint(str(folder), tmp_path, outtype="f32", adapter=str(adapter), progress=False)
    assert result.mmproj_path is None
    ids = _ids(300, seed=8)
    _assert_equivalent(_gguf_logits(result.text_path, ids), _hf_logits(_peft_merged(folder, adapter), ids))


def test_rank_and_alpha_patterns_merge_like_peft(tiny_checkpoint, peft_adapter, merged):
    """rank_pattern / alpha_pattern with rsLoRA: each module's own scale."""
    folder = tiny_checkpoint(VARIANT)
    ids = _ids(320, seed=4)
    _assert_equivalent(_gguf_logits(merged(**PATTERNED).text_path, ids),
                       _hf_logits(_peft_merged(folder, peft_adapter(VARIANT, **PATTERNED)), ids))


def test_both_peft_key_layouts_merge_to_the_same_files(tmp_path, tiny_checkpoint, peft_adapter, merged):
    """The same adapter saved with older transformers' module names (``language_model.model.layers``,
    ``vision_tower.vision_model.encoder``) gives byte-identical text and mmproj GGUFs."""
    from safetensors.torch import load_file, save_file

    options = {"targets": ALL_TARGETS, "rslora": True, "seed": 1}
    adapter = peft_adapter(VARIANT, **options)
    result = merged(**options)
    old = tmp_path / "old-layout"
    old.mkdir()
    shutil.copy(adapter / "adapter_config.json", old)
    tensors = load_file(adapter / "adapter_model.safetensors")
    renamed = {k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")
               .replace("base_model.model.model.vision_tower.", "base_model.model.vision_tower.vision_model."): v
               for k, v in tensors.items()}
    assert {k.split(".")[2] for k in renamed} == {"language_model", "vision_tower"}
    save_file(renamed, old / "adapter_model.safetensors")
    again = convert_checkpoint(str(tiny_checkpoint(VARIANT)), tmp_path / "out", outtype="f32", mmproj_type="f32",
                               adapter=str(old), name=result.name, progress=False)
    assert sha256_of(again.text_path) == sha256_of(result.text_path)
    assert sha256_of(again.mmproj_path) == sha256_of(result.mmproj_path)


@pytest.mark.parametrize(("options", "peft_merge_is_right"), [
    # Google's notebook recipe: full trained copies of lm_head and embed_tokens, untied in PEFT's merged model
    ({"targets": TEXT_TARGETS, "modules_to_save": ["lm_head", "embed_tokens"], "std": 0.02}, True),
    # only embed_tokens saved: the output matrix stays the base embedding
    ({"targets": TEXT_TARGETS, "modules_to_save": ["embed_tokens"], "std": 0.02}, True),
    # a LoRA on the tied embedding: PEFT's merge_and_unload adds it to the shared matrix, so the output changes
    # too (PEFT warns about it); the trained model applied it to the input embedding only, and so does the GGUF
    (EMBEDDING_LORA, False),
])
def test_embedding_adapters_merge_as_trained(options, peft_merge_is_right, tiny_checkpoint, peft_adapter, merged):
    from medgemma_gguf.gguf_info import read_gguf_info

    folder = tiny_checkpoint(VARIANT)
    adapter = peft_adapter(VARIANT, **options)
    result = merged(**options)
    ids = _ids(200, seed=5)
    ours = _gguf_logits(result.text_path, ids)
    _assert_equivalent(ours, _hf_logits(_peft_merged(folder, adapter, merge=False), ids))
    peft_merged = _hf_logits(_peft_merged(folder, adapter), ids)
    assert bool(np.abs(ours - peft_merged).max() <= 1e-2) is peft_merge_is_right
    assert read_gguf_info(result.text_path).tensor("output.weight") is not None  # untied from token_embd


def test_quantizing_a_merged_model_works_like_any_other(merged):
    from medgemma_gguf.convert.quantize.folder import quantize_folder

    result = merged(targets=ALL_TARGETS, rslora=True, seed=1)
    outdir = result.text_path.parent
    quantize_folder(outdir, ["Q8_0"], progress=False, n_threads=1)
    manifest = json.loads((outdir / "manifest.json").read_text())
    q8 = [row for row in manifest["files"] if row["type"] == "Q8_0"]
    assert q8 and (outdir / q8[0]["path"]).is_file()
    assert manifest["source"]["adapter"]["use_rslora"] is True
    card = (outdir / "README.md").read_text()
    assert "LoRA adapter" in card and manifest["source"]["adapter"]["sha256"] in card
    ids = _ids(64, seed=6)
    assert kl_divergence_full(_gguf_logits(result.text_path, ids),
                              _gguf_logits(outdir / q8[0]["path"], ids)).mean() < 1e-2


# --- GGUF LoRA adapters at run time ------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "outtype", "max_abs", "max_kl"), [
    ({"targets": TEXT_TARGETS, "rslora": True}, "f32", 1e-2, 1e-5),
    (PATTERNED, "f32", 1e-2, 1e-5),
    ({"targets": TEXT_TARGETS, "rslora": False}, "f16", 5e-2, 1e-4),
    ({"targets": TEXT_TARGETS, "rslora": True}, "q8_0", 2e-1, 1e-3),
])
def test_gguf_adapter_on_the_base_gives_the_merged_model(options, outtype, max_abs, max_kl, tmp_path, peft_adapter,
                                                         merged, converted):
    from medgemma_gguf.runtime.chat import load

    base = converted(VARIANT)
    written = convert_adapter(str(peft_adapter(VARIANT, **options)), str(base.text_path), tmp_path, outtype=outtype,
                              progress=False)
    ids = _ids(300, seed=7)
    with load(base.text_path, n_gpu_layers=0, n_ctx=512, n_threads=1, lora=[(written.path, 1.0)]) as model:
        ours = model.engine.eval_tokens(ids, logits="all")
        settings = model.engine.settings
    # the merged model in the same context (a chat context returns one logits row per decode): only the adapter
    # differs, not the batch shape
    reference = _gguf_logits(merged(**options).text_path, ids, settings=settings)
    assert np.abs(ours - reference).max() <= max_abs
    assert kl_divergence_full(reference, ours).mean() <= max_kl

    row = json.loads(written.manifest_path.read_text())["files"][0]
    assert row["role"] == "adapter" and row["type"] == outtype.upper() and row["lora_alpha"] == written.alpha
    if options.get("rslora") and "rank_pattern" not in options:
        assert written.alpha == pytest.approx(16 * 8**0.5, rel=1e-6)  # rsLoRA's √r folded into alpha


def test_scale_zero_is_the_base_and_switching_resets_the_cache(tmp_path, peft_adapter, converted):
    from medgemma_gguf.runtime.chat import load

    base = converted(VARIANT)
    adapter = convert_adapter(str(peft_adapter(VARIANT, targets=TEXT_TARGETS, rslora=True)), str(base.text_path),
                              tmp_path, progress=False).path
    messages = [{"role": "user", "content": "What is the normal adult resting heart rate?"}]
    with load(base.text_path, n_gpu_layers=0, n_ctx=512, n_threads=1) as plain:
        base_logits = plain.next_token_logits(plain.prompt(messages))
    with load(base.text_path, n_gpu_layers=0, n_ctx=512, n_threads=1, lora=[(adapter, 0.0)]) as zero:
        assert np.array_equal(zero.next_token_logits(zero.prompt(messages)), base_logits)
    with load(base.text_path, n_gpu_layers=0, n_ctx=512, n_threads=1, lora=[adapter]) as model:
        prompt = model.prompt(messages)
        adapted = model.next_token_logits(prompt)
        assert np.abs(adapted - base_logits).max() > 0.5
        model.use_adapters(())  # the cached prompt was computed with the adapter: it must not be re-used
        assert np.array_equal(model.next_token_logits(prompt), base_logits)
        model.use_adapters([model.adapters[0].name])
        assert np.array_equal(model.next_token_logits(prompt), adapted)


# --- refusals ----------------------------------------------------------------------------------------------


def test_adapter_of_another_base_is_refused_everywhere(tmp_path, tiny_checkpoint, peft_adapter, converted):
    from medgemma_gguf.runtime.chat import load

    other = peft_adapter("mm-deep", targets=TEXT_TARGETS)  # a 64-wide model
    base = converted(VARIANT)
    with pytest.raises(MismatchError, match="made for another base model"):
        convert_checkpoint(str(tiny_checkpoint(VARIANT)), tmp_path / "merged", adapter=str(other), progress=False)
    assert _nothing_written(tmp_path / "merged")
    with pytest.raises(MismatchError, match="made for another base model"):
        convert_adapter(str(other), str(base.text_path), tmp_path / "lora", progress=False)
    assert _nothing_written(tmp_path / "lora")

    gguf_for_other = convert_adapter(str(other), str(converted("mm-deep").text_path), tmp_path / "deep",
                                     progress=False).path
    with pytest.raises(MismatchError, match="made for another base model"):
        load(base.text_path, n_gpu_layers=0, n_ctx=256, n_threads=1, lora=[gguf_for_other])
    with Engine(base.text_path, n_ctx=64, n_threads=1) as engine:  # llama.cpp's NULL, behind the header check
        with pytest.raises(MismatchError, match="could not apply the LoRA adapter"):
            engine.load_lora(gguf_for_other)
        assert np.isfinite(engine.eval_tokens([2, 300, 301])).all()  # and the model still runs
    with pytest.raises(MismatchError, match="not a LoRA adapter"):
        load(base.text_path, n_gpu_layers=0, n_ctx=256, n_threads=1, lora=[base.mmproj_path])


def test_vision_tower_adapters_are_merged_not_applied_at_run_time(tmp_path, peft_adapter, converted):
    import gguf

    from medgemma_gguf.runtime.chat import load

    base = converted(VARIANT)
    with pytest.raises(InputError, match=r"vision tower .* convert BASE --adapter"):
        convert_adapter(str(peft_adapter(VARIANT, targets=ALL_TARGETS)), str(base.text_path), tmp_path / "a",
                        progress=False)
    assert _nothing_written(tmp_path / "a")
    # a GGUF adapter with mmproj tensors (another tool's) is refused before llama.cpp sees it
    good = convert_adapter(str(peft_adapter(VARIANT, targets=TEXT_TARGETS)), str(base.text_path), tmp_path / "b",
                           outtype="f32", progress=False).path
    reader = gguf.GGUFReader(good)
    writer = gguf.GGUFWriter(tmp_path / "vision.gguf", "gemma3")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.add_tensor("v.blk.0.attn_q.weight.lora_a", np.zeros((8, 128), np.float32))
    writer.add_tensor("v.blk.0.attn_q.weight.lora_b", np.zeros((128, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match="vision tower.*merge the adapter instead"):
        load(base.text_path, base.mmproj_path, n_gpu_layers=0, n_ctx=512, n_threads=1, lora=[tmp_path / "vision.gguf"])


def _unsupported_adapters(tmp_path, folder):
    """(what the error names, adapter folder) for PEFT adapters that are not plain LoRA."""
    from peft import LoHaConfig, LoraConfig, get_peft_model
    from transformers import Gemma3ForConditionalGeneration

    def save(config, name, resize=None):
        model = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        if resize:
            model.resize_token_embeddings(resize)
        get_peft_model(model, config).save_pretrained(tmp_path / name)
        return tmp_path / name

    vocab = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
    return [
        ("DoRA", save(LoraConfig(r=4, target_modules=TEXT_TARGETS, use_dora=True), "dora")),
        ("LOHA", save(LoHaConfig(r=4, target_modules=TEXT_TARGETS), "loha")),
        ("trainable tokens", save(LoraConfig(r=4, target_modules=TEXT_TARGETS, trainable_token_indices=[5, 6]),
                                  "tokens")),
        ("trains base biases", save(LoraConfig(r=4, target_modules=["out_proj"], bias="all"), "bias")),
        ("tokens were added", save(LoraConfig(r=4, target_modules=TEXT_TARGETS, modules_to_save=["embed_tokens"]),
                                   "extra", resize=vocab + 64)),
    ]


def test_unsupported_peft_adapters_are_refused_and_nothing_is_written(tmp_path, tiny_checkpoint, converted):
    folder = tiny_checkpoint(VARIANT)
    for what, adapter in _unsupported_adapters(tmp_path, folder):
        outdir = tmp_path / f"out-{adapter.name}"
        with pytest.raises(UserError, match=what):
            convert_checkpoint(str(folder), outdir, adapter=str(adapter), progress=False)
        assert _nothing_written(outdir), what
        with pytest.raises(UserError, match=what):
            convert_adapter(str(adapter), str(converted(VARIANT).text_path), outdir, progress=False)
        assert _nothing_written(outdir), what


def test_runtime_path_refuses_what_llama_cpp_cannot_apply(tmp_path, peft_adapter, converted):
    base = str(converted(VARIANT).text_path)
    saved = peft_adapter(VARIANT, targets=TEXT_TARGETS, modules_to_save=["lm_head", "embed_tokens"], std=0.02)
    with pytest.raises(InputError, match="modules_to_save.*convert BASE --adapter"):
        convert_adapter(str(saved), base, tmp_path / "a", progress=False)
    embedding = peft_adapter(VARIANT, **EMBEDDING_LORA)
    with pytest.raises(InputError, match="LoRA on .*embed_tokens.*convert BASE --adapter"):
        convert_adapter(str(embedding), base, tmp_path / "b", progress=False)
    assert _nothing_written(tmp_path / "a") and _nothing_written(tmp_path / "b")


def test_adapter_folder_problems(tmp_path, peft_adapter):
    with pytest.raises(NotFoundError, match="adapter_config.json"):
        PeftAdapter.open(str(tmp_path))
    adapter = peft_adapter(VARIANT, targets=TEXT_TARGETS)
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(adapter / "adapter_config.json", binary)
    (binary / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="safetensors"):
        PeftAdapter.open(str(binary))
    pissa = tmp_path / "pissa"
    shutil.copytree(adapter, pissa)
    config = json.loads((pissa / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(InputError, match="pissa_niter_4 .* changes the base weights"):
        PeftAdapter.open(str(pissa))
    with pytest.raises(UserError, match="adapter_revision applies with adapter only"):
        convert_checkpoint(str(tmp_path), tmp_path / "o", adapter_revision="main")


def test_hub_adapter_and_base_come_from_the_cache_with_their_revisions(tmp_path, monkeypatch, tiny_checkpoint,
                                                                       peft_adapter):
    import huggingface_hub.constants

    sha = "c" * 40
    repo = tmp_path / "models--someone--medgemma-lora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    shutil.copytree(peft_adapter(VARIANT, targets=TEXT_TARGETS), snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    opened = PeftAdapter.open("someone/medgemma-lora")
    record = opened.provenance()
    assert opened.name == "medgemma-lora" and record["repo_or_path"] == "someone/medgemma-lora"
    assert record["revision"] == sha and record["sha256"] == sha256_of(snapshot / "adapter_model.safetensors")

    # convert-adapter's --base as a Hub repo id: only its config.json is needed
    base_sha = "d" * 40
    base_repo = tmp_path / "models--google--medgemma-4b-it"
    (base_repo / "refs").mkdir(parents=True)
    (base_repo / "refs" / "main").write_text(base_sha)
    (base_repo / "snapshots" / base_sha).mkdir(parents=True)
    shutil.copy(tiny_checkpoint(VARIANT) / "config.json", base_repo / "snapshots" / base_sha)
    written = convert_adapter("someone/medgemma-lora", "google/medgemma-4b-it", tmp_path / "out", progress=False)
    row = json.loads(written.manifest_path.read_text())["files"][0]
    assert row["base"] == {"repo_or_path": "google/medgemma-4b-it", "revision": base_sha}
    assert row["adapter"]["revision"] == sha


# --- units -------------------------------------------------------------------------------------------------


def test_one_alpha_and_b_factors_reproduce_every_scale():
    from medgemma_gguf.convert.peft_adapter import LoraPair
    from medgemma_gguf.convert.tensor_names import Component

    def pair(name, rank, scale):
        return LoraPair(name, name, Component.TEXT, "a", "b", rank, scale)

    pairs = [pair("q", 8, 16 / 8**0.5), pair("k", 8, 16 / 8**0.5), pair("v", 4, 16 / 2.0), pair("o", 8, 1.0)]
    alpha, factors = alpha_and_factors(pairs)
    assert alpha == pytest.approx(16 * 8**0.5, rel=1e-6) and set(factors) == {"v", "o"}
    for p in pairs:
        assert factors.get(p.gguf_name, 1.0) * alpha / p.rank == pytest.approx(p.scale)


def test_model_ids_choose_the_adapter_set():
    def lora(name, scale=1.0):
        return LoraFile(name, None, scale, 16.0, 1)  # type: ignore[arg-type]

    ids = ModelIds("medgemma", [lora("radiology"), lora("derm", 0.5)])
    assert ids.listed() == ["medgemma", "medgemma+base", "medgemma+radiology", "medgemma+derm"]
    assert ids.resolve("medgemma") == ("radiology", "derm") == ids.resolve("gpt-4o") == ids.resolve(None)
    assert ids.resolve("medgemma+base") == ()
    assert ids.resolve("medgemma+derm") == ("derm",)
    assert ids.reply_id("medgemma+derm") == "medgemma+derm" and ids.reply_id("gpt-4o") == "medgemma"
    with pytest.raises(NotFoundError, match="radiolgy is not a loaded adapter.*medgemma\\+radiology"):
        ids.resolve("medgemma+radiolgy")
    assert ModelIds("m", []).listed() == ["m"] and ModelIds("m", []).resolve("m+base") == ()
    assert parse_lora_specs(["a.gguf", ("b.gguf", 0.5)])[1][1] == 0.5
    with pytest.raises(InputError, match="finite number"):
        parse_lora_specs([("a.gguf", float("nan"))])


# --- command line and server -------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "What is the normal adult resting heart rate?"}]
CHAT_ADAPTER = {"targets": TEXT_TARGETS, "rslora": True}
# seeded sampling: the random fixture's greedy reply is all newlines, with or without an adapter
SAMPLING = {"max_tokens": 8, "temperature": 1.0, "seed": 7}


def _reply(text_path, lora=None) -> str:
    from medgemma_gguf.runtime.chat import load

    with load(text_path, n_gpu_layers=0, n_ctx=256, n_threads=1, lora=lora) as model:
        return model.chat(MESSAGES, **SAMPLING).text


@pytest.mark.e2e
def test_cli_merges_converts_and_chats_with_adapters(tmp_path, tiny_checkpoint, peft_adapter, converted, capsys):
    from medgemma_gguf.cli import main

    adapter = peft_adapter(VARIANT, **CHAT_ADAPTER)
    base = converted(VARIANT)
    assert main(["convert", str(tiny_checkpoint(VARIANT)), "--adapter", str(adapter), "-o", str(tmp_path / "merged"),
                 "--outtype", "f32", "--mmproj-type", "f32", "-q"]) == 0
    # --base takes the base's output folder (its manifest names the text GGUF)
    assert main(["convert-adapter", str(adapter), "--base", str(base.text_path.parent), "-o", str(tmp_path / "lora"),
                 "--outtype", "f32", "--name", "cardio", "-q"]) == 0
    lora = tmp_path / "lora" / "cardio-LoRA-F32.gguf"
    assert lora.is_file()
    capsys.readouterr()

    def chat(*args: str) -> tuple[str, str]:
        assert main(["chat", *args, "--prompt", MESSAGES[0]["content"], "--json", "--max-tokens", "8", "--temperature",
                     "1", "--seed", "7", "--ctx", "256", "--threads", "1", "--n-gpu-layers", "0"]) == 0
        captured = capsys.readouterr()
        return json.loads(captured.out)["text"], captured.err

    text, err = chat(str(base.text_path), "--lora", str(lora))
    assert text == _reply(base.text_path, [lora]) != _reply(base.text_path) and "LoRA cardio (scale 1)" in err
    assert chat(str(base.text_path), "--lora-scaled", str(lora), "0")[0] == _reply(base.text_path)

    vision = peft_adapter(VARIANT, targets=ALL_TARGETS)
    assert main(["convert-adapter", str(vision), "--base", str(base.text_path), "-o", str(tmp_path / "v")]) == 2
    assert "vision tower" in capsys.readouterr().err and _nothing_written(tmp_path / "v")
    assert main(["chat", str(base.text_path), "--lora", str(base.mmproj_path), "--prompt", "hi"]) == 2
    assert "--lora takes files written by" in capsys.readouterr().err


@pytest.mark.e2e
def test_server_lists_adapters_and_a_request_picks_one_by_model_id(tmp_path, peft_adapter, converted):
    import openai
    from openai import OpenAI
    from test_server import run_uvicorn

    from medgemma_gguf.runtime.chat import load
    from medgemma_gguf.runtime.server import create_app

    base = converted(VARIANT)
    lora = convert_adapter(str(peft_adapter(VARIANT, **CHAT_ADAPTER)), str(base.text_path), tmp_path, name="cardio",
                           progress=False).path
    expected = {"base": _reply(base.text_path), "cardio": _reply(base.text_path, [lora])}
    assert expected["base"] != expected["cardio"]

    model = load(base.text_path, n_gpu_layers=0, n_ctx=256, n_threads=1, lora=[lora])
    base_url, stop = run_uvicorn(create_app(model))
    try:
        client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120)
        name = model.name
        assert [m.id for m in client.models.list().data] == [name, f"{name}+base", f"{name}+cardio"]
        for model_id, which in ((f"{name}+base", "base"), (name, "cardio"), (f"{name}+base", "base"),
                                (f"{name}+cardio", "cardio"), ("gpt-4o", "cardio")):
            reply = client.chat.completions.create(model=model_id, messages=MESSAGES, **SAMPLING)
            assert reply.choices[0].message.content == expected[which], model_id
            assert reply.model == (model_id if model_id.startswith(name) else name)
        with pytest.raises(openai.NotFoundError, match="cardi0 is not a loaded adapter"):
            client.chat.completions.create(model=f"{name}+cardi0", messages=MESSAGES, **SAMPLING)
        stream = client.chat.completions.create(model=f"{name}+base", messages=MESSAGES, stream=True, **SAMPLING)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected["base"]
    finally:
        stop()
        model.close()
