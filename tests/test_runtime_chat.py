"""runtime.prompt / runtime.chat / runtime.cli: the runtime builds the HF processor's exact prompt, predicts
what HF predicts after it, generates HF's greedy tokens, and refuses bad input with one clear line.

The reference is the tiny ``mm-deep`` fixture (14 layers: its greedy output varies with the prompt,
where shallower random models repeat one token) in float32 transformers, against its F32 GGUF files.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from medgemma_gguf.errors import UserError
from medgemma_gguf.quant_eval.equivalence import (
    hf_generate,
    hf_greedy,
    hf_inputs,
    hf_inputs_logits,
    image_size,
    image_token_id,
    native_image,
)
from medgemma_gguf.quant_eval.metrics import kl_divergence_full

VARIANT = "mm-deep"
GREEDY_TOKENS = 16


# --- helpers shared with test_server.py ----------------------------------------------------------------
# the transformers side of the probes (native_image, image_size, image_token_id, hf_inputs, hf_greedy,
# hf_generate) is medgemma_gguf.quant_eval.equivalence's, the module medgemma-gguf check runs


def text_of(chat_model, ids: list[int]) -> str:
    """The text the runtime prints for ``ids`` (end-of-generation tokens print nothing)."""
    return b"".join(chat_model.engine.token_piece(t) for t in ids).decode("utf-8", errors="replace")


def until_end(chat_model, ids: list[int]) -> list[int]:
    for index, token in enumerate(ids):
        if chat_model.engine.is_end_of_generation(token):
            return ids[:index]
    return ids


@pytest.fixture(scope="module")
def folder(tiny_checkpoint) -> Path:
    return tiny_checkpoint(VARIANT)


def _conversations(folder: Path) -> dict[str, list[dict]]:
    size = image_size(folder)
    first, second = native_image(size, 17), native_image(size, 12)
    return {
        "text-only": [{"role": "user", "content": "What is the normal adult resting heart rate?"}],
        "system": [{"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
                   {"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                                {"type": "image", "image": first}]}],
        "image-first": [{"role": "user", "content": [{"type": "image", "image": first},
                                                     {"type": "text", "text": "  Findings?  "}]}],
        "multi-turn": [
            {"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                         {"type": "image", "image": first}]},
            {"role": "assistant", "content": "No acute cardiopulmonary process."},
            {"role": "user", "content": [{"type": "text", "text": "Compare with this one."},
                                         {"type": "image", "image": second}, {"type": "image", "image": first}]},
        ],
    }


CASES = ("text-only", "system", "image-first", "multi-turn")


# --- presets and prompt fidelity -----------------------------------------------------------------------


def test_presets_cover_medgemmas_documented_uses():
    from medgemma_gguf.runtime.prompt import load_presets, preset_system, resolve_system

    presets = load_presets()
    assert set(presets) >= {"radiology", "dermatology", "pathology", "ophthalmology", "medical-qa"}
    assert preset_system("radiology") == "You are an expert radiologist."
    assert preset_system("medical-qa") == "You are a helpful medical assistant."
    assert resolve_system(None, None) is None
    with pytest.raises(UserError, match="unknown preset 'cardio'; choose one of"):
        preset_system("cardio")
    with pytest.raises(UserError, match="not both"):
        resolve_system("x", "radiology")


@pytest.mark.parametrize("case", CASES)
def test_prompt_ids_equal_hf_processor(case, folder, chat_model):
    messages = _conversations(folder)[case]
    reference = hf_inputs(folder, messages)["input_ids"][0].tolist()
    prompt = chat_model.prompt(messages)
    ours = prompt.flat_ids(image_token_id(folder))
    assert ours == reference
    assert ours[0] == chat_model.engine.bos_token and ours.count(chat_model.engine.bos_token) == 1
    n_images = sum(item.get("type") == "image" for m in messages if isinstance(m["content"], list)
                   for item in m["content"])
    assert prompt.n_images == n_images == ours.count(image_token_id(folder)) // chat_model.image_tokens


def test_system_and_preset_render_as_the_template_does(folder, chat_model):
    messages = [{"role": "user", "content": "Hi"}]
    assert "expert radiologist" not in chat_model.prompt(messages).text  # no system prompt unless asked
    with_preset = chat_model.prompt(messages, preset="radiology")
    explicit = chat_model.prompt([{"role": "system", "content": "You are an expert radiologist."}, *messages])
    assert with_preset.parts == explicit.parts
    assert with_preset.text.startswith("<bos><start_of_turn>user\nYou are an expert radiologist.\n\nHi")
    with pytest.raises(UserError, match="already start with a system message"):
        chat_model.prompt([{"role": "system", "content": "a"}, *messages], system="b")


def test_text_model_prompt_equals_hf_tokenizer(tiny_checkpoint, converted):
    from transformers import AutoTokenizer

    from medgemma_gguf.runtime.chat import load

    folder = tiny_checkpoint("text")
    messages = [{"role": "system", "content": "You are a helpful medical assistant."},
                {"role": "user", "content": "What causes anemia?"}, {"role": "assistant", "content": "Many things."},
                {"role": "user", "content": "List three."}]
    reference = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True,
                                                                          tokenize=True, return_dict=True)
    with load(converted("text").text_path, n_gpu_layers=0, n_ctx=256, n_threads=1) as model:
        assert model.prompt(messages).flat_ids(-1) == list(reference["input_ids"])
        with pytest.raises(UserError, match="loaded without an mmproj"):
            model.prompt([{"role": "user", "content": [{"type": "image", "image": native_image(8, 0)}]}])


@pytest.mark.parametrize("case", CASES)
def test_next_token_distribution_equals_hf(case, folder, chat_model, hf_model):
    messages = _conversations(folder)[case]
    inputs = hf_inputs(folder, messages)
    reference = hf_inputs_logits(hf_model(folder), inputs)[-1:]
    chat_model.reset()
    ours = chat_model.next_token_logits(chat_model.prompt(messages))[None]
    assert kl_divergence_full(reference, ours).max() <= 1e-4


def test_multi_turn_reuses_the_cached_prefix_and_matches_hf(folder, chat_model, hf_model):
    conversation = _conversations(folder)["multi-turn"]
    chat_model.reset()
    first = chat_model.chat(conversation[:1], max_tokens=4)
    assert first.timings["prompt_positions_reused"] == 0
    second = chat_model.chat(conversation, max_tokens=GREEDY_TOKENS)
    assert second.timings["prompt_positions_reused"] > chat_model.image_tokens  # turn 1 (with its image) re-used
    assert second.timings["prompt_positions_evaluated"] + second.timings["prompt_positions_reused"] == \
        second.prompt_tokens
    chat_model.reset()
    fresh = chat_model.chat(conversation, max_tokens=GREEDY_TOKENS)
    assert fresh.timings["prompt_positions_reused"] == 0
    assert second.token_ids == fresh.token_ids
    reference = hf_generate(hf_model(folder), hf_inputs(folder, conversation), GREEDY_TOKENS)
    assert second.token_ids == until_end(chat_model, reference)
    # the cache after a reply is trimmed back when the next conversation differs earlier
    other = [{"role": "user", "content": "A different first turn"}]
    logits = chat_model.next_token_logits(chat_model.prompt(other))[None]
    expected = hf_inputs_logits(hf_model(folder), hf_inputs(folder, other))[-1:]
    assert kl_divergence_full(expected, logits).max() <= 1e-4


# --- generation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["system", "multi-turn"])
def test_greedy_tokens_equal_hf(case, folder, chat_model, hf_model):
    """16 greedy tokens with end-of-turn ignored equal HF's argmax continuation (and each step's
    distribution matches); with end-of-turn honoured the reply equals HF generate up to it."""
    messages = _conversations(folder)[case]
    inputs = hf_inputs(folder, messages)
    reference, reference_logits = hf_greedy(hf_model(folder), inputs, GREEDY_TOKENS)
    assert len(set(reference)) >= 3  # a continuation that varies, so the comparison means something
    chat_model.reset()
    prompt = chat_model.prompt(messages)
    forced = chat_model.generate(prompt, max_tokens=GREEDY_TOKENS, ignore_eos=True).collect()
    assert forced.token_ids == reference
    # the decode-time distributions, step by step, on the same cache
    ours = [chat_model.next_token_logits(prompt)]
    ours.extend(chat_model.engine.eval_tokens(reference[:-1], logits="all"))
    assert kl_divergence_full(reference_logits, np.stack(ours)).max() <= 1e-4
    reply = chat_model.chat(messages, max_tokens=GREEDY_TOKENS)
    assert reply.token_ids == until_end(chat_model, hf_generate(hf_model(folder), inputs, GREEDY_TOKENS))
    assert reply.text == text_of(chat_model, reply.token_ids)


def test_streaming_yields_the_same_text_in_pieces(folder, chat_model):
    messages = _conversations(folder)["system"]
    whole = chat_model.chat(messages, max_tokens=12)
    stream = chat_model.chat(messages, max_tokens=12, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == whole.text and stream.result.text == whole.text
    assert stream.result.token_ids == whole.token_ids
    assert whole.completion_tokens == len(whole.token_ids) and whole.prompt_tokens == \
        chat_model.prompt(messages).n_positions
    assert set(whole.timings) >= {"prompt_ms", "time_to_first_token_ms", "decode_ms", "decode_tokens_per_s"}


def test_a_new_chat_ends_an_unfinished_stream(folder, chat_model):
    messages = _conversations(folder)["text-only"]
    stream = chat_model.generate(chat_model.prompt(messages), max_tokens=8, ignore_eos=True)
    next(stream)
    chat_model.chat(messages, max_tokens=2)
    with pytest.raises(RuntimeError, match="ended by a newer chat"):
        list(stream)


def test_should_stop_ends_a_reply_early(folder, chat_model):
    polls = []
    stream = chat_model.generate(chat_model.prompt(_conversations(folder)["text-only"]), max_tokens=20,
                                 ignore_eos=True, should_stop=lambda: polls.append(1) or len(polls) >= 3)
    result = stream.collect()
    assert result.finish_reason == "cancelled" and result.completion_tokens == 3


def test_seeded_sampling_reproduces_a_reply(folder, files, chat_model):
    """Same request + same seed = same reply, whether the prefix is re-used or evaluated from scratch."""
    from medgemma_gguf.runtime import load

    messages = _conversations(folder)["system"]
    prompt = chat_model.prompt(messages)
    chat_model.reset()
    fresh = chat_model.next_token_logits(prompt)
    reused = chat_model.next_token_logits(prompt)  # everything but the last token comes from the cache
    assert np.array_equal(fresh, reused)
    sampling = {"max_tokens": 24, "temperature": 1.5, "top_p": 0.95, "seed": 123}
    a = chat_model.chat(messages, **sampling)
    b = chat_model.chat(messages, **sampling)
    with load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=1024, n_threads=1) as other:
        c = other.chat(messages, **sampling)
    assert a.token_ids == b.token_ids == c.token_ids


def test_context_overflow_is_refused_before_evaluation(files):
    from medgemma_gguf.runtime.chat import load

    with load(files.text_path, files.mmproj_path, n_gpu_layers=0, n_ctx=256, n_threads=1) as model:
        long_text = " ".join(["pneumothorax"] * 80)
        with pytest.raises(UserError, match=r"needs \d+ positions .* context holds 256; raise n_ctx"):
            model.chat([{"role": "user", "content": long_text}])
        assert model.engine.n_past == 0  # nothing was evaluated
        prompt = model.prompt([{"role": "user", "content": "Hi"}])
        reply = model.generate(prompt, max_tokens=500, ignore_eos=True).collect()
        assert reply.finish_reason == "length" and model.engine.n_past == model.n_ctx
        assert reply.completion_tokens == model.n_ctx - prompt.n_positions + 1  # the last one is never fed back
        unread = model.chat([{"role": "user", "content": "Hi"}], stream=True)
    with pytest.raises(UserError, match="this model was closed"):
        model.chat([{"role": "user", "content": "Hi"}])
    with pytest.raises(RuntimeError, match="model was closed"):
        next(unread)


# --- loading and bad input -----------------------------------------------------------------------------


def test_mismatched_or_wrong_files_are_refused_before_loading(converted, tmp_path):
    from medgemma_gguf.runtime.chat import load

    k256, deep = converted("mm-k256"), converted("mm-deep")
    with pytest.raises(UserError, match="belongs to another model; use the mmproj from the same conversion"):
        load(k256.text_path, deep.mmproj_path, n_gpu_layers=0)
    with pytest.raises(UserError, match="is an mmproj"):
        load(deep.mmproj_path, n_gpu_layers=0)
    with pytest.raises(UserError, match="is not an mmproj"):
        load(deep.text_path, k256.text_path, n_gpu_layers=0)
    with pytest.raises(UserError, match="not found"):
        load(tmp_path / "missing.gguf")
    with pytest.raises(UserError, match="mmproj .* not found"):
        load(deep.text_path, tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="is not a GGUF file"):
        load(junk)
    with pytest.raises(UserError, match="n_gpu_layers must be 'auto' or a whole number"):
        load(deep.text_path, n_gpu_layers="lots")


def test_bad_images_give_clear_errors_and_the_next_chat_works(folder, chat_model, tmp_path):
    good = [{"role": "user", "content": "Hi"}]
    expected = chat_model.chat(good, max_tokens=3).token_ids
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    cases = [
        ({"type": "image", "path": str(tmp_path / "missing.png")}, "missing.png does not exist"),
        ({"type": "image", "path": str(corrupt)}, "corrupt.png is not a readable image"),
        ({"type": "image", "url": "http://169.254.169.254/latest/meta-data"}, "never fetched"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}, "invalid base64"),
        ({"type": "image", "image": np.zeros((4, 4), dtype=np.float32)}, "must be uint8"),
        ({"type": "video", "path": "x.mp4"}, "unknown content item type"),
        ({"type": "image", "path": "x.png", "detail": "low"}, "content item 1: 'detail' is not a field"),
        ({"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}}, "'image_url.detail' 'low'"),
        ({"type": "longitudinal", "prior": "a.png", "current": "b.png", "after": "c.png"}, "'after' is not a field"),
    ]
    for item, message in cases:
        with pytest.raises(UserError, match=message):
            chat_model.chat([{"role": "user", "content": [{"type": "text", "text": "Findings?"}, item]}])
    chat_model.max_image_pixels = 100
    try:
        with pytest.raises(UserError, match="more than the limit of 100"):
            chat_model.chat([{"role": "user", "content": [{"type": "image", "image": native_image(64, 1)}]}])
    finally:
        from medgemma_gguf.runtime.images import DEFAULT_MAX_PIXELS

        chat_model.max_image_pixels = DEFAULT_MAX_PIXELS
    for messages, message in [([], "non-empty list"), ([{"role": "doctor", "content": "x"}], "role 'doctor'"),
                              ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
                              ([{"role": "user", "content": "<start_of_image>"}], "do not write <start_of_image>")]:
        with pytest.raises(UserError, match=message):
            chat_model.chat(messages)
    assert chat_model.chat(good, max_tokens=3).token_ids == expected


def test_images_from_paths_data_uris_and_arrays_are_the_same_image(folder, chat_model, tmp_path):
    img = native_image(image_size(folder), 21)
    path = tmp_path / "cxr.png"
    img.save(path)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    sources = [{"type": "image", "path": str(path)}, {"type": "image", "image": img},
               {"type": "image", "image": np.asarray(img)}, {"type": "image_url", "image_url": {"url": uri}},
               {"type": "image", "url": f"file://{path}"}]
    prompts = [chat_model.prompt([{"role": "user", "content": [{"type": "text", "text": "Findings?"}, s]}])
               for s in sources]
    assert len({p.parts[1].key for p in prompts}) == 1
    big = img.resize((img.width * 3, img.height * 2))
    resized = chat_model.prompt([{"role": "user", "content": [{"type": "image", "image": big}]}])
    assert resized.parts[1].pixels.shape == (image_size(folder), image_size(folder), 3)


# --- output folders and fit ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quant_folder(converted, tmp_path_factory):
    """An output folder holding the F32 and BF16 text files and an F32 mmproj of mm-deep."""
    import shutil

    from medgemma_gguf.manifest import Manifest, entry_for

    out = tmp_path_factory.mktemp("quants")
    f32, bf16 = converted(VARIANT), converted(VARIANT, "bf16", "f32")
    manifest = Manifest.load(f32.manifest_path.parent)
    for result, label in ((f32, "F32"), (bf16, "BF16")):
        target = out / f"model-{label}.gguf"
        shutil.copy(result.text_path, target)
        manifest.upsert(entry_for(out, target, "text", label))
    shutil.copy(f32.mmproj_path, out / "mmproj-F32.gguf")
    manifest.files = [f for f in manifest.files if (out / f.path).is_file()]
    manifest.upsert(entry_for(out, out / "mmproj-F32.gguf", "mmproj", "F32"))
    manifest.save(out)
    return out


def test_load_from_a_folder_picks_the_best_quant_and_its_mmproj(quant_folder):
    from medgemma_gguf.runtime.chat import load

    with load(quant_folder, n_gpu_layers=0, n_ctx=256, n_threads=1) as model:
        assert model.model_path.name == "model-F32.gguf" and model.mmproj_path.name == "mmproj-F32.gguf"
        assert model.plan is None
    with load(quant_folder, n_ctx=256, n_threads=1, quant="bf16") as model:
        assert model.model_path.name == "model-BF16.gguf"
        assert model.plan is not None and model.plan.n_gpu_layers == 0  # CPU build: auto means CPU
    with pytest.raises(UserError, match="has no quant 'Q2_K'"):
        load(quant_folder, quant="Q2_K")


def test_fit_ranks_by_bits_per_weight_or_by_report(quant_folder, tmp_path):
    from medgemma_gguf.runtime.cli import fit_command

    runner = CliRunner()
    ranked = json.loads(runner.invoke(fit_command, [str(quant_folder), "--vram", "8GiB", "--json"]).output)
    assert [q["file"] for q in ranked["quants"]] == ["model-F32.gguf", "model-BF16.gguf"]
    assert all(q["fits"] for q in ranked["quants"]) and ranked["quants"][0]["bpw"] > ranked["quants"][1]["bpw"]
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"rows": [{"file": "model-F32.gguf", "kld_mean": 0.02},
                                           {"file": "model-BF16.gguf", "kld_mean": 0.001}]}))
    text = runner.invoke(fit_command, [str(quant_folder), "--vram", "8GiB", "--report", str(report)]).output
    assert "ranked by mean KL" in text and text.index("model-BF16.gguf") < text.index("model-F32.gguf")
    report.write_text(json.dumps({"rows": [{"file": "model-F32.gguf", "kld_mean": 0.02}]}))
    text = runner.invoke(fit_command, [str(quant_folder), "--vram", "8GiB", "--report", str(report)]).output
    assert text.index("model-F32.gguf") < text.index("model-BF16.gguf")  # measured first
    assert "model-BF16.gguf" in text.split("not in the report")[0].splitlines()[-1]
    tight = runner.invoke(fit_command, [str(quant_folder), "--vram", "1MiB", "--ctx", "512"]).output
    assert "none fits" in tight and "does not fit: model-F32.gguf" in tight
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    result = runner.invoke(fit_command, [str(quant_folder), "--report", str(broken)])
    assert isinstance(result.exception, UserError) and "not valid JSON" in str(result.exception)


def test_fit_shows_each_kl_bracket_and_says_when_two_overlap(quant_folder, tmp_path):
    """A schema-2 report's ``kld_mean_low``/``kld_mean_high``: ``fit`` prints each quant's KL with its bracket
    (an unbounded one as inf, null in JSON), notes a bracket that overlaps the one above (the order of the two is
    not established), and not one that does not; ``--json`` carries the bracket."""
    from medgemma_gguf.runtime.cli import fit_command

    runner = CliRunner()
    report = tmp_path / "report.json"

    def fit(bf16: tuple, f32: tuple) -> tuple[list[str], list[dict]]:
        rows = [{"file": name, "kld_mean": mean, "kld_mean_low": low, "kld_mean_high": high}
                for name, (mean, low, high) in (("model-BF16.gguf", bf16), ("model-F32.gguf", f32))]
        report.write_text(json.dumps({"schema_version": 2, "rows": rows}))
        args = [str(quant_folder), "--vram", "8GiB", "--report", str(report)]
        text = runner.invoke(fit_command, args)
        data = runner.invoke(fit_command, [*args, "--json"])
        assert text.exit_code == 0 and data.exit_code == 0, (text.output, data.output)
        lines = [line for line in text.output.splitlines() if line.lstrip()[:1].isdigit()]  # the ranked quants
        return lines, json.loads(data.output)["quants"]

    note = "(bracket overlaps the one above: the order of the two is not established)"
    # BF16's bracket [0.001, 0.003] reaches past F32's low end 0.002: the two may be in either order
    lines, quants = fit((0.001, 0.001, 0.003), (0.002, 0.002, 0.0025))
    assert [q["file"] for q in quants] == ["model-BF16.gguf", "model-F32.gguf"]
    assert [(q["kld_mean"], q["kld_mean_low"], q["kld_mean_high"]) for q in quants] == [(0.001, 0.001, 0.003),
                                                                                         (0.002, 0.002, 0.0025)]
    assert len(lines) == 2 and lines[0].startswith("  1. model-BF16.gguf") and lines[1].startswith("  2. model-F32")
    assert lines[0].endswith("mean KL 0.001 [0.001, 0.003]")
    assert lines[1].endswith(f"mean KL 0.002 [0.002, 0.0025]  {note}")
    # disjoint brackets: the order is established, no note
    lines, quants = fit((0.001, 0.001, 0.0015), (0.002, 0.002, 0.0025))
    assert lines[0].endswith("mean KL 0.001 [0.001, 0.0015]") and lines[1].endswith("mean KL 0.002 [0.002, 0.0025]")
    assert not any(note in line for line in lines)
    # an estimate whose bracket is wider than the other's gap ranks by the estimate, still noted; an unbounded
    # bracket (null) prints inf, is null in JSON, and overlaps whatever follows it
    lines, quants = fit((0.001, 0.0009, None), (0.05, 0.04, 0.06))
    assert [(q["kld_mean_low"], q["kld_mean_high"]) for q in quants] == [(0.0009, None), (0.04, 0.06)]
    assert lines[0].endswith("mean KL 0.001 [0.0009, inf]") and lines[1].endswith(f"[0.04, 0.06]  {note}")


# --- command line --------------------------------------------------------------------------------------


@pytest.fixture
def cli_main():
    """``medgemma_gguf.cli.main``: the installed console script's entry point."""
    from medgemma_gguf import cli

    return cli.main


