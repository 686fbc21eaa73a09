"""model.attn_implementation: which backends can run where, the models each stage builds and
inference loads with it, and sdpa = eager (= flex) on dense and sparse models."""

import json

import pytest
import torch
from PIL import Image

import moetool  # noqa: F401  (registers the sparse model with the Auto classes)
from moetool.models.attention import (
    ATTN_IMPLEMENTATIONS,
    AttentionUnavailable,
    attention_problems,
    check_attn_implementation,
    checkpoint_attn_implementation,
)
from moetool.models.build import save_checkpoint
from moetool.models.families import known_families
from moetool.recipe import RecipeError, load_recipe
from moetool.recipe.paths import recipes_root
from moetool.tiny import build_random_lvlm

FAMILIES = ["llama", "qwen2", "phi"]


def tiny_recipe(family="llama", attention=None, *overrides):
    sets = [f'model.attn_implementation="{attention}"'] if attention else []
    return load_recipe(recipes_root() / f"tiny/{family}.toml", [*sets, *overrides])


def attention_of(model) -> dict[str, str]:
    """The implementation every part of a LLaVA model attends with (configs and sub-models)."""
    return {
        "config": model.config._attn_implementation,
        "text_config": model.config.text_config._attn_implementation,
        "vision_config": model.config.vision_config._attn_implementation,
        "vision_tower": model.model.vision_tower.config._attn_implementation,
        "language_model": model.model.language_model.config._attn_implementation,
    }


def uses(model, name: str) -> bool:
    return set(attention_of(model).values()) == {name}


# --- which backend can run where (pure) -----------------------------------------------------


def gpu(capability=(9, 0)):
    return lambda: capability


def no_gpu():
    return None


def installed(*modules):
    return lambda name: name in modules


def test_sdpa_and_eager_run_anywhere():
    for name in ("sdpa", "eager"):
        for device, dtype in (("cpu", "fp32"), ("cuda", "bf16"), ("cpu", "float32")):
            assert attention_problems(name, device, dtype, training=True) == []


def test_flash_attention_2_without_cuda_names_the_gpu_the_wheel_and_the_dtype():
    problems = attention_problems(
        "flash_attention_2", "cpu", "fp32", cuda_capability=no_gpu, has_module=installed()
    )
    assert problems == [
        "it needs a CUDA GPU (none is visible here)",
        "the flash_attn package is not installed (pip install flash-attn --no-build-isolation)",
        "it takes bf16 or fp16 only, not fp32 (use bf16)",
    ]


@pytest.mark.parametrize("name", ["flash_attention_2", "flash_attention_3"])
def test_flash_runs_on_a_cuda_gpu_with_its_package_in_half_precision(name):
    module = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}[name]
    machine = dict(cuda_capability=gpu(), has_module=installed(module))
    for dtype in ("bf16", "fp16", "bfloat16", "torch.float16"):
        assert attention_problems(name, "cuda", dtype, training=True, **machine) == []
        assert attention_problems(name, "cuda:1", dtype, **machine) == []
    # fp32 is refused, naming the setting that chose it.
    key = "stages.instruct.precision"
    (problem,) = attention_problems(name, "cuda", "fp32", True, key, **machine)
    assert problem == "it takes bf16 or fp16 only, not fp32 (set stages.instruct.precision to bf16)"
    # A GPU is there but the model would run on the CPU; an older GPU.
    (problem,) = attention_problems(name, "cpu", "bf16", **machine)
    assert "not on cpu" in problem and "--device cuda" in problem
    machine["cuda_capability"] = gpu((7, 5))
    (problem,) = attention_problems(name, "cuda", "bf16", **machine)
    assert "Ampere" in problem and "7.5" in problem


def test_flash_attention_3_needs_the_hopper_build_not_flash_attn():
    machine = dict(cuda_capability=gpu(), has_module=installed("flash_attn"))
    (problem,) = attention_problems("flash_attention_3", "cuda", "bf16", **machine)
    assert "flash_attn_interface" in problem and "hopper" in problem


