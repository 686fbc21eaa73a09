"""Upcycling the dense VLMs people start from (every base of ``models.bases``): the sparse model
gives the dense model's logits (fp32, 1e-4) on images of several sizes, loads through the Auto
classes as the base's sparse class, and its parts are found by the base's entry."""

import pytest
import torch
from PIL import Image

import moetool  # noqa: F401  (registers the sparse model types)
from moetool.models.bases import get_base, known_bases
from moetool.models.build import save_checkpoint
from moetool.models.moe import MoEConfig
from moetool.models.parts import parameter_parts
from moetool.tiny_vlm import build_random_vlm, vlm_inputs
from moetool.upcycle import UpcycleError, upcycle_checkpoint


def images(seed: int = 0) -> list[Image.Image]:
    """Two images of different sizes and aspect ratios (tiling and dynamic resolution see them
    differently)."""
    g = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray((torch.rand(40, 70, 3, generator=g) * 255).to(torch.uint8).numpy()),
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()),
    ]


@pytest.fixture(scope="module")
def dense_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for base in known_bases():
        model, processor = build_random_vlm(base, seed=2)
        save_checkpoint(model, processor, root / base)
        out[base] = root / base
    return out


@pytest.fixture(scope="module")
def sparse_bases(dense_bases, tmp_path_factory):
    """Each base upcycled once (routers drawn wide: tokens spread over the experts)."""
    root = tmp_path_factory.mktemp("sparse")
    for base, src in dense_bases.items():
        upcycle_checkpoint(src, root / base, MoEConfig(router_std=1.0))
    return {base: root / base for base in dense_bases}


@pytest.mark.parametrize("base", known_bases())
def test_upcycled_base_is_exact_and_loads_as_its_sparse_class(base, dense_bases, sparse_bases):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dense = AutoModelForImageTextToText.from_pretrained(dense_bases[base]).eval()
    sparse = AutoModelForImageTextToText.from_pretrained(sparse_bases[base]).eval()
    assert sparse.config.model_type == get_base(base).sparse_model_type
    assert type(sparse).__name__ == "MoE" + type(dense).__name__
    assert sparse.moe_layer_indices() == [0, 2]
    processor = AutoProcessor.from_pretrained(sparse_bases[base])
    batch = vlm_inputs(processor, images(), ["What is here?", "Count the shapes."])
    with torch.no_grad():
        expected = dense(**batch).logits
        out = sparse(**batch, output_router_logits=True)
    assert (out.logits - expected).abs().max() <= 1e-4
    # The routers see every token (images included) and route them somewhere non-trivially.
    assert len(out.router_logits) == 2
    assert out.router_logits[0].shape[0] == batch["input_ids"].numel()
    assert out.router_logits[0].argmax(-1).unique().numel() > 1


@pytest.mark.parametrize("base", known_bases())
def test_parts_of_every_base_are_found_by_its_entry(base, sparse_bases):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(sparse_bases[base])
    parts = parameter_parts(model)
    found = set(parts.values())
    assert {"vision", "projector", "embeddings", "attention", "ffn", "experts", "routers"} <= found
    entry = get_base(base)
    vision = f"model.{entry.vision}."
    connector = tuple(f"model.{c}" for c in entry.connector)
    for name, part in parts.items():
        if name.startswith(connector):
            assert part == "projector", name
        elif name.startswith(vision):
            assert part == "vision", name
        elif ".mlp.router." in name:
            assert part == "routers", name
        elif ".mlp.experts." in name:
            assert part == "experts", name


def test_an_unknown_vlm_is_refused_naming_the_known_bases(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "paligemma", "text_config": {}}')
    with pytest.raises(UpcycleError, match="unknown vision-language model_type 'paligemma'"):
        upcycle_checkpoint(tmp_path, tmp_path / "out", MoEConfig())


@pytest.mark.parametrize("base", known_bases())
def test_predict_on_a_sparse_base_answers_as_its_dense_model(base, dense_bases, sparse_bases):
    """Greedy generation through moetool's inference path (the base's chat template with an
    image part, its processor, its generate inputs: image_grid_thw, pixel_attention_mask,
    image_sizes, …, the KV cache) gives the dense model's answer from the upcycled one (some
    random tiny models answer in special tokens only: an empty text, the same for both)."""
    from moetool.models.inference import answer, load_checkpoint

    picture = images(1)[:1]
    answers = []
    for path in (dense_bases[base], sparse_bases[base]):
        model, processor = load_checkpoint(path)
        answers.append(
            answer(
                model,
                processor,
                ["What is here?"],
                [picture],
                max_new_tokens=6,
                generate_kwargs={"min_new_tokens": 6},
            )  # fmt: skip
        )
    assert answers[0] == answers[1]


