"""The sparse LVLM: transformers' LLaVA with a MoE block in the chosen decoder layers.

Works for any decoder-only language model whose layers have an ``mlp`` module: each expert is a
module of the backbone's own MLP class. As in transformers' Qwen3-MoE, the blocks are stateless
and the model computes the router losses from the router logits of every MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import LlavaForConditionalGeneration, LlavaModel
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from moetool.models.configuration_moe_llava import MoELlavaConfig
from moetool.models.moe import MoEBlock, MoEConfig
from moetool.models.moe.losses import router_losses as compute_router_losses
from moetool.models.moe.recording import checkpoint_with_router_logits, recording_router_logits


@dataclass
class MoELlavaOutput(LlavaCausalLMOutputWithPast):
    """LLaVA output plus the router losses. ``loss`` = LM loss + aux_loss_coef * aux_loss +
    z_loss_coef * z_loss when labels are given (Eq. 7)."""

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # Eq. 9-11 summed over MoE layers (1.0 per balanced layer)
    z_loss: torch.Tensor | None = None  # summed over MoE layers
    router_logits: tuple[torch.Tensor, ...] | None = None  # per MoE layer, (batch * tokens, E)


def decoder_layers(model: LlavaForConditionalGeneration):
    return model.model.language_model.layers


def make_sparse(model, layers, config: MoELlavaConfig) -> None:
    """Replace the MLP of each MoE layer among the decoder ``layers`` of ``model`` (a LLaVA model
    or its CausalLM) by a MoE block of copies of it, and initialise the new routers like the rest
    of the model."""
    moe = MoEConfig.from_dict(config.moe, config.text_config.num_hidden_layers)
    hidden = config.text_config.hidden_size
    partitioned = is_deepspeed_zero3_enabled()
    for index in moe.layers:
        mlp = layers[index].mlp
        if partitioned:
            # deepspeed.zero.Init partitions each module as it is built; a deepcopy of one
            # would share its partition bookkeeping. Each expert is built as its own module
            # of the backbone's MLP class (every supported one takes the text config); the
            # weights come from the checkpoint being loaded.
            experts = [mlp] + [type(mlp)(config.text_config) for _ in range(moe.num_experts - 1)]
            layers[index].mlp = MoEBlock(experts, hidden, moe)
        else:
            layers[index].mlp = MoEBlock.upcycle(mlp, hidden, moe)
    for block in model.modules():
        if isinstance(block, MoEBlock):
            model._init_weights(block.router)


class MoELlavaModel(LlavaModel):
    """The sparse LLaVA without its LM head: what ``AutoModel`` builds (vLLM's Transformers
    backend builds this and adds its own head; see ``moetool.vllm_plugin``)."""

    config_class = MoELlavaConfig
    config: MoELlavaConfig
    _no_split_modules = ["MoEBlock"]

    def __init__(self, config: MoELlavaConfig):
        super().__init__(config)
        make_sparse(self, self.language_model.layers, config)


class MoELlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = MoELlavaConfig
    config: MoELlavaConfig
    _no_split_modules = ["MoEBlock"]

    def __init__(self, config: MoELlavaConfig):
        super().__init__(config)
        make_sparse(self, decoder_layers(self), config)

    @cached_property
    def moe_config(self) -> MoEConfig:
        """The checked ``moe`` section (layers as indices, combine-weight mode decided)."""
        return MoEConfig.from_dict(self.config.moe, self.config.text_config.num_hidden_layers)

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
        *args,
        labels=None,
        router_losses: bool = True,
        output_router_logits: bool = False,
        **kwargs,
    ):
        """LLaVA's forward, plus the router losses (``aux_loss``, ``z_loss``) summed over MoE
        layers; ``router_losses=False`` leaves them out (None) unless labels are given.
        ``output_router_logits`` returns every MoE layer's router logits too."""
        compute_losses = router_losses or labels is not None
        return_dict = kwargs.pop("return_dict", None)
        # position_ids named in the signature: generate derives them from the attention mask
        # only for a forward that names them (left-padded batches need them).
        call = (input_ids, pixel_values, attention_mask, position_ids, *args)
        logits = None
        if compute_losses or output_router_logits:
            self._checkpoint_router_logits()
            with recording_router_logits() as logits:
                out = super().forward(*call, labels=labels, return_dict=True, **kwargs)
            self._check_router_logits(logits)
        else:
            out = super().forward(*call, labels=labels, return_dict=True, **kwargs)
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
        # Carry over whatever fields the installed transformers' LLaVA output holds (their names
        # change between releases: 5.24 renamed past_key_values and image_hidden_states), and add
        # ours; copying them by name broke every forward once.
        fields = {**out, "loss": loss, "lm_loss": out.loss, "aux_loss": aux, "z_loss": z}
        if output_router_logits:
            fields["router_logits"] = tuple(logits)
        output = MoELlavaOutput(**fields)
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
