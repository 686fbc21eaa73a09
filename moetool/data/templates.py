"""Conversation templates, keyed by exact name (the official MoE-LLaVA ``--version`` names plus
llama3 and chatml).

A template renders a conversation to text and reports the character spans the model is trained
on (the assistant turns and their end token, paper Eq. 8); it also renders the matching Jinja
chat template that checkpoints carry for ``apply_chat_template``.
"""

from __future__ import annotations

from dataclasses import dataclass

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_PLACEHOLDER = "<image>"
# A message's content in a Jinja chat template: a string as it is, or transformers' list of
# parts, each image an image placeholder on its own line (as the training data has it) and each
# text part its text -- so `processor.apply_chat_template` and the "image-text-to-text" pipeline
# work with structured messages.
JINJA_CONTENT = (
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}"
    + IMAGE_PLACEHOLDER
    + "\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
)

Turn = tuple[str, str]  # (role: "human" | "gpt", text)
Span = tuple[int, int]


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Template:
    name: str
    style: str  # "two" (Vicuna style), "plain", "llama3", "chatml"
    eos: str  # end of an assistant turn (the official sep2)
    system: str = VICUNA_SYSTEM
    sep: str = " "

    def render(self, turns: list[Turn]) -> tuple[str, list[Span]]:
        """Full text of a conversation and the spans of the assistant text (plus its end
        token) that carry labels. A leading gpt turn is dropped (``conversation_turns``)."""
        turns = conversation_turns(turns)
        pieces: list[tuple[str, bool]] = []
        if self.style == "plain":
            # Stage I: the image, then the caption; the question text is not used.
            pieces += [(IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in turns[0][1] else "", False)]
            pieces += [(turns[1][1] + "\n", True)]
        elif self.style == "two":
            pieces.append((self.system + self.sep, False))
            for i in range(0, len(turns), 2):
                pieces.append((f"USER: {turns[i][1]}{self.sep}ASSISTANT: ", False))
                pieces.append((turns[i + 1][1] + self.eos, True))
        elif self.style == "llama3":
            pieces.append(
                (
                    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    f"{self.system}<|eot_id|>",
                    False,
                )
            )
            for i in range(0, len(turns), 2):
                pieces.append(
                    (
                        f"<|start_header_id|>user<|end_header_id|>\n\n{turns[i][1]}"
                        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                        False,
                    )
                )
                pieces.append((turns[i + 1][1] + self.eos, True))
        elif self.style == "chatml":
            pieces.append((f"<|im_start|>system\n{self.system}<|im_end|>\n", False))
            for i in range(0, len(turns), 2):
                pieces.append(
                    (f"<|im_start|>user\n{turns[i][1]}<|im_end|>\n<|im_start|>assistant\n", False)
                )
                pieces.append((turns[i + 1][1] + self.eos, True))
                pieces.append(("\n", False))
        else:  # pragma: no cover - guarded by the registry
            raise TemplateError(f"unknown style {self.style!r}")
        text, spans = "", []
        for piece, trained in pieces:
            if trained:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        return text, spans

    def prompt(self, question: str) -> str:
        """The text up to where the assistant's answer starts, for generation."""
        text, spans = self.render([("human", question), ("gpt", "")])
        return text[: spans[-1][0]]

    def jinja(self) -> str:
        """A Jinja chat template (messages with role user/assistant) equal to ``render``; a
        message's content may be a string or a list of image and text parts."""
        user = "{% for m in messages %}{% if m['role'] == 'user' %}"
        content, other = JINJA_CONTENT, "{% else %}"
        end = "{% endif %}{% endfor %}"
        if self.style == "plain":
            return user + IMAGE_PLACEHOLDER + other + content + "\n" + end
        if self.style == "two":
            return (
                f"{self.system}{self.sep}{user}USER: {content}{self.sep}ASSISTANT: "
                f"{other}{content}{self.eos}{end}"
            )
        if self.style == "llama3":
            return (
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                f"{self.system}<|eot_id|>{user}<|start_header_id|>user<|end_header_id|>\n\n"
                f"{content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                f"{other}{content}{self.eos}{end}"
            )
        return (
            f"<|im_start|>system\n{self.system}<|im_end|>\n{user}<|im_start|>user\n{content}"
            f"<|im_end|>\n<|im_start|>assistant\n{other}{content}{self.eos}\n{end}"
        )

    def attach(self, processor) -> None:
        """Make this the chat template a checkpoint saved with ``processor`` carries. A processor
        loaded from a checkpoint holds its own copy of the template, which ``save_pretrained``
        writes instead of the tokenizer's; both are set."""
        processor.chat_template = processor.tokenizer.chat_template = self.jinja()


def conversation_turns(turns: list[Turn]) -> list[Turn]:
    """The turns a template renders: a leading gpt turn dropped, as the official LLaVA/MoE-LLaVA
    ``preprocess`` does ("skip the first one if it is not from human"), then checked
    (``_check_turns``). Raises ``TemplateError``."""
    if turns and turns[0][0] == "gpt":
        if len(turns) == 1:
            raise TemplateError("a single gpt turn: nothing to answer")
        turns = list(turns[1:])
        _check_turns(turns, first=1)
    else:
        _check_turns(turns)
    return turns


def _check_turns(turns: list[Turn], first: int = 0) -> None:
    """Human and gpt turns alternating from human, ending with gpt; ``first`` is the index of
    ``turns[0]`` in the conversation (1 when a leading gpt turn was dropped)."""
    if not turns:
        raise TemplateError("empty conversation")
    if len(turns) % 2:
        dropped = " after the leading gpt turn" if first else ""
        raise TemplateError(
            f"{len(turns)} turns{dropped}: a conversation alternates human and gpt turns "
            "and ends with a gpt turn"
        )
    for i, (role, _) in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise TemplateError(f"turn {i + first} is from {role!r}, expected {expected!r}")


TEMPLATES: dict[str, Template] = {}


def register_template(template: Template) -> None:
    if template.name in TEMPLATES:
        raise ValueError(f"template {template.name!r} is already registered")
    TEMPLATES[template.name] = template


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(
            f"unknown conversation template {name!r}; known: {', '.join(TEMPLATES)}"
        ) from None


for _t in (
    Template("plain", "plain", eos="\n", system=""),
    # The official MoE-LLaVA templates: Vicuna system prompt, USER/ASSISTANT, sep " ", and the
    # base's end-of-text token as sep2.
    Template("phi", "two", eos="<|endoftext|>"),
    Template("stablelm", "two", eos="<|endoftext|>"),
    Template("qwen", "two", eos="<|endoftext|>"),
    Template("openchat", "two", eos="<|end_of_turn|>"),
    Template("mistral", "two", eos="</s>"),
    Template(
        "llama3",
        "llama3",
        eos="<|eot_id|>",
        system="You are a helpful language and vision assistant.",
    ),
    Template(
        "chatml",
        "chatml",
        eos="<|im_end|>",
        system="You are a helpful language and vision assistant.",
    ),
):
    register_template(_t)