@pytest.mark.parametrize("base", known_bases())
def test_param_count_of_a_sparse_base_config_counts_its_model(base, dense_bases, sparse_bases):
    """``param-count --config`` on the upcycled checkpoint's config: the language model's total
    is the sparse model's own parameter count (vision encoder and connector apart, as the
    paper counts); the same as the dense config with the same plan."""
    from transformers import AutoModelForImageTextToText

    from moetool.params import count_config

    report = count_config(sparse_bases[base] / "config.json")
    model = AutoModelForImageTextToText.from_pretrained(sparse_bases[base])
    parts = parameter_parts(model)
    named = dict(model.named_parameters())
    lm = sum(named[n].numel() for n, part in parts.items() if part not in ("vision", "projector"))
    assert report.exact_total == lm
    assert report.vision_params == sum(
        named[n].numel() for n, part in parts.items() if part == "vision"
    )
    planned = count_config(dense_bases[base] / "config.json", num_experts=4, top_k=2)
    assert (planned.exact_total, planned.exact_activated) == (
        report.exact_total,
        report.exact_activated,
    )
    assert report.exact_activated < report.exact_total


@pytest.mark.parametrize("base", known_bases())
def test_routing_capture_marks_each_base_image_tokens(base, sparse_bases):
    """Routing capture on an upcycled base, asked as the evaluation asks (the base's chat
    template and processor): every token routed top-2 in every MoE layer, the image tokens
    (the base's image token id, as many as its processor expanded) marked as such."""
    from moetool.models.inference import build_prompt, load_checkpoint
    from moetool.routing.capture import capture_routing

    model, processor = load_checkpoint(sparse_bases[base])
    prompt = build_prompt(processor, "What is here?", 1, model.config.model_type)
    batch = dict(processor(images=images(2)[:1], text=[prompt], return_tensors="pt"))
    records = capture_routing(model, [batch]).records
    image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens > 0
    for layer in (0, 2):
        rows = records[records.layer == layer]
        assert len(rows) == 2 * batch["input_ids"].numel()
        assert (rows.modality == "image").sum() == 2 * image_tokens


@pytest.mark.parametrize("base", known_bases())
def test_stage_three_on_each_base_learns_from_its_own_chat_encoding(base, sparse_bases, tmp_path):
    """The stage III step on every base, without DeepSpeed (the DeepSpeed runs are the
    integration tests): samples encoded by the base's processor and chat template, batched as
    its processor batches, only the FFNs and routers trained; the loss (LM + balancing) falls
    and the balancing loss is part of it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from moetool.data.chat import ChatPreprocessor, collate_features
    from moetool.data.llava_json import Sample
    from moetool.models.parts import set_trainable

    model = AutoModelForImageTextToText.from_pretrained(sparse_bases[base]).train()
    processor = AutoProcessor.from_pretrained(sparse_bases[base])
    paths = []
    for i, picture in enumerate(images(3)):
        paths.append(tmp_path / f"{i}.png")
        picture.save(paths[-1])
    samples = [
        Sample(str(i), "f.json", (path,), (("human", "<image>\nWhat is it?"), ("gpt", answer)))
        for i, (path, answer) in enumerate(zip(paths, ("A red box.", "Noise."), strict=True))
    ]
    pre = ChatPreprocessor(processor, 1024)
    batch = collate_features([pre.encode(s) for s in samples], processor.tokenizer.pad_token_id)
    trained = set_trainable(model, ["ffn", "routers"])
    assert trained and all(".mlp." in name for name in trained)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(4):
        out = model(**batch)
        assert out.aux_loss is not None and out.aux_loss > 0
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("base", [b for b in known_bases() if b != "llava"])
def test_routing_capture_over_llava_json_encodes_as_training_does(base, sparse_bases, tmp_path):
    """Routing capture over LLaVA-JSON samples on a whole VLM: each sample encoded by the base's
    own processor and chat template, as training encodes it (answers included), every token of
    it routed top-2 in every MoE layer, its image tokens marked."""
    import json

    from moetool.data.chat import ChatPreprocessor
    from moetool.data.llava_json import load_llava_json
    from moetool.models.inference import load_checkpoint
    from moetool.routing.capture import capture_from_llava_json

    for i, image in enumerate(images(3)):
        image.save(tmp_path / f"{i}.png")
    samples = [
        {
            "id": f"s{i}",
            "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is here?"},
                {"from": "gpt", "value": "Shapes." if i else "A red circle and a blue square."},
            ],
        }
        for i in range(2)
    ]
    (tmp_path / "samples.json").write_text(json.dumps(samples))
    records = capture_from_llava_json(
        sparse_bases[base], [tmp_path / "samples.json"], tmp_path, batch_size=2
    ).records
    model, processor = load_checkpoint(sparse_bases[base])
    parsed, _ = load_llava_json([tmp_path / "samples.json"], tmp_path)
    encoded = [ChatPreprocessor(processor, 2048).encode(s) for s in parsed]
    tokens = sum(len(e["input_ids"]) for e in encoded)
    image_token = model.config.image_token_id
    image_tokens = sum(int((e["input_ids"] == image_token).sum()) for e in encoded)
    assert image_tokens > 0
    for layer in (0, 2):
        rows = records[records.layer == layer]
        assert len(rows) == 2 * tokens  # no padding token is routed
        assert (rows.modality == "image").sum() == 2 * image_tokens
        assert set(rows["sample"]) == {0, 1}