def test_flex_attention_needs_torch_flex_and_cannot_train_on_the_cpu():
    with_flex = installed("torch.nn.attention.flex_attention")
    assert attention_problems("flex_attention", "cpu", "fp32", has_module=with_flex) == []
    assert attention_problems("flex_attention", "cuda", "bf16", True, has_module=with_flex) == []
    (problem,) = attention_problems("flex_attention", "cpu", "fp32", True, has_module=with_flex)
    assert "no backward pass on the CPU" in problem
    (problem,) = attention_problems("flex_attention", "cuda", "bf16", has_module=installed())
    assert problem.startswith(f"torch {torch.__version__} has no flex_attention")


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(AttentionUnavailable) as err:
        check_attn_implementation("flash", "cpu", "fp32")
    known = ", ".join(ATTN_IMPLEMENTATIONS)
    assert str(err.value) == f"unknown attention implementation 'flash'; known: {known}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks this machine's lack of a GPU")
def test_this_machine_refuses_flash_attention_2_in_one_line():
    with pytest.raises(AttentionUnavailable) as err:
        check_attn_implementation("flash_attention_2", "cpu", "bf16")
    message = str(err.value)
    assert message.startswith("attention 'flash_attention_2' cannot run here: ")
    assert "it needs a CUDA GPU" in message and "\n" not in message


@pytest.mark.parametrize("model_type", known_families())
def test_family_refusals_are_those_of_the_transformers_model(model_type):
    """The families' ``attn_unsupported`` say what transformers' own flags say."""
    from transformers import AutoConfig, AutoModel

    from moetool.models.attention import family_problems

    cls = AutoModel._model_mapping[type(AutoConfig.for_model(model_type))]
    flags = {
        "sdpa": cls._supports_sdpa,
        "eager": True,
        "flash_attention_2": cls._supports_flash_attn,
        "flash_attention_3": cls._supports_flash_attn,
        "flex_attention": cls._supports_flex_attn,
    }
    for name, supported in flags.items():
        assert (family_problems(name, model_type) == []) == bool(supported), name


def test_a_gemma2_recipe_cannot_ask_for_sdpa():
    assert tiny_recipe("gemma2").model.attn_implementation == "eager"
    with pytest.raises(RecipeError) as err:
        tiny_recipe("gemma2", "sdpa")
    (problem,) = err.value.problems
    assert problem == (
        "model.attn_implementation: transformers' gemma2 has no sdpa attention; use eager, "
        "flash_attention_2, flash_attention_3, flex_attention"
    )


def test_recipe_validation_lists_the_valid_names():
    assert tiny_recipe().model.attn_implementation == "sdpa"  # the default
    assert tiny_recipe("llama", "eager").model.attn_implementation == "eager"
    with pytest.raises(RecipeError) as err:
        tiny_recipe("llama", "flash")
    (problem,) = err.value.problems
    assert problem.startswith("model.attn_implementation: expected one of ")
    assert all(repr(name) in problem for name in ATTN_IMPLEMENTATIONS)


# --- what a checkpoint records --------------------------------------------------------------


def test_checkpoint_attention_is_the_recorded_one_else_the_recipe_snapshot_else_none():
    # None: transformers' default (sdpa where the model has it, else eager).
    assert checkpoint_attn_implementation({}) is None  # not written by moetool
    assert checkpoint_attn_implementation({"moetool": {"stage": "upcycled"}}) is None
    snapshot = {"recipe": {"model": {"attn_implementation": "eager"}}}
    assert checkpoint_attn_implementation({"moetool": snapshot}) == "eager"
    recorded = {**snapshot, "attn_implementation": "flex_attention"}
    assert checkpoint_attn_implementation({"moetool": recorded}) == "flex_attention"


# --- the models each stage builds -----------------------------------------------------------


def test_every_stage_builds_its_model_with_the_recipe_attention(tmp_path):
    from moetool.train.start import load_start_model

    recipe = tiny_recipe("qwen2", "eager")
    model, processor = load_start_model(recipe, "pretrain", None, tmp_path / "pretrain-state")
    assert uses(model, "eager"), attention_of(model)
    save_checkpoint(model, processor, tmp_path / "pretrain")
    # Stage II from a checkpoint; stage III upcycles that dense checkpoint on the fly.
    for stage in ("instruct", "moe_tune"):
        model, _ = load_start_model(recipe, stage, tmp_path / "pretrain", tmp_path / stage)
        assert uses(model, "eager"), (stage, attention_of(model))
    assert type(model).__name__ == "MoELlavaForConditionalGeneration"
    # The default, and a checkpoint loaded with another implementation than it was built with.
    default = tiny_recipe("qwen2")
    model, _ = load_start_model(default, "instruct", tmp_path / "pretrain", tmp_path / "d")
    assert uses(model, "sdpa"), attention_of(model)


