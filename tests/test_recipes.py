"""The recipe engine: bundled recipes, layer selection, rule order, llama.cpp overrides, and bad recipe files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

from medgemma_gguf.convert.quantize.llama_quantize import needs_imatrix, resolve_quants
from medgemma_gguf.convert.quantize.recipe import (
    TensorSpec,
    builtin_recipe,
    builtin_recipe_names,
    load_recipe,
    parse_recipe,
    plan_recipe,
)
from medgemma_gguf.errors import UserError
from medgemma_gguf.quant_types import LAYER_KINDS

UD_RECIPES = ("UD-Q2_K_XL", "UD-Q3_K_XL", "UD-Q4_K_XL", "UD-Q5_K_XL", "UD-Q6_K_XL", "UD-Q8_K_XL",
              "UD-IQ2_XXS", "UD-IQ3_XXS")
WIDTHS = {"attn_q": (256, 256), "attn_k": (256, 128), "attn_v": (256, 128), "attn_output": (256, 256),
          "ffn_gate": (256, 768), "ffn_up": (256, 768), "ffn_down": (768, 256)}


def gemma_tensors(n_layers: int, tied: bool = True) -> list[TensorSpec]:
    """A Gemma 3 text model's tensor list (ggml shapes), like the mm-k256 fixture's."""
    tensors = [TensorSpec("token_embd.weight", (256, 1088)), TensorSpec("output_norm.weight", (256,))]
    if not tied:
        tensors.append(TensorSpec("output.weight", (256, 1088)))
    for i in range(n_layers):
        tensors += [TensorSpec(f"blk.{i}.{kind}.weight", shape) for kind, shape in WIDTHS.items()]
        tensors += [TensorSpec(f"blk.{i}.{norm}.weight", (256,)) for norm in ("attn_norm", "ffn_norm")]
    return tensors


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_bundled_recipes_are_complete():
    assert set(UD_RECIPES) <= set(builtin_recipe_names())
    for name in builtin_recipe_names():
        recipe = builtin_recipe(name)
        assert recipe.name == name and recipe.description and recipe.rules
        for rule in recipe.rules:
            assert len(rule.why) > 40, f"{name} rule {rule.index} does not say why"
        plan = plan_recipe(recipe, gemma_tensors(6))
        assert len(plan.types) == 1 + 7 * 6  # every quantizable tensor, no norm
        assert "output_norm.weight" not in plan.types


def test_ud_q4_k_xl_plan():
    plan = plan_recipe(builtin_recipe("UD-Q4_K_XL"), gemma_tensors(6))
    assert plan.types["token_embd.weight"] is T.Q6_K
    for i in range(6):
        assert plan.types[f"blk.{i}.attn_v.weight"] is T.Q6_K and plan.types[f"blk.{i}.attn_k.weight"] is T.Q6_K
        assert plan.types[f"blk.{i}.attn_output.weight"] is T.Q5_K
        assert plan.types[f"blk.{i}.attn_q.weight"] is T.Q4_K and plan.types[f"blk.{i}.ffn_up.weight"] is T.Q4_K
        # first and last eighth of 6 layers: ceil(0.75) = 1 layer each end
        assert plan.types[f"blk.{i}.ffn_down.weight"] is (T.Q6_K if i in (0, 5) else T.Q5_K)
    assert plan.reasons["blk.0.ffn_down.weight"].startswith("rule 3: The first layers")


def test_layer_selection_fractions_ranges_and_lists():
    text = '''name = "x"
base = "Q4_K"
[[rules]]
tensors = "ffn_down"
layers = "last 1/8"
type = "Q6_K"
[[rules]]
tensors = ["attn_v"]
layers = ["first 2", "10-12, 20"]
type = "Q8_0"
[[rules]]
tensors = ["attn_k"]
layers = "first 12.5%"
type = "Q5_K"
'''
    plan = plan_recipe(parse_recipe(text), gemma_tensors(34))
    chosen = {kind: sorted(int(n.split(".")[1]) for n, t in plan.types.items() if n.endswith(f"{kind}.weight")
                           and t is not T.Q4_K) for kind in ("ffn_down", "attn_v", "attn_k")}
    assert chosen == {"ffn_down": [29, 30, 31, 32, 33], "attn_v": [0, 1, 10, 11, 12, 20], "attn_k": [0, 1, 2, 3, 4]}


def test_later_rules_override_earlier_ones_and_overrides_are_exact():
    text = '''name = "x"
base = "Q4_K"
[[rules]]
tensors = ["ffn_down", "attn_output"]
type = "Q5_K"
[[rules]]
tensors = ["ffn_down"]
layers = "1"
type = "Q8_0"
'''
    tensors = gemma_tensors(12)
    plan = plan_recipe(parse_recipe(text), tensors)
    assert plan.types["blk.1.ffn_down.weight"] is T.Q8_0 and plan.types["blk.11.ffn_down.weight"] is T.Q5_K
    names = [t.name for t in tensors]
    for pattern, qtype in plan.overrides:  # each llama.cpp regex selects exactly its own tensor
        hits = [n for n in names if re.search(pattern, n)]
        assert len(hits) == 1 and plan.types[hits[0]] is qtype
    assert len(plan.overrides) == len(plan.types)


def test_pattern_rules_as_auto_quant_writes_them():
    text = '''# Written by medgemma-gguf auto-quant
name = "AUTO-4.5bpw"
description = "measured"
base = "Q4_K"

[[rules]]
pattern = "^blk\\\\.3\\\\.ffn_down\\\\.weight$"
type = "Q8_0"
'''
    plan = plan_recipe(parse_recipe(text), gemma_tensors(6))
    assert plan.types["blk.3.ffn_down.weight"] is T.Q8_0
    assert sum(t is T.Q8_0 for t in plan.types.values()) == 1


def test_optional_rule_may_match_nothing():
    text = 'name = "x"\nbase = "Q4_K"\n[[rules]]\ntensors = ["output"]\ntype = "Q8_0"\noptional = true\n'
    plan = plan_recipe(parse_recipe(text), gemma_tensors(2))
    assert "output.weight" not in plan.types
    untied = plan_recipe(parse_recipe(text), gemma_tensors(2, tied=False))
    assert untied.types["output.weight"] is T.Q8_0


BAD_RECIPES = [
    # (text, expected line, words in the message)
    ('name = "x"\nbase = "Q4_K"\n[[rules]]\ntensors = ["attn_x"]\ntype = "Q6_K"\n', 4, "unknown tensor kind 'attn_x'"),
    ('name = "x"\nbase = "Q4_K"\n[[rules]]\ntensors = ["attn_v"]\ntype = "Q7_K"\n', 5, "type 'Q7_K'"),
    ('name = "x"\nbase = "Q9"\n', 2, "type 'Q9'"),
    ('name = "x"\nbase = "Q4_K"\n[[rules]]\ntensors = ["attn_v"]\nlayer = "0"\ntype = "Q6_K"\n', 5,
     "unknown key 'layer'"),
    ('name = "x"\nbase = "Q4_K"\n[[rules]]\ntensors = ["attn_v"]\nlayers = "some"\ntype = "Q6_K"\n', 5,
     "cannot read layers 'some'"),
    ('name = "x"\nbase = "Q4_K"\n[[rules]]\ntensors = ["token_embd"]\nlayers = "0"\ntype = "Q6_K"\n', 5,
     "token_embd is not a layer tensor"),
    ('name = "x"\nbase = "Q4_K"\n[[rules]]\npattern = "blk.(\\\\d"\ntype = "Q6_K"\n', 4, "not a valid regex"),
    ('name = "x"\nbase = "Q4_K"\n[[rules]]\ntype = "Q6_K"\nwhy = "no selector"\n', 3, "exactly one of"),
]


@pytest.mark.parametrize(("text", "line", "words"), BAD_RECIPES)
def test_bad_recipe_names_file_and_line(tmp_path, text, line, words):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert f"{path}:{line}:" in message and words in message


def test_rules_checked_against_the_model_name_the_line(tmp_path):
    # output is tied to token_embd in Gemma 3: a rule for it selects nothing and is not a silent no-op
    path = write(tmp_path, 'name = "x"\nbase = "Q4_K"\n\n[[rules]]\ntensors = ["attn_v"]\ntype = "Q6_K"\n\n'
                           '[[rules]]\ntensors = ["output"]\ntype = "Q8_0"\n')
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}:8: rule 2 \(output -> Q8_0\): .*matches no tensor"):
        plan_recipe(load_recipe(path), gemma_tensors(6))
    path = write(tmp_path, 'name = "x"\nbase = "Q4_K"\n[[rules]]\ntensors = ["ffn_down"]\nlayers = "4-40"\n'
                           'type = "Q6_K"\n')
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}:5: rule 1: layer 40 is beyond this model's 6"):
        plan_recipe(load_recipe(path), gemma_tensors(6))


def test_invalid_toml_and_missing_files(tmp_path):
    with pytest.raises(UserError, match=r"my\.toml: not valid TOML .*line 2"):
        load_recipe(write(tmp_path, 'name = "x"\nbase = \n'))
    with pytest.raises(UserError, match="recipe file .* not found"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(UserError, match="no base type"):
        load_recipe(write(tmp_path, 'name = "x"\n'))
    with pytest.raises(UserError, match="name must be set"):
        load_recipe(write(tmp_path, 'name = "a/b"\nbase = "Q4_K"\n'))


def test_user_recipe_resolves_and_may_not_shadow_a_type(tmp_path):
    recipe = load_recipe(write(tmp_path, 'name = "MY-Q4"\nbase = "Q4_K"\n'))
    specs = resolve_quants(["Q8_0", "ud-q4_k_xl"], [recipe])
    assert [s.name for s in specs] == ["Q8_0", "UD-Q4_K_XL", "MY-Q4"]
    clash = load_recipe(write(tmp_path, 'name = "Q4_K_M"\nbase = "Q4_K"\n'))
    with pytest.raises(UserError, match="like another quant type"):
        resolve_quants([], [clash])


def test_unknown_quant_type_lists_valid_ones():
    with pytest.raises(UserError) as caught:
        resolve_quants(["Q4_K_M", "Q4_K_XXL"])
    message = str(caught.value)
    assert "'Q4_K_XXL'" in message
    for name in ("Q8_0", "IQ1_S", "BF16", *UD_RECIPES):
        assert name in message


def test_which_quants_need_an_imatrix():
    tensors = gemma_tensors(6)
    need = {spec.name: bool(needs_imatrix(spec, tensors)) for spec in resolve_quants([
        "Q2_K", "Q4_K_M", "IQ4_XS", "IQ3_M", "IQ3_XXS", "IQ2_M", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
        *UD_RECIPES])}
    assert {name for name, needed in need.items() if needed} == {
        "IQ3_XXS", "IQ2_M", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "UD-IQ2_XXS", "UD-IQ3_XXS"}
    # a row length no IQ block fits: llama.cpp falls back to IQ4_NL, which needs no imatrix
    narrow = [TensorSpec(t.name, (96, *t.shape[1:])) if t.name.split(".")[-2] in LAYER_KINDS else t for t in tensors]
    assert not needs_imatrix(resolve_quants(["IQ2_XXS"])[0], narrow)
