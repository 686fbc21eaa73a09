"""The sparse VLM: a dense transformers VLM with a MoE block in the chosen decoder layers of its
language model.

Works for every base of ``models.bases`` (LLaVA, LLaVA-NeXT/OneVision, Qwen2/2.5/3-VL, InternVL,
Idefics3/SmolVLM, Gemma 3, Mistral 3) and any decoder whose layers have an ``mlp`` module: each
expert is a module of the backbone's own MLP class. One set of classes per base is made from the
base's own (``sparse_classes``): the same MoE block, ``MoEConfig``, loss path and router-logit
recorder for all. As in transformers' Qwen3-MoE, the blocks are stateless and the model computes
the router losses from the router logits of every MoE layer.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys

import torch
from transformers.integrations import is_deepspeed_zero3_enabled

from moetool.models.bases import get_base
from moetool.models.configuration_moe_llava import sparse_config_class
from moetool.models.moe import MoEBlock, MoEConfig
from moetool.models.moe.losses import router_losses as compute_router_losses
from moetool.models.moe.recording import checkpoint_with_router_logits, recording_router_logits

_ROUTER_FIELDS = {
    "lm_loss": None,  # the LM loss alone
    "aux_loss": None,  # Eq. 9-11 summed over MoE layers (1.0 per balanced layer)
    "z_loss": None,  # summed over MoE layers
    "router_logits": None,  # per MoE layer, (batch * tokens, E)
}


@functools.cache
def output_class(dense_output: type) -> type:
    """The base's output class plus the router losses. ``loss`` = LM loss + aux_loss_coef *
    aux_loss + z_loss_coef * z_loss when labels are given (Eq. 7)."""
    fields = [(name, torch.Tensor | tuple | None, dataclasses.field(default=None)) for name in
              _ROUTER_FIELDS]  # fmt: skip
    name = "MoE" + dense_output.__name__.removesuffix("OutputWithPast").removesuffix("Output")
    cls = dataclasses.make_dataclass(name + "Output", fields, bases=(dense_output,))
    cls.__module__ = __name__
    setattr(sys.modules[__name__], cls.__name__, cls)  # picklable by name
    return cls


def decoder_layers(model):
    """The language model's decoder layers of a VLM (or of its inner ``…Model``)."""
    return model.get_decoder().layers


def make_sparse(model, layers, config) -> None:
    """Replace the MLP of each MoE layer among the decoder ``layers`` of ``model`` (a sparse
    VLM or its inner model) by a MoE block of copies of it, and initialise the new routers like
    the rest of the model."""
    moe: MoEConfig = config.moe
    text_config = config.get_text_config()
    hidden = text_config.hidden_size
    partitioned = is_deepspeed_zero3_enabled()
    for index in moe.layers:
        mlp = layers[index].mlp
        if partitioned:
            # deepspeed.zero.Init partitions each module as it is built; a deepcopy of one
            # would share its partition bookkeeping. Each expert is built as its own module
            # of the backbone's MLP class (every supported one takes the text config); the
            # weights come from the checkpoint being loaded.
            experts = [mlp] + [type(mlp)(text_config) for _ in range(moe.num_experts - 1)]
            layers[index].mlp = MoEBlock(experts, hidden, moe)
        else:
            layers[index].mlp = MoEBlock.upcycle(mlp, hidden, moe)
    for block in model.modules():
        if isinstance(block, MoEBlock):
            model._init_weights(block.router)


class SparseModelMixin:
    """The sparse VLM without its LM head: what ``AutoModel`` builds (vLLM's Transformers
    backend builds this and adds its own head; see ``moetool.vllm_plugin``)."""

    def __init__(self, config):
        super().__init__(config)
        make_sparse(self, decoder_layers(self), config)