def test_a_real_run_builds_both_parts_with_the_recipe_attention(tmp_path):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from moetool.models.build import build_lvlm_from_parts
    from moetool.tiny import build_tokenizer

    reference, _ = build_random_lvlm(tiny_recipe(), seed=5)
    LlamaForCausalLM(reference.config.text_config).save_pretrained(tmp_path / "llm")
    build_tokenizer(512, "llama3").save_pretrained(tmp_path / "llm")
    CLIPVisionModel(reference.config.vision_config).save_pretrained(tmp_path / "clip")
    paths = [f'model.path="{tmp_path / "llm"}"', f'vision.path="{tmp_path / "clip"}"']
    recipe = tiny_recipe("llama", "eager", *paths)
    model, _ = build_lvlm_from_parts(recipe.model, recipe.vision)
    assert uses(model, "eager"), attention_of(model)


def test_stage_start_refuses_a_backend_that_cannot_train_here():
    from moetool.train.engine import TrainingError
    from moetool.train.start import check_stage_attention

    check_stage_attention(tiny_recipe("llama", "eager"), "instruct")
    with pytest.raises(TrainingError) as err:
        check_stage_attention(tiny_recipe("llama", "flash_attention_2"), "instruct")
    message = str(err.value)
    assert message.startswith("model.attn_implementation: attention 'flash_attention_2' cannot")
    # The tiny recipe trains in fp32: named with its key.
    assert "not fp32 (set stages.instruct.precision to bf16)" in message
    if not torch.cuda.is_available():
        assert "it needs a CUDA GPU" in message
        with pytest.raises(TrainingError, match="no backward pass on the CPU"):
            check_stage_attention(tiny_recipe("llama", "flex_attention"), "pretrain")


# --- sdpa and eager compute the same loss and gradients -------------------------------------


def training_batch(processor, config):
    """Two samples with images, right-padded as the training collate pads, labels masked."""
    processor.tokenizer.padding_side = "right"
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (30, 30), (10, 200, 10))]
    texts = ["<image>\nWhat colour is the shape in the picture?", "<image>\nRed."]
    batch = dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    assert (batch["attention_mask"] == 0).any()  # padding is in the batch
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[labels == config.image_token_id] = -100
    return {**batch, "labels": labels}


