from pathlib import Path

import pytest

from moetool.recipe import RecipeError, load_recipe, parse_override, resolve_moe_layers
from moetool.recipe.load import recipe_from_dict, recipe_to_dict
from moetool.recipe.paths import bundled_recipes, recipes_root, resolve_recipe
from moetool.recipe.schema import parse_layer_layout

ROOT = recipes_root()


def test_bundled_recipes_are_the_source_tree_recipes():
    assert Path(__file__).resolve().parents[2] / "recipes" == ROOT
    assert len(bundled_recipes()) >= 30


@pytest.mark.parametrize("name", bundled_recipes())
def test_every_recipe_loads_and_validates(name):
    recipe = load_recipe(ROOT / f"{name}.toml")
    assert recipe.name
    assert recipe.stages.present(), "a recipe trains at least one stage"
    if recipe.moe is not None:
        assert recipe.moe_layer_indices
        assert max(recipe.moe_layer_indices) < recipe.model.num_layers


def test_every_fragment_is_used():
    import tomllib

    def parents(path: Path) -> list[Path]:
        extends = tomllib.loads(path.read_text()).get("extends", [])
        extends = [extends] if isinstance(extends, str) else extends
        return [(path.parent / e).resolve() for e in extends]

    reached: set[Path] = set()
    todo = [(ROOT / f"{name}.toml").resolve() for name in bundled_recipes()]
    while todo:
        path = todo.pop()
        if path not in reached:
            reached.add(path)
            todo.extend(parents(path))
    fragments = {
        p.resolve()
        for p in ROOT.rglob("*.toml")
        if any(part.startswith("_") for part in p.relative_to(ROOT).parts)
    }
    assert fragments and fragments <= reached, fragments - reached


def test_paper_hyperparameters_table9():
    recipe = load_recipe(ROOT / "qwen-1.8b/moe-4x-top2.toml")
    s1, s2, s3 = recipe.stages.pretrain, recipe.stages.instruct, recipe.stages.moe_tune
    assert (s1.lr, s2.lr, s3.lr) == (1e-3, 2e-5, 2e-5)
    assert (s1.global_batch_size, s2.global_batch_size, s3.global_batch_size) == (256, 128, 128)
    assert (s1.zero_stage, s2.zero_stage, s3.zero_stage) == (2, 2, 2)
    assert (s1.offload_optimizer, s2.offload_optimizer, s3.offload_optimizer) == (
        False,
        False,
        True,
    )
    assert s1.trainable == ("projector",) and s1.template == "plain"
    assert set(s2.trainable) == {"llm", "projector"}
    assert set(s3.trainable) == {"ffn", "routers"}
    for s in (s1, s2, s3):
        assert s.lr_schedule == "cosine" and s.weight_decay == 0.0 and s.epochs == 1
        assert s.max_length == 2048 and s.precision == "bf16" and s.gradient_checkpointing
    assert recipe.vision.image_size == 336 and recipe.vision.feature_layer == -2
    assert recipe.moe.num_experts == 4 and recipe.moe.top_k == 2
    assert recipe.moe.aux_loss_coef == 0.01
    assert recipe.moe_layer_indices == tuple(range(0, 24, 2))


@pytest.mark.parametrize(
    ("name", "experts", "top_k", "layers"),
    [
        ("qwen-1.8b/ablation-top1", 4, 1, tuple(range(0, 24, 2))),
        ("qwen-1.8b/ablation-experts-2", 2, 1, tuple(range(0, 24, 2))),
        ("qwen-1.8b/ablation-first-half", 4, 2, tuple(range(12))),
        ("qwen-1.8b/ablation-second-half", 4, 2, tuple(range(12, 24))),
        ("qwen-1.8b/ablation-all-layers", 4, 2, tuple(range(24))),
        ("phi2-2.7b/moe-4x-top2-all", 4, 2, tuple(range(32))),
    ],
)
def test_ablation_layouts(name, experts, top_k, layers):
    recipe = load_recipe(resolve_recipe(name))
    assert (recipe.moe.num_experts, recipe.moe.top_k) == (experts, top_k)
    assert recipe.moe_layer_indices == layers