class SparseForConditionalGenerationMixin:
    """The sparse VLM: the base's ``…ForConditionalGeneration`` plus the router losses."""

    def __init__(self, config):
        super().__init__(config)
        make_sparse(self, decoder_layers(self), config)

    @property
    def moe_config(self) -> MoEConfig:
        """The checked ``moe`` section (layers as indices, combine-weight mode decided)."""
        return self.config.moe

    def moe_blocks(self) -> list[MoEBlock]:
        return [m for m in self.modules() if isinstance(m, MoEBlock)]

    def moe_layer_indices(self) -> list[int]:
        return [
            i for i, layer in enumerate(decoder_layers(self)) if isinstance(layer.mlp, MoEBlock)
        ]

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # Decoding needs no router losses (as transformers' MoE models leave out their aux loss
        # unless asked); generate(..., router_losses=True) still computes them.
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        inputs.setdefault("router_losses", False)
        return inputs

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        *,
        labels=None,
        router_losses: bool = True,
        output_router_logits: bool = False,
        **kwargs,
    ):
        """The base's forward, plus the router losses (``aux_loss``, ``z_loss``) summed over MoE
        layers; ``router_losses=False`` leaves them out (None) unless labels are given.
        ``output_router_logits`` returns every MoE layer's router logits too. Inputs by name
        (the bases order their forward's arguments differently)."""
        compute_losses = router_losses or labels is not None
        return_dict = kwargs.pop("return_dict", None)
        # position_ids named in the signature: generate derives them from the attention mask
        # only for a forward that names them (left-padded batches need them).
        named = {
            "input_ids": input_ids,
            "pixel_values": pixel_values,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
        call = {k: v for k, v in named.items() if v is not None} | kwargs
        logits = None
        if compute_losses or output_router_logits:
            self._checkpoint_router_logits()
            with recording_router_logits() as logits:
                out = super().forward(labels=labels, return_dict=True, **call)
            self._check_router_logits(logits)
        else:
            out = super().forward(labels=labels, return_dict=True, **call)
        aux = z = None
        if compute_losses:
            mask = self._token_mask(input_ids, attention_mask, kwargs.get("inputs_embeds"))
            global_batch = self.moe_config.balance_scope == "global-batch"
            aux, z = compute_router_losses(logits, mask, global_batch)
        loss = out.loss
        if loss is not None:
            loss = loss + self.moe_config.aux_loss_coef * aux
            if self.moe_config.z_loss_coef:
                loss = loss + self.moe_config.z_loss_coef * z
        # Carry over whatever fields the installed transformers' output holds (their names
        # change between releases: 5.24 renamed past_key_values and image_hidden_states), and add
        # ours; copying them by name broke every forward once.
        fields = {**out, "loss": loss, "lm_loss": out.loss, "aux_loss": aux, "z_loss": z}
        if output_router_logits:
            fields["router_logits"] = tuple(logits)
        output = output_class(type(out))(**fields)
        if not (return_dict if return_dict is not None else self.config.return_dict):
            return output.to_tuple()  # as transformers' models do
        return output

    def _checkpoint_router_logits(self) -> None:
        """Under gradient checkpointing, route each MoE layer's router logits out of the
        checkpointed region (reentrant checkpointing runs it under no_grad first)."""
        layers = decoder_layers(self)
        for index in self.moe_config.layers:
            func = getattr(layers[index], "_gradient_checkpointing_func", None)
            if func is not None and not getattr(func, "moetool_router_logits", False):
                layers[index]._gradient_checkpointing_func = checkpoint_with_router_logits(func)

    def _check_router_logits(self, logits: list[torch.Tensor]) -> None:
        expected = len(self.moe_config.layers)
        if len(logits) != expected:
            raise RuntimeError(
                f"recorded {len(logits)} router outputs for {expected} MoE layers in one forward"
            )
        router = self.moe_blocks()[0].router.weight
        if (
            torch.is_grad_enabled()
            and router.requires_grad
            and not all(t.requires_grad for t in logits)
        ):
            raise RuntimeError(
                "router logits carry no gradient although the routers train: a wrapper "
                "re-runs the decoder layers under no_grad (reentrant checkpointing applied "
                "outside transformers' gradient_checkpointing_enable); the aux loss would not "
                "train the routers. Use model.gradient_checkpointing_enable(...) instead."
            )

    def _token_mask(self, input_ids, attention_mask, inputs_embeds) -> torch.Tensor | None:
        """(batch * tokens,) True for the tokens of this forward that are not padding."""
        if attention_mask is None or attention_mask.dim() != 2:
            return None
        source = input_ids if input_ids is not None else inputs_embeds
        if source is None:
            return None
        batch, tokens = source.shape[:2]
        if attention_mask.shape[0] != batch or attention_mask.shape[1] < tokens:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; this forward has "
                f"{batch} sequences of {tokens} tokens"
            )
        return attention_mask[:, -tokens:].reshape(-1).bool()


@functools.cache
def sparse_classes(base_model_type: str) -> tuple[type, type, type]:
    """The sparse config, inner model and ``…ForConditionalGeneration`` classes of a base, made
    once from the base's own classes (``MoE`` + their names), each also a module attribute."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
        MODEL_MAPPING,
    )

    base = get_base(base_model_type)
    dense_config = CONFIG_MAPPING[base.model_type]
    config_class = sparse_config_class(base.model_type)
    made = []
    for mixin, dense in (
        (SparseModelMixin, MODEL_MAPPING[dense_config]),
        (SparseForConditionalGenerationMixin, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[dense_config]),
    ):
        name = f"MoE{dense.__name__}"
        body = {
            "__module__": __name__,
            "__doc__": f"{dense.__name__} with MoE layers ({mixin.__doc__.splitlines()[0]})",
            "config_class": config_class,
            "_no_split_modules": [*(dense._no_split_modules or []), "MoEBlock"],
        }
        if mixin is SparseForConditionalGenerationMixin:
            body["forward"] = _forward_with_signature_of(dense.forward)
        cls = type(name, (mixin, dense), body)
        setattr(sys.modules[__name__], name, cls)  # picklable by name
        made.append(cls)
    setattr(sys.modules[config_class.__module__], config_class.__name__, config_class)
    return config_class, *made


def _forward_with_signature_of(dense_forward):
    """The sparse forward, taking its arguments as the base's forward does (by position too)
    and showing its signature: generate passes the base's own inputs (``image_grid_thw``,
    ``pixel_attention_mask``, ``image_sizes``, …) only to a forward that names them."""
    signature = inspect.signature(dense_forward)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    ours = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
        for name, default in (("router_losses", True), ("output_router_logits", False))
    ]
    rest = [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
    shown = signature.replace(parameters=[*params, *ours, *rest])

    def forward(self, *args, **kwargs):
        arguments = shown.bind(self, *args, **kwargs).arguments
        arguments.pop("self")
        extra = arguments.pop(rest[0].name, {}) if rest else {}
        return SparseForConditionalGenerationMixin.forward(self, **arguments, **extra)

    forward.__signature__ = shown
    forward.__doc__ = SparseForConditionalGenerationMixin.forward.__doc__
    return forward


_, MoELlavaModel, MoELlavaForConditionalGeneration = sparse_classes("llava")
