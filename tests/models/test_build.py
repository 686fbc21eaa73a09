import pytest
import torch

from moetool.models.build import build_lvlm_from_parts, lvlm_config, save_checkpoint
from moetool.recipe import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.tiny import build_random_lvlm, build_tokenizer


def test_random_lvlm_processor_expands_image_tokens(tmp_path):
    from PIL import Image

    recipe = load_recipe(recipes_root() / "tiny/llama.toml")
    model, processor = build_random_lvlm(recipe)
    image = Image.new("RGB", (48, 40), (200, 10, 10))
    batch = processor(images=[image], text=["<image>\nWhat colour?"], return_tensors="pt")
    image_id = model.config.image_token_id
    assert (batch["input_ids"] == image_id).sum().item() == recipe.vision.image_tokens == 16
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[-1] == recipe.model.vocab_size
    save_checkpoint(model, processor, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_checkpoint(model, processor, tmp_path / "ckpt")


def test_siglip_tower_has_no_cls_token():
    recipe = load_recipe(recipes_root() / "phi2-2.7b/moe-4x-top2-384.toml")
    config = lvlm_config(recipe.model, recipe.vision)
    assert config.vision_config.model_type == "siglip_vision_model"
    assert config.vision_feature_select_strategy == "full"
    assert config.image_seq_length == 729


def test_build_from_local_parts(tmp_path):
    from transformers import CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

    recipe = load_recipe(recipes_root() / "tiny/llama.toml")
    reference, _ = build_random_lvlm(recipe, seed=5)
    llm = LlamaForCausalLM(reference.config.text_config)
    llm.save_pretrained(tmp_path / "llm")
    tok = build_tokenizer(512, "llama3")
    tok.save_pretrained(tmp_path / "llm")
    tower = CLIPVisionModel(reference.config.vision_config)
    tower.save_pretrained(tmp_path / "clip")
    with pytest.raises(FileNotFoundError, match="model.path"):
        build_lvlm_from_parts(recipe.model, recipe.vision)
    recipe = load_recipe(
        recipes_root() / "tiny/llama.toml",
        [f'model.path="{tmp_path / "llm"}"', f'vision.path="{tmp_path / "clip"}"'],
    )
    model, processor = build_lvlm_from_parts(recipe.model, recipe.vision)
    torch.testing.assert_close(
        model.model.language_model.layers[1].mlp.up_proj.weight,
        llm.model.layers[1].mlp.up_proj.weight,
    )
    torch.testing.assert_close(
        model.model.vision_tower.encoder.layers[0].mlp.fc1.weight,
        tower.encoder.layers[0].mlp.fc1.weight,
    )
    assert model.model.multi_modal_projector.linear_1.weight.device.type == "cpu"
    # Upstream assumption named: the new projector (built on the meta device, then given empty
    # memory) is initialised by transformers' _init_weights; were that a no-op, stage I would
    # start from whatever the memory held.
    std = model.config.text_config.initializer_range
    for linear in (
        model.model.multi_modal_projector.linear_1,
        model.model.multi_modal_projector.linear_2,
    ):
        assert torch.isfinite(linear.weight).all()
        assert 0.7 * std < linear.weight.std().item() < 1.3 * std
        assert linear.bias is None or torch.equal(linear.bias, torch.zeros_like(linear.bias))
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    save_checkpoint(model, processor, tmp_path / "stage0")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "stage0")
    ids = torch.randint(20, 500, (1, 24))
    ids[0, 1:17] = model.config.image_token_id
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=ids, pixel_values=pixels).logits,
            model.eval()(input_ids=ids, pixel_values=pixels).logits,
        )
