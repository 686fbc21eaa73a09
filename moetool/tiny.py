"""The built-in tiny world, for tests, CI, the quickstart and the benchmarks: an offline
tokenizer, named presets and random LVLMs (the smoke form of a recipe: ``moetool.smoke``). Real
runs need none of it: they read the base model's own tokenizer and weights from ``model.path``.

No tokenizer can be downloaded here or in CI, so tiny models get one built deterministically
from a fixed corpus (the words of the synthetic shapes world, chat-template words and common
English).
"""

from __future__ import annotations

import functools

from moetool.models.build import build_processor, lvlm_config
from moetool.recipe.load import load_recipe
from moetool.recipe.paths import recipes_root
from moetool.recipe.schema import Recipe

# Specials shared by every family; each template picks its BOS/EOS among them.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<pad>",
    "<image>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|end_of_turn|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


_TEXT = """
red green blue yellow orange purple pink brown black white gray grey cyan magenta
circle square triangle star cross diamond heart hexagon ring rectangle shape shapes object objects
left right top bottom middle center centre above below next to near far corner upper lower
one two three four five six seven eight nine ten zero many few how what which where is are
there a an the this that these those image picture photo in on of and or with without yes no
color colour colours colors count number big small large tiny background foreground of the
question answer describe caption short long word single phrase using please option options A B
C D correct choose from following letter USER ASSISTANT SYSTEM user assistant system human gpt
A chat between a curious human and an artificial intelligence assistant. The assistant gives
helpful, detailed, and polite answers to the human's questions. GPT4 Correct User Assistant
you your I me my it its we they he she them do does did can could would should will not
first second third last both each every all none some any more most less least than then
"""


def _corpus() -> list[str]:
    words = _TEXT.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [f"{w} {w.capitalize()} {w.upper()}" for w in words]
    lines += [
        f"Is there a {c} {s} in the image? Yes. No." for c in words[:16] for s in words[16:28]
    ]
    lines += [f"{n} {n}0 {n}{n}" for n in range(10)]
    return lines + _project_phrases()


def _project_phrases() -> list[str]:
    # The chat templates' system prompts and the synthetic world's prompts, questions and
    # answers, repeated so that BPE merges them into few tokens (shorter sequences train faster).
    from moetool.data import synth
    from moetool.data.templates import TEMPLATES

    systems = sorted({t.system for t in TEMPLATES.values() if t.system})
    prompts = [*synth.BRIEF_PROMPTS, *synth.DETAILED_PROMPTS, synth.SHORT_ANSWER]
    prompts.append(synth.LETTER_ANSWER)
    colours, shapes = list(synth.PALETTE), list(synth.SHAPES)
    questions = []
    for i, templates in enumerate(synth.QUESTION_TEMPLATES.values()):
        for j, template in enumerate(templates):
            colour, shape = colours[(i + j) % len(colours)], shapes[(i + 2 * j) % len(shapes)]
            name = f"{colour} {shape}"
            fields = {"a": synth.article(colour), "name": name, "colour": colour, "shape": shape}
            questions.append(template.format(plural=shape + "s", **fields))
    answers = [w.capitalize() for w in (*colours, *shapes, *synth.POSITIONS, "yes", "no")]
    # Whole prompts as each template renders them (role words, separators, line breaks).
    chats = [
        t.prompt(f"{q}\n{synth.SHORT_ANSWER}") + a
        for t in TEMPLATES.values()
        for q, a in zip(questions, answers, strict=False)
    ]
    return 8 * (systems + prompts + questions) + [" ".join(answers)] * 4 + chats


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer(vocab_size: int, template: str = "plain"):
    """A ``PreTrainedTokenizerFast`` of at most ``vocab_size`` tokens with ``<image>`` and the
    template's BOS/EOS; identical for identical arguments."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from moetool.data.templates import get_template

    template_eos = get_template(template).eos  # raises on an unknown name
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"an offline tokenizer needs vocab_size >= {minimum}, got {vocab_size}")
    backend = Tokenizer.from_str(_trained_tokenizer_json(min(vocab_size, 4096)))
    eos = template_eos if template_eos in SPECIAL_TOKENS else "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token=PAD_TOKEN,
        bos_token="<|begin_of_text|>"
        if template == "llama3"
        else ("<s>" if template in ("mistral", "openchat") else None),
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    return tokenizer


PRESETS: dict[str, str] = {
    # The paper's bases (Tables 1 and 8), CLIP-L/336 tower.
    "stablelm-1.6b": "stablelm-1.6b/dense",
    "qwen-1.8b": "qwen-1.8b/dense",
    "phi2-2.7b": "phi2-2.7b/dense",
    "openchat-7b": "openchat-7b/dense",
    # Tiny random models of real transformers families (hidden 64, 4 layers), for tests.
    "tiny-llama": "tiny/llama",
    "tiny-mistral": "tiny/mistral",
    "tiny-qwen2": "tiny/qwen2",
    "tiny-qwen3": "tiny/qwen3",
    "tiny-phi": "tiny/phi",
    "tiny-stablelm": "tiny/stablelm",
    "tiny-gemma2": "tiny/gemma2",
}


def preset_recipe(name: str):
    """The recipe behind a preset name; unknown names list the valid ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return load_recipe(recipes_root() / f"{PRESETS[name]}.toml")


def build_random_lvlm(recipe: Recipe, seed: int = 0, template: str | None = None):
    """A randomly initialised LVLM of the recipe's architecture with the offline tokenizer,
    its tower and LM attending with ``model.attn_implementation``.

    No weights are read. Returns (model, processor).
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tokenizer(recipe.model.vocab_size, template or recipe.data.template)
    image_token_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    config = lvlm_config(recipe.model, recipe.vision, image_token_id)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config._attn_implementation = recipe.model.attn_implementation  # and the sub-configs'
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), build_processor(recipe.vision, tokenizer)
