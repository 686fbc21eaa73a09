"""A whole VLM's training samples, encoded by its own processor and chat template: labels on the
assistant turns only (checked per base against masks worked out by hand), the tokens the base
itself makes at inference, and batches as its processor batches them."""

import functools
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from moetool.data.chat import (
    ChatPreprocessor,
    ChatTemplateError,
    assistant_spans,
    collate_features,
    sample_messages,
)
from moetool.data.llava_json import DataError, Sample, load_llava_json
from moetool.data.preprocess import IGNORE_INDEX
from moetool.tiny_vlm import BASES, build_random_vlm

TURNS = (
    ("human", "<image>\nWhat colour?"),
    ("gpt", "Red."),
    ("human", "And the shape?"),
    ("gpt", "A box."),
)
VICUNA = ("ASSISTANT:", " Red.</s>", " A box.</s>")
CHATML = ("<|im_start|>assistant\n", "Red.<|im_end|>", "A box.<|im_end|>")
IDEFICS = ("Assistant:", " Red.<end_of_utterance>", " A box.<end_of_utterance>")
# Per base, by hand from its chat template: the text that opens the assistant's turn, and the
# two trained runs (the answer and its end-of-turn token; the layout after it is not trained).
MASKS = {
    "llava": VICUNA,
    "llava_next": VICUNA,
    "llava_onevision": CHATML,
    "qwen2_vl": CHATML,
    "qwen2_5_vl": CHATML,
    "qwen3_vl": CHATML,
    "internvl": CHATML,
    "idefics3": IDEFICS,
    "smolvlm": IDEFICS,
    "gemma3": ("<start_of_turn>model\n", "Red.<end_of_turn>", "A box.<end_of_turn>"),
    "mistral3": ("[/INST]", "Red.</s>", "A box.</s>"),
}


