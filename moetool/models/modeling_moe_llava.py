"""The sparse LVLM: transformers' LLaVA with a MoE block in the chosen decoder layers.

Works for any decoder-only language model whose layers have an ``mlp`` module: each expert is a
module of the backbone's own MLP class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from moetool.models.configuration_moe_llava import MoELlavaConfig
from moetool.models.moe import MoEBlock, MoEOptions


@dataclass
class MoELlavaOutput(LlavaCausalLMOutputWithPast):
    """LLaVA output plus the router losses. ``loss`` = LM loss + aux_loss_coef * aux_loss +
    z_loss_coef * z_loss when labels are given (Eq. 7)."""

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # Eq. 9-11 summed over MoE layers (1.0 per balanced layer)
    z_loss: torch.Tensor | None = None  # summed over MoE layers


def decoder_layers(model: LlavaForConditionalGeneration):
    return model.model.language_model.layers


class MoELlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = MoELlavaConfig
    config: MoELlavaConfig
    _no_split_modules = ["MoEBlock"]

    def __init__(self, config: MoELlavaConfig):
        super().__init__(config)
        moe = config.moe
        options = MoEOptions(
            num_experts=moe["num_experts"],
            top_k=moe["top_k"],
            capacity_factor=moe["capacity_factor"],
            eval_capacity_factor=moe["eval_capacity_factor"],
            min_capacity=moe["min_capacity"],
            normalize_top_k=moe["normalize_top_k"],
        )
        hidden = config.text_config.hidden_size
        layers = decoder_layers(self)
        for index in moe["layers"]:
            layers[index].mlp = MoEBlock.upcycle(layers[index].mlp, hidden, options)
        # Routers are new modules: initialise them like the rest of the model.
        for block in self.moe_blocks():
            self._init_weights(block.router)

    def moe_blocks(self) -> list[MoEBlock]:
        return [m for m in self.modules() if isinstance(m, MoEBlock)]

    def moe_layer_indices(self) -> list[int]:
        return [
            i for i, layer in enumerate(decoder_layers(self)) if isinstance(layer.mlp, MoEBlock)
        ]

    def set_routing_records(self, enabled: bool) -> None:
        for block in self.moe_blocks():
            block.record_routing = enabled
            block.last_routing = None

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
        *args,
        labels=None,
        router_losses: bool = True,
        **kwargs,
    ):
        """LLaVA's forward, plus the router losses (``aux_loss``, ``z_loss``) summed over MoE
        layers; ``router_losses=False`` leaves them out (None) unless labels are given."""
        blocks = self.moe_blocks()
        router_losses = router_losses or labels is not None
        num_tokens = None
        token_mask = image_mask = None
        if input_ids is not None:
            num_tokens = input_ids.shape[1]
            image_mask = input_ids == self.config.image_token_id
        elif kwargs.get("inputs_embeds") is not None:
            num_tokens = kwargs["inputs_embeds"].shape[1]
        if attention_mask is not None and num_tokens is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -num_tokens:].bool()
        # The masks stay set until the next forward: gradient checkpointing re-runs the blocks'
        # forward during backward and must see the same masks.
        for block in blocks:
            block.token_mask, block.image_mask = token_mask, image_mask
            block.compute_losses = router_losses
        return_dict = kwargs.pop("return_dict", None)
        out = super().forward(
            input_ids,
            pixel_values,
            attention_mask,
            *args,
            labels=labels,
            return_dict=True,
            **kwargs,
        )
        aux = sum(b.aux_loss for b in blocks) if blocks and router_losses else None
        z = sum(b.z_loss for b in blocks) if blocks and router_losses else None
        loss = out.loss
        if loss is not None and blocks:
            loss = loss + self.config.moe["aux_loss_coef"] * aux
            if self.config.moe["z_loss_coef"]:
                loss = loss + self.config.moe["z_loss_coef"] * z
        # Carry over whatever fields the installed transformers' LLaVA output holds (their names
        # change between releases: 5.24 renamed past_key_values and image_hidden_states), and add
        # ours; copying them by name broke every forward once.
        fields = {**out, "loss": loss, "lm_loss": out.loss, "aux_loss": aux, "z_loss": z}
        output = MoELlavaOutput(**fields)
        if not (return_dict if return_dict is not None else self.config.return_dict):
            return output.to_tuple()  # as transformers' models do
        return output