def loss_and_gradients(model, batch):
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same_loss_and_gradients(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_and_eager_give_the_same_loss_and_gradients_dense(family):
    results = {}
    for name in ("sdpa", "eager"):
        model, processor = build_random_lvlm(tiny_recipe(family, name), seed=3)
        assert uses(model, name), attention_of(model)
        results[name] = loss_and_gradients(model, training_batch(processor, model.config))
    # Both towers and every LM layer have gradients: the comparison covers both attentions.
    grads = results["sdpa"][1]
    assert any("vision_tower" in n and "self_attn" in n for n in grads)
    assert any("language_model" in n and "self_attn" in n for n in grads)
    assert_same_loss_and_gradients(results["sdpa"], results["eager"])


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_and_eager_give_the_same_loss_and_gradients_sparse(family, tmp_path):
    from moetool.train.start import load_start_model

    model, processor = build_random_lvlm(tiny_recipe(family), seed=3)
    save_checkpoint(model, processor, tmp_path / "dense")
    results = {}
    for name in ("sdpa", "eager"):
        recipe = tiny_recipe(family, name, "moe.router_std=1.0")
        sparse, _ = load_start_model(recipe, "moe_tune", tmp_path / "dense", tmp_path / name)
        assert type(sparse).__name__ == "MoELlavaForConditionalGeneration"
        assert uses(sparse, name), attention_of(sparse)
        results[name] = loss_and_gradients(sparse, training_batch(processor, sparse.config))
    assert any(".mlp.router." in n for n in results["sdpa"][1])
    assert_same_loss_and_gradients(results["sdpa"], results["eager"])


# --- flex_attention on the CPU --------------------------------------------------------------


@pytest.mark.integration  # torch compiles flex_attention on first use: ~80 s on 2 busy cores
def test_flex_attention_forward_equals_sdpa_on_the_cpu_and_has_no_cpu_backward():
    outputs = {}
    for name in ("sdpa", "flex_attention"):
        model, processor = build_random_lvlm(tiny_recipe("llama", name), seed=3)
        assert uses(model, name), attention_of(model)
        batch = training_batch(processor, model.config)
        with torch.no_grad():
            outputs[name] = model(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(outputs["flex_attention"][mask], outputs["sdpa"][mask])
    # Why training with it is refused on the CPU (attention_problems): when torch adds a CPU
    # backward this fails, and the refusal can go.
    with pytest.raises(NotImplementedError, match="does not support backward on CPU"):
        model(**batch).loss.backward()


# --- inference uses what the checkpoint recorded --------------------------------------------


def recorded_checkpoint(path, attention):
    model, processor = build_random_lvlm(tiny_recipe("qwen2"), seed=1)
    save_checkpoint(model, processor, path, metadata={"attn_implementation": attention})
    return path


def test_load_checkpoint_uses_the_recorded_attention_unless_overridden(tmp_path):
    from moetool.models.inference import load_checkpoint

    path = recorded_checkpoint(tmp_path / "ckpt", "eager")
    assert json.loads((path / "config.json").read_text())["moetool"]["attn_implementation"]
    model, _ = load_checkpoint(path)
    assert uses(model, "eager"), attention_of(model)
    model, _ = load_checkpoint(path, attn_implementation="sdpa")
    assert uses(model, "sdpa"), attention_of(model)


def test_the_lmms_eval_model_uses_the_recorded_attention(tmp_path):
    from moetool.eval.lmms_model import MoeTool

    path = recorded_checkpoint(tmp_path / "ckpt", "eager")
    assert uses(MoeTool(pretrained=str(path)).model, "eager")
    assert uses(MoeTool(pretrained=str(path), attn_implementation="sdpa").model, "sdpa")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks this machine's lack of a GPU")
def test_inference_refuses_a_recorded_flash_checkpoint_before_loading_it(tmp_path):
    from moetool.eval.runner import EvalError, run_eval
    from moetool.predict import PredictError, predict
    from moetool.routing.capture import capture_to_dir

    path = tmp_path / "ckpt"
    path.mkdir()  # a config alone: a refusal must come before anything is loaded
    config = {"moetool": {"attn_implementation": "flash_attention_2"}}
    (path / "config.json").write_text(json.dumps(config))
    trained_with = f"{path} was trained with attn_implementation 'flash_attention_2': "
    with pytest.raises(PredictError) as err:
        predict(path, "What colour?")
    assert str(err.value).startswith(trained_with)
    assert "it needs a CUDA GPU" in str(err.value)
    assert str(err.value).endswith(
        "pass --attn-implementation sdpa (or eager) to run it with another"
    )
    with pytest.raises(PredictError, match="--attn-implementation flash_attention_3: "):
        predict(path, "What colour?", attn_implementation="flash_attention_3")
    gemma2 = tmp_path / "gemma2"
    gemma2.mkdir()
    (gemma2 / "config.json").write_text(json.dumps({"text_config": {"model_type": "gemma2"}}))
    with pytest.raises(PredictError, match="--attn-implementation sdpa: .* gemma2 has no sdpa"):
        predict(gemma2, "What colour?", attn_implementation="sdpa")
    with pytest.raises(AttentionUnavailable, match=trained_with):
        capture_to_dir(path, [tmp_path / "data.json"], tmp_path / "out")
    with pytest.raises(EvalError) as err:  # before the data is read (there is none)
        run_eval("pope", path, tmp_path / "no-data", tmp_path / "results", dtype="bf16")
    assert str(err.value).startswith(trained_with)
    assert "it needs a CUDA GPU" in str(err.value) and "bf16" not in str(err.value)
    with pytest.raises(EvalError, match=r"not float32 \(set --dtype to bf16\)"):
        run_eval("pope", path, tmp_path / "no-data", tmp_path / "results")