@functools.cache
def processor_of(base):
    return build_random_vlm(base, num_layers=1)[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for name, size, colour in (("wide", (48, 24), "red"), ("tall", (20, 40), "blue")):
        Image.new("RGB", size, colour).save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    return paths


def runs(labels):
    """Indices of each maximal run of trained labels."""
    out, current = [], []
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            out, current = [*out, current], []
    return out + ([current] if current else [])


def test_sample_messages_turn_placeholders_into_image_parts():
    messages = sample_messages(
        [("human", "<image>\nLeft\n<image>\nRight?"), ("gpt", "Same."), ("human", "Q"), ("gpt", "")]
    )
    assert messages[0] == {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "text", "text": "Left"},
            {"type": "image"},
            {"type": "text", "text": "Right?"},
        ],
    }
    assert messages[1:] == [
        {"role": "assistant", "content": "Same."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize("base", BASES)
def test_labels_are_the_assistant_turns_worked_out_by_hand(base, images):
    processor = processor_of(base)
    tokenizer = processor.tokenizer
    encoded = ChatPreprocessor(processor, 4096).encode(Sample("s", "f.json", (images[0],), TURNS))
    ids, labels = encoded["input_ids"].tolist(), encoded["labels"].tolist()
    opener, *answers = MASKS[base]
    found = runs(labels)
    assert [tokenizer.decode([ids[i] for i in run]) for run in found] == answers
    for run in found:
        assert all(labels[i] == ids[i] for i in run)
        before = tokenizer.decode(ids[: run[0]])
        assert before.endswith(opener), (base, before[-30:])
    # The tokens are the base's own: its processor on its chat template, as at inference.
    messages = sample_messages(TURNS)
    messages[0]["content"][0] = {"type": "image", "image": Image.open(images[0])}
    reference = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert ids == reference["input_ids"][0].tolist()
    for key, value in reference.items():
        if key not in ("input_ids", "attention_mask"):
            assert torch.equal(encoded[key].reshape(value.shape), value), (base, key)


@pytest.mark.parametrize("base", BASES)
def test_a_batch_is_the_processors_own_batch(base, images):
    """Two samples with images of other sizes and a text-only one, collated: the tokens and
    every image feature as the base's processor batches the same conversations itself."""
    processor = processor_of(base)
    pre = ChatPreprocessor(processor, 4096)
    samples = [
        Sample("a", "f.json", (images[0],), TURNS[:2]),
        Sample("b", "f.json", (images[1],), TURNS),
        Sample("t", "f.json", (), (("human", "Hi"), ("gpt", "Hello."))),
    ]
    batch = collate_features([pre.encode(s) for s in samples], processor.tokenizer.pad_token_id)
    texts = [assistant_spans(processor, sample_messages(s.turns))[0] for s in samples]
    pictures = [[Image.open(p).convert("RGB") for p in s.images] for s in samples]
    reference = processor(
        text=texts[:2],
        images=pictures[:2],
        padding=True,
        padding_side="right",
        add_special_tokens=False,
        return_tensors="pt",
    )
    length = reference["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][:2, :length], reference["input_ids"])
    assert torch.equal(batch["attention_mask"][:2, :length], reference["attention_mask"])
    assert batch["attention_mask"][2].sum() < batch["input_ids"].shape[1]  # padded on the right
    for key, value in reference.items():
        if key not in ("input_ids", "attention_mask"):
            ours = (
                batch[key][:, :length]
                if value.dim() == 2 and key.endswith("type_ids")
                else batch[key]
            )
            assert torch.equal(ours[: len(value)], value), (base, key)
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == [
        (pre.encode(s)["labels"] != IGNORE_INDEX).sum().item() for s in samples
    ]


def test_a_cut_into_image_tokens_or_a_fully_masked_sample_is_a_data_error(images):
    processor = processor_of("qwen3_vl")
    sample = Sample("s", "f.json", (images[0],), TURNS)
    full = len(ChatPreprocessor(processor, 4096).encode(sample)["input_ids"])
    kept = ChatPreprocessor(processor, full - 3).encode(sample)  # the last answer is cut short
    assert len(kept["input_ids"]) == full - 3 and (kept["labels"] != IGNORE_INDEX).any()
    with pytest.raises(DataError, match="f.json, sample 's': max_length 8 cuts into the image"):
        ChatPreprocessor(processor, 8).encode(sample)
    text = Sample("t", "f.json", (), (("human", "A long question " * 20), ("gpt", "Yes.")))
    with pytest.raises(DataError, match="sample 't': every label is masked"):
        ChatPreprocessor(processor, 16).encode(text)
    unreadable = images[0].parent / "broken.png"
    unreadable.write_bytes(b"not a png")
    with pytest.raises(DataError, match="sample 'u': image .*broken.png is unreadable"):
        ChatPreprocessor(processor, 4096).encode(Sample("u", "f.json", (unreadable,), TURNS))


def test_a_template_that_rewrites_earlier_turns_is_refused():
    """A template that renders an assistant turn otherwise once later turns follow (as some
    "thinking" templates drop earlier reasoning) cannot be trained on: named, not guessed."""
    processor = build_random_vlm("qwen3_vl", num_layers=1)[1]
    processor.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier){% else %}"
        "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    turns = [("human", "Q"), ("gpt", "A."), ("human", "Q2"), ("gpt", "B.")]
    with pytest.raises(ChatTemplateError, match="assistant turn 1 .*differently"):
        assistant_spans(processor, sample_messages(turns))


def test_messages_form_reads_as_the_llava_form(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    llava = {
        "id": "l",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nColour?"},
            {"from": "gpt", "value": "Red."},
        ],
    }
    messages = {
        "id": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "a.png"},
                    {"type": "text", "text": "Colour?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        ],
    }
    (tmp_path / "d.json").write_text(json.dumps([llava, messages]))
    (a, b), _ = load_llava_json([tmp_path / "d.json"], tmp_path)
    assert (a.images, a.turns) == (b.images, b.turns) == ((Path(tmp_path / "a.png"),), a.turns)
    bad = dict(messages, messages=[{"role": "system", "content": "Be brief."}])
    (tmp_path / "bad.json").write_text(json.dumps([bad]))
    with pytest.raises(DataError, match="bad.json, sample 'm': message 0 has role 'system'"):
        load_llava_json([tmp_path / "bad.json"], tmp_path)


@pytest.mark.parametrize("base", BASES)
def test_inference_asks_with_the_tokens_training_trained_on(base, images):
    """The prompt ``predict`` and ``eval`` give a base (moetool.models.inference) is the start of
    what training encodes for the same question: the same template, image tokens and special
    tokens (no second BOS), and the base's own ``apply_chat_template`` agrees."""
    from moetool.models.inference import prompt_inputs

    processor = processor_of(base)
    picture = Image.open(images[1])
    asked = prompt_inputs(processor, ["Colour?"], [[picture]], base)["input_ids"][0].tolist()
    turns = (("human", "<image>\nColour?"), ("gpt", "Blue."))
    trained = ChatPreprocessor(processor, 4096).encode(Sample("s", "f.json", (images[1],), turns))
    first_label = next(i for i, x in enumerate(trained["labels"].tolist()) if x != IGNORE_INDEX)
    assert asked == trained["input_ids"][:first_label].tolist()
    own = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": picture},
                    {"type": "text", "text": "Colour?"},
                ],
            }
        ],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert asked == list(own["input_ids"][0])
