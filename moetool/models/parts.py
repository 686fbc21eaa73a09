"""Which part of the LVLM each parameter belongs to (for stage policies)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetool.models.families import Family, decoder_names

if TYPE_CHECKING:
    from torch import nn

# Fine-grained parts; recipe names such as "llm" and "ffn" are unions of these.
PART_UNIONS = {
    "llm": (
        "embeddings",
        "attention",
        "ffn",
        "experts",
        "routers",
        "norms",
        "lm_head",
        "llm_other",
    ),
    "ffn": ("ffn", "experts"),  # every layer's FFN: dense FFNs and the experts of MoE layers
}


def layer_child_part(name: str, family: Family) -> str:
    """The part a decoder layer's child ``name`` belongs to: "ffn" (the ``mlp``), "norms",
    "attention" or "other", by the family's exact attribute names. Shared by the stage policies
    and the parameter counts."""
    if name == "mlp":
        return "ffn"
    if name in family.layer_norms:
        return "norms"
    if name == family.attention:
        return "attention"
    return "other"


def parameter_parts(model: nn.Module) -> dict[str, str]:
    """Map every parameter name of a VLM (dense or sparse, any base of ``models.bases``) to one
    part: vision, projector, embeddings, attention, ffn (dense FFN), experts, routers, norms,
    lm_head or llm_other. Where each part sits comes from the base's entry (exact attribute
    names); the decoder layers' children from the language model's family."""
    from torch import nn

    from moetool.models.bases import get_base
    from moetool.models.moe import MoEBlock

    inner = model.model
    base = get_base(model.config.model_type)
    family = decoder_names(model.config.get_text_config().model_type)
    owner: dict[int, str] = {}

    def claim(item: nn.Module | nn.Parameter, part: str) -> None:
        params = [item] if isinstance(item, nn.Parameter) else item.parameters()
        for p in params:
            owner.setdefault(id(p), part)

    for param in connector_parameters(inner, base.connector):  # first: a merger inside the
        claim(param, "projector")  # vision encoder is the connector
    claim(getattr(inner, base.vision), "vision")
    language_model = getattr(inner, base.language_model)
    for layer in language_model.layers:
        for name, child in layer.named_children():
            if isinstance(child, MoEBlock):
                claim(child.router, "routers")
                claim(child.experts, "experts")
            elif (part := layer_child_part(name, family)) != "other":
                claim(child, part)
    claim(language_model.get_input_embeddings(), "embeddings")
    claim(getattr(language_model, family.final_norm), "norms")
    claim(model.lm_head, "lm_head")
    claim(language_model, "llm_other")
    return {name: owner[id(p)] for name, p in model.named_parameters()}


def connector_parameters(inner: nn.Module, paths: tuple[str, ...]) -> list[nn.Parameter]:
    """The parameters of a base's connector (``VLMBase.connector``: dotted paths under the
    inner model, each a module or a parameter such as LLaVA-NeXT's ``image_newline``)."""
    from torch import nn

    out: list[nn.Parameter] = []
    for path in paths:
        head, _, leaf = path.rpartition(".")
        item = getattr(inner.get_submodule(head) if head else inner, leaf)
        out.extend([item] if isinstance(item, nn.Parameter) else item.parameters())
    return out


def expand_parts(parts: tuple[str, ...] | list[str]) -> set[str]:
    out: set[str] = set()
    for part in parts:
        out.update(PART_UNIONS.get(part, (part,)))
    return out


def set_trainable(model: nn.Module, parts: tuple[str, ...] | list[str]) -> list[str]:
    """Freeze everything but ``parts``; returns the names of the trainable parameters."""
    wanted = expand_parts(parts)
    trainable = []
    for param in model.parameters():
        param.requires_grad_(False)
    named = dict(model.named_parameters())
    for name, part in parameter_parts(model).items():
        if part in wanted:
            named[name].requires_grad_(True)
            trainable.append(name)
    return trainable