def test_training_strategies_table6():
    a = load_recipe(ROOT / "qwen-1.8b/strategy-a.toml")
    assert a.moe is not None and list(a.stages.present()) == ["pretrain", "moe_tune"]
    assert set(a.stages.moe_tune.trainable) == {"llm", "projector"}
    c = load_recipe(ROOT / "qwen-1.8b/strategy-c.toml")
    assert c.moe is None and list(c.stages.present()) == ["pretrain", "instruct"]
    assert "llava_image_tune_.json" in c.stages.instruct.data
    d = load_recipe(ROOT / "qwen-1.8b/strategy-d.toml")
    assert d.moe is None and list(d.stages.present()) == ["pretrain", "instruct", "moe_tune"]
    assert "llava_image_tune_.json" not in d.stages.instruct.data
    tune_all = load_recipe(ROOT / "qwen-1.8b/ablation-tune-all.toml")
    assert set(tune_all.stages.moe_tune.trainable) == {"llm", "projector"}


def test_384_variants_use_siglip():
    for name in ("stablelm-1.6b/moe-4x-top2-384", "phi2-2.7b/moe-4x-top2-384"):
        recipe = load_recipe(resolve_recipe(name))
        assert recipe.vision.type == "siglip" and recipe.vision.image_size == 384
        assert recipe.vision.image_tokens == 729


BAD = """
name = "bad"
[model]
model_type = "llama"
vocab_size = 100
hidden_size = 64
num_layers = 4
ffn_hidden_size = 128
ffn_linears = 3
num_heads = 4
num_kv_heads = 2
hidden_dropout = 0.1
[vision]
image_size = "big"
[moe]
num_experts = 4
top_k = 6
layers = [0, 2, 7]
[stages.instruct]
trainable = ["llm"]
data = ["a.json"]
lr = -2e-5
global_batch_size = 8
per_device_batch_size = 2
"""


def test_bad_recipe_reports_every_problem_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    text = str(err)
    assert str(path) in text
    keys = [p.split(":")[0] for p in err.problems]
    assert keys == [
        "model.hidden_dropout",  # unknown key
        "vision.image_size",  # wrong type
        "moe.top_k",  # top-k > experts
        "stages.instruct.lr",  # negative lr
        "moe.layers",  # index out of range
    ], err.problems
    assert "greater than num_experts (4)" in text
    assert "[7]" in text and "4 layers" in text
    assert "expected an integer, got 'big'" in text


def test_set_overrides_are_validated_the_same_way(tmp_path):
    base = ROOT / "tiny/llama.toml"
    recipe = load_recipe(base, ["moe.num_experts=8", "moe.layers=[1, 3]", "data.template=chatml"])
    assert recipe.moe.num_experts == 8
    assert recipe.moe_layer_indices == (1, 3)
    assert recipe.data.template == "chatml"
    with pytest.raises(RecipeError) as info:
        load_recipe(base, ["moe.top_k=9", "stages.pretrain.lr=0", "moe.bogus=1", "nonsense"])
    keys = [p.split(":")[0] for p in info.value.problems]
    assert "--set 'nonsense'" in keys
    assert {"moe.top_k", "stages.pretrain.lr", "moe.bogus"} <= set(keys)


def test_parse_override_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=2e-5") == ("a.b", 2e-5)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=[0, 2]") == ("a.b", [0, 2])
    assert parse_override("a.b=interval") == ("a.b", "interval")
    assert parse_override('a.b="x=y"') == ("a.b", "x=y")


