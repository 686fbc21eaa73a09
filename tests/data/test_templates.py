import jinja2
import pytest

from moetool.data.templates import TEMPLATES, TemplateError, conversation_turns, get_template

TURNS = [
    ("human", "<image>\nWhat colour is the circle?"),
    ("gpt", "Red."),
    ("human", "And the square?"),
    ("gpt", "Blue."),
]


def test_official_two_style_format():
    text, spans = get_template("phi").render(TURNS)
    assert text == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
        "What colour is the circle? ASSISTANT: Red.<|endoftext|>USER: And the square? "
        "ASSISTANT: Blue.<|endoftext|>"
    )
    assert [text[a:b] for a, b in spans] == ["Red.<|endoftext|>", "Blue.<|endoftext|>"]
    assert get_template("openchat").render(TURNS)[0].endswith("Blue.<|end_of_turn|>")
    assert get_template("mistral").render(TURNS)[0].endswith("Blue.</s>")


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_a_leading_gpt_turn_is_dropped(name):
    """As the official code: a conversation opened by the assistant renders as the rest."""
    template = get_template(name)
    opened = [("gpt", "Hi, ask me anything."), *TURNS]
    assert template.render(opened) == template.render(TURNS)
    assert conversation_turns(opened) == TURNS


def test_plain_template_trains_on_the_caption_only():
    text, spans = get_template("plain").render(
        [("human", "<image>\nDescribe."), ("gpt", "a red circle")]
    )
    assert text == "<image>a red circle\n"
    assert [text[a:b] for a, b in spans] == ["a red circle\n"]


@pytest.mark.parametrize("name", [n for n in TEMPLATES if n != "plain"])
def test_jinja_chat_template_matches_render(name):
    template = get_template(name)
    messages = [{"role": "user" if r == "human" else "assistant", "content": t} for r, t in TURNS]
    rendered = jinja2.Environment().from_string(template.jinja()).render(messages=messages)
    assert rendered == template.render(TURNS)[0]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_prompt_is_the_text_before_the_answer(name):
    template = get_template(name)
    prompt = template.prompt("<image>\nWhat colour?")
    full, spans = template.render([("human", "<image>\nWhat colour?"), ("gpt", "Red.")])
    assert full.startswith(prompt) and len(prompt) == spans[0][0]


def test_bad_conversations():
    t = get_template("qwen")
    with pytest.raises(TemplateError, match="empty"):
        t.render([])
    with pytest.raises(TemplateError, match="ends with a gpt turn"):
        t.render([("human", "hi")])
    with pytest.raises(TemplateError, match="turn 2 is from 'gpt', expected 'human'"):
        t.render([("human", "hi"), ("gpt", "x"), ("gpt", "y"), ("human", "z")])
    with pytest.raises(TemplateError, match="1 turns after the leading gpt turn"):
        t.render([("gpt", "hi"), ("human", "x")])
    with pytest.raises(TemplateError, match="a single gpt turn"):
        t.render([("gpt", "hi")])
    with pytest.raises(TemplateError, match="known: plain, phi"):
        get_template("vicuna_v1")


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_jinja_chat_template_takes_transformers_content_parts(name):
    """Messages as transformers' processors and pipelines write them (lists of image and text
    parts) render as the same text as the string form with the image placeholder line."""
    template = jinja2.Environment().from_string(get_template(name).jinja())
    as_text = [
        {"role": "user", "content": "<image>\nWhat colour?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And the square?"},
        {"role": "assistant", "content": "Blue."},
    ]
    as_parts = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the square?"}]},
        {"role": "assistant", "content": "Blue."},
    ]
    assert template.render(messages=as_parts) == template.render(messages=as_text)
    assert "[{" not in template.render(messages=as_parts)


def test_attached_template_is_the_one_a_reloaded_checkpoint_carries(tmp_path):
    """A later stage saves its recipe's template, not the one its processor was loaded with."""
    from transformers import AutoProcessor

    from moetool.tiny import build_random_lvlm, preset_recipe

    _, processor = build_random_lvlm(preset_recipe("tiny-qwen2"))
    get_template("qwen").attach(processor)
    processor.save_pretrained(tmp_path / "first")
    loaded = AutoProcessor.from_pretrained(tmp_path / "first")
    assert loaded.chat_template == get_template("qwen").jinja()
    get_template("chatml").attach(loaded)
    loaded.save_pretrained(tmp_path / "second")
    again = AutoProcessor.from_pretrained(tmp_path / "second")
    assert again.chat_template == again.tokenizer.chat_template == get_template("chatml").jinja()