def test_cli_one_shot_streams_hf_greedy_tokens_and_json(folder, files, converted, chat_model, hf_model, tmp_path,
                                                        cli_main, capsys):
    img = native_image(image_size(folder), 31)
    path = tmp_path / "cxr.png"
    img.save(path)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                             {"type": "image", "image": img}]}]
    reference = until_end(chat_model, hf_generate(hf_model(folder), hf_inputs(folder, messages), GREEDY_TOKENS))
    base = ["chat", str(files.text_path), "--mmproj", str(files.mmproj_path), "--prompt", "Describe this X-ray",
            "--image", str(path), "--max-tokens", str(GREEDY_TOKENS), "--threads", "1", "--ctx", "512"]
    assert cli_main([*base, "--json"]) == 0
    out = capsys.readouterr().out
    reply = json.loads(out)
    assert set(reply) >= {"text", "prompt_tokens", "completion_tokens", "timings"}
    assert reply["text"] == text_of(chat_model, reference) and reply["completion_tokens"] == len(reference)
    assert cli_main(base) == 0
    assert capsys.readouterr().out == reply["text"] + "\n"
    assert cli_main([*base[:-6], "--image", str(tmp_path / "nope.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "nope.png" in err[-1]
    other = converted("mm-k256").mmproj_path
    assert cli_main(["chat", str(files.text_path), "--mmproj", str(other), "--prompt", "x"]) == 2
    assert "belongs to another model" in capsys.readouterr().err
    assert cli_main(["chat", str(files.text_path), "--json"]) == 2
    assert "--json prints one reply" in capsys.readouterr().err


def test_cli_repl_keeps_the_conversation(folder, files, chat_model, tmp_path):
    from medgemma_gguf.runtime.cli import chat_command

    img = native_image(image_size(folder), 41)
    path = tmp_path / "cxr.png"
    img.save(path)
    script = "\n".join([f"/image {tmp_path / 'missing.png'}", f"/image {path}", "Describe this X-ray", "",
                        "Anything else?", "/bogus", "/reset", "Hello", "/quit", "never sent"]) + "\n"
    result = CliRunner().invoke(chat_command, [str(files.text_path), "--mmproj", str(files.mmproj_path),
                                               "--max-tokens", "6", "--threads", "1", "--ctx", "512"], input=script)
    assert result.exit_code == 0, result.output
    turn1 = [{"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                          {"type": "image", "image": img}]}]
    reply1 = chat_model.chat(turn1, max_tokens=6).text
    turn2 = [*turn1, {"role": "assistant", "content": reply1}, {"role": "user", "content": "Anything else?"}]
    reply2 = chat_model.chat(turn2, max_tokens=6).text
    reply3 = chat_model.chat([{"role": "user", "content": "Hello"}], max_tokens=6).text
    stdout = result.stdout
    assert stdout == f"{reply1}\n{reply2}\n{reply3}\n"
    assert "error: image file" in result.stderr and "missing.png does not exist" in result.stderr
    assert "unknown command /bogus" in result.stderr and "(new conversation)" in result.stderr


def test_engine_truncate_forgets_positions_and_reevaluation_matches(converted):
    from medgemma_gguf.runtime.engine import Engine

    text_path = converted("text").text_path
    with Engine(text_path, n_ctx=64) as engine:
        tokens = engine.tokenize("<start_of_turn>user\nfirst words then more words<end_of_turn>")
        full = engine.eval_tokens(tokens, logits="all")
        assert engine.truncate(5) and engine.n_past == 5
        again = engine.eval_tokens(tokens[5:], logits="all")
        np.testing.assert_allclose(again, full[5:], atol=1e-4)
        with pytest.raises(ValueError, match="cannot keep"):
            engine.truncate(engine.n_past + 1)