def test_extends_cycle_and_missing_parent(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\nname = "a"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('extends = "missing.toml"\n')
    with pytest.raises(RecipeError, match="extended by"):
        load_recipe(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text("name = [\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(tmp_path / "d.toml")


def test_sparse_parts_need_moe_tune_and_moe(tmp_path):
    text = (ROOT / "tiny/llama.toml").read_text()
    path = tmp_path / "r.toml"
    path.write_text(text.replace('extends = "_base.toml"', f'extends = "{ROOT}/tiny/_base.toml"'))
    with pytest.raises(RecipeError, match=r"stages.instruct.trainable: \['routers'\]"):
        load_recipe(path, ['stages.instruct.trainable=["llm", "routers"]'])


def test_family_structure_is_checked(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(
            ROOT / "tiny/phi.toml",
            ["model.ffn_linears=3", "model.mlp_bias=false", "model.model_type=phy"],
        )
    assert "unknown model_type 'phy'" in str(info.value)
    with pytest.raises(RecipeError, match="phi FFNs have 2 linear layers, got 3"):
        load_recipe(ROOT / "tiny/phi.toml", ["model.ffn_linears=3"])


def test_layer_layouts():
    assert resolve_moe_layers("interval", 5) == (0, 2, 4)
    assert resolve_moe_layers("first-half", 6) == (0, 1, 2)
    assert resolve_moe_layers("second-half", 6) == (3, 4, 5)
    assert resolve_moe_layers("all", 3) == (0, 1, 2)
    assert resolve_moe_layers((5, 1), 6) == (1, 5)
    assert parse_layer_layout("0, 2,5") == (0, 2, 5)
    assert parse_layer_layout("all") == "all"
    with pytest.raises(ValueError, match="comma-separated"):
        parse_layer_layout("every-other")


def test_recipe_round_trips_through_plain_data():
    from moetool.recipe import recipe_from_dict

    recipe = load_recipe(ROOT / "qwen-1.8b/moe-4x-top2.toml")
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


def test_unknown_templates_are_recipe_errors():
    with pytest.raises(RecipeError) as info:
        load_recipe(
            ROOT / "tiny/llama.toml",
            ["data.template=vicuna_v1", "stages.pretrain.template=plainer"],
        )
    keys = [p.split(":")[0] for p in info.value.problems]
    assert keys == ["data.template", "stages.pretrain.template"]
    assert "known: plain, phi, stablelm, qwen, openchat, mistral, llama3, chatml" in str(info.value)


@pytest.mark.parametrize("key", ["epochs", "weight_decay", "max_grad_norm"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_training_numbers_are_refused(key, value):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipes_root() / "tiny/llama.toml", [f"stages.instruct.{key}={value}"])
    assert f"stages.instruct.{key}: must be a finite number" in str(info.value)


def test_top1_ablation_recipes_weight_by_the_raw_probability():
    for name in ("qwen-1.8b/ablation-top1", "qwen-1.8b/ablation-experts-2"):
        moe = load_recipe(resolve_recipe(name)).moe
        assert moe.top_k == 1 and moe.renormalize is False
    with pytest.raises(RecipeError, match="normalize_top_k: true with top_k = 1"):
        load_recipe(resolve_recipe("qwen-1.8b/ablation-top1"), ["moe.normalize_top_k=true"])


def test_a_vision_tower_without_a_language_model_is_refused():
    with pytest.raises(RecipeError, match="vision.path: is set but model.path is empty"):
        load_recipe(recipes_root() / "tiny/llama.toml", ["vision.path=/models/clip"])


PAPER_RECIPES = [name for name in bundled_recipes() if not name.startswith("tiny/")]
# Samples of the paper's data per stage (Table 2; stage II adds the 40,688 text-only
# conversations of nlp_tune.json): a save interval must fall inside the stage's epoch.
PAPER_SAMPLES = {"pretrain": 558_128, "instruct": 964_000 + 40_688, "moe_tune": 665_298}


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_save_periodically_and_keep_one_checkpoint(name):
    recipe = load_recipe(ROOT / f"{name}.toml")
    for stage_name in recipe.stages.present():
        stage = getattr(recipe.stages, stage_name)
        steps_per_epoch = PAPER_SAMPLES[stage_name] // stage.global_batch_size
        assert 0 < stage.save_steps < steps_per_epoch, (stage_name, stage.save_steps)
        assert stage.save_total_limit == 1, stage_name  # pruned after each complete save


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_group_by_modality_length_in_stages_2_and_3(name):
    """As the official stage II/III scripts (--group_by_modality_length True); stage I's data
    has images only and its script leaves it off."""
    stages = load_recipe(ROOT / f"{name}.toml").stages
    for stage_name in stages.present():
        grouped = getattr(stages, stage_name).group_by_modality_length
        assert grouped is (stage_name != "pretrain"), stage_name


def test_lora_section_reports_every_problem_at_once(tmp_path):
    text = (ROOT / "tiny/llama.toml").read_text()
    path = tmp_path / "r.toml"
    path.write_text(text.replace('extends = "_base.toml"', f'extends = "{ROOT}/tiny/_base.toml"'))
    good = load_recipe(path, ['stages.moe_tune.trainable=["routers"]', 'lora.targets=["experts"]'])
    assert good.lora_for("moe_tune").targets == ("experts",)
    assert good.lora_for("instruct") is None  # lora.stages defaults to stage III only
    with pytest.raises(RecipeError) as info:
        load_recipe(
            path,
            [
                "lora.r=0",
                "lora.dropout=1.0",
                "lora.alpha=-2",
                'lora.targets=["experts", "routers", "mlp"]',
                'lora.stages=["moe_tune", "instruct", "stage4"]',
                "lora.quantize=nf4",
                "stages.moe_tune.zero_stage=3",
            ],
        )
    problems = info.value.problems
    text = "\n".join(problems)
    assert "lora.r: must be a positive integer, got 0" in text
    assert "lora.dropout: must be in [0, 1), got 1.0" in text
    assert "lora.alpha: must be > 0" in text
    assert "lora.targets: routers take no adapter" in text
    assert "lora.targets: unknown part(s) ['mlp']" in text
    assert "lora.stages: unknown stage(s) ['stage4']" in text
    # Across sections: stage III trains the whole FFN (the tiny recipe's trainable) while the
    # experts get adapters; the instruct stage has no experts; nf4 cannot train the FFN in full
    # nor be partitioned by ZeRO-3.
    assert "stages.moe_tune.trainable: ['experts'] are also lora.targets" in text
    assert "lora.targets: 'experts' in stage instruct" in text
    assert "stages.moe_tune.trainable: ['experts', 'ffn'] are stored in nf4" in text
    assert "lora.quantize: is 'nf4' but stages.moe_tune.zero_stage is 3" in text
    with pytest.raises(RecipeError, match="lacks 'routers'"):
        load_recipe(path, ['stages.moe_tune.trainable=["projector"]'] + ["lora.r=8"])


# Whole-VLM recipes: [model] base + the base's published config.json -------------------------

# The published bases' (the quickstart's tiny base is tested in tests/test_quickstart_parts.py).
WHOLE_VLM_RECIPES = [
    name
    for name in bundled_recipes()
    if load_recipe(ROOT / f"{name}.toml").model.base and not name.startswith("tiny/")
]


def test_whole_vlm_recipes_exist_for_the_published_bases():
    bases = {load_recipe(ROOT / f"{n}.toml").model.base for n in WHOLE_VLM_RECIPES}
    assert bases == {
        "qwen3_vl",
        "qwen2_5_vl",
        "internvl",
        "smolvlm",
        "gemma3",
        "llava_onevision",
    }


@pytest.mark.parametrize("name", WHOLE_VLM_RECIPES)
def test_whole_vlm_recipes_take_their_dims_from_the_published_config(name):
    import json

    from moetool.models.arch import published_dims

    path = ROOT / f"{name}.toml"
    recipe = load_recipe(path)
    model = recipe.model
    assert Path(model.config) == path.parent / "config.json"  # absolute, next to the recipe
    raw = json.loads(Path(model.config).read_text())
    assert raw["model_type"] == model.base
    text = raw.get("text_config", raw)  # Qwen2.5-VL was published flat
    for key, config_key in [
        ("hidden_size", "hidden_size"),
        ("num_layers", "num_hidden_layers"),
        ("ffn_hidden_size", "intermediate_size"),
    ]:
        assert getattr(model, key) == text[config_key], key
    assert {k: getattr(model, k) for k in published_dims(model.config, model.base)} == (
        published_dims(model.config, model.base)
    )
    assert model.ffn_linears == 3 and model.path  # the whole VLM checkpoint (hub id)
    assert list(recipe.stages.present()) == ["moe_tune"]
    assert (recipe.moe.num_experts, recipe.moe.top_k) == (4, 2)
    assert recipe.moe_layer_indices == tuple(range(0, model.num_layers, 2))
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


def test_gemma3_dims_come_from_the_config_class_defaults():
    # The published gemma-3-4b-it config leaves heads and vocabulary to Gemma3TextConfig.
    model = load_recipe(resolve_recipe("gemma3-4b/moe-4x-top2")).model
    assert (model.model_type, model.vocab_size, model.num_heads, model.num_kv_heads) == (
        "gemma3_text",
        262_208,
        8,
        4,
    )
    assert model.tie_embeddings


def test_whole_vlm_config_is_relative_to_the_file_that_sets_it(tmp_path, monkeypatch):
    bundled = ROOT / "llava-onevision-0.5b"
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "{bundled}/moe-4x-top2.toml"\nname = "child"\n')
    assert load_recipe(child).model.config == str(bundled / "config.json")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text((bundled / "config.json").read_text())
    child.write_text(
        f'extends = "{bundled}/moe-4x-top2.toml"\nname = "child"\n'
        '[model]\nconfig = "mine/config.json"\n'
    )
    assert load_recipe(child).model.config == str(tmp_path / "mine" / "config.json")
    monkeypatch.chdir(tmp_path / "mine")  # --set paths are relative to the working directory
    recipe = load_recipe(bundled / "moe-4x-top2.toml", ["model.config=config.json"])
    assert recipe.model.config == str(tmp_path / "mine" / "config.json")


def test_whole_vlm_recipe_reports_every_problem_at_once(tmp_path):
    (tmp_path / "gemma.json").write_text('{"model_type": "gemma3"}')
    path = tmp_path / "bad.toml"
    path.write_text(
        'name = "bad"\n'
        "[model]\n"
        'base = "qwen3_vl"\n'
        'config = "gemma.json"\n'
        "hidden_size = 64\n"
        "num_layers = 4\n"
        "[stages.pretrain]\n"
        'trainable = ["projector"]\n'
        'data = ["a.json"]\n'
        "lr = 1e-3\n"
        "global_batch_size = 8\n"
        "per_device_batch_size = 2\n"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "model.hidden_size",
        "model.num_layers",
        "model.config",
        "stages.pretrain",
    ], problems
    text = "\n".join(problems)
    assert "is read from model.config in a whole-VLM recipe" in text
    assert f"{tmp_path / 'gemma.json'} has model_type 'gemma3', not model.base 'qwen3_vl'" in text
    assert "stage I trains a new projector from scratch" in text

    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["model.base=qwen4_vl", "model.config=", "stages.pretrain.lr=1"])
    assert "model.base: unknown vision-language model_type 'qwen4_vl'; known: llava," in str(
        info.value
    )
    with pytest.raises(RecipeError, match="model.config: is empty: a whole-VLM recipe"):
        load_recipe(path, ["model.config="])
    with pytest.raises(RecipeError, match=r"model.config: no such file .*missing.json"):
        load_recipe(path, [f"model.config={tmp_path / 'missing.json'}"])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(RecipeError, match="broken.json is not a readable JSON config"):
        load_recipe(path, [f"model.config={tmp_path / 'broken.json'}"])


def test_a_resolved_whole_vlm_recipe_must_agree_with_its_config():
    from moetool.recipe import recipe_from_dict

    data = recipe_to_dict(load_recipe(resolve_recipe("qwen3-vl-2b/moe-4x-top2")))
    data["model"]["num_layers"] = 12
    with pytest.raises(RecipeError, match="model.num_layers: 12 differs from 28 in model.config"):
        recipe_from_dict(data)


def test_config_without_base_is_refused():
    with pytest.raises(RecipeError, match="model.config: is set but model.base is empty"):
        load_recipe(ROOT / "tiny/llama.toml", ["model.config=/x/config.json"])


@pytest.mark.parametrize(("base", "layers"), [("qwen3-1.7b", 28), ("qwen3-4b", 36)])
def test_qwen3_recipes_are_the_llava_layout_with_siglip_384(base, layers):
    dense = load_recipe(resolve_recipe(f"{base}/dense"))
    assert dense.model.model_type == "qwen3" and not dense.model.base
    assert dense.model.tie_embeddings and dense.model.extra["head_dim"] == 128
    assert dense.data.template == "chatml" and dense.stages.pretrain.template == "plain"
    assert dense.vision.type == "siglip" and dense.vision.image_tokens == 729
    assert dense.moe is None and list(dense.stages.present()) == ["pretrain", "instruct"]
    moe = load_recipe(resolve_recipe(f"{base}/moe-4x-top2"))
    assert list(moe.stages.present()) == ["pretrain", "instruct", "moe_tune"]
    assert moe.moe_layer_indices == tuple(range(0, layers, 2))
    every = load_recipe(resolve_recipe(f"{base}/moe-4x-top2-all"))
    assert every.moe_layer_indices == tuple(range(layers))
