"""``convert_checkpoint``: the whole conversion, streamed tensor by tensor into an atomic OUT."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moetool._version import __version__
from moetool.checkpoint_io import CheckpointTransform
from moetool.convert.backbones import SOURCE_FORMATS, Backbone, ConvertError, get_backbone
from moetool.convert.config import (
    build_sparse_config,
    moe_section_from_official,
    text_config_kwargs,
    vision_config_for,
)
from moetool.convert.plan import ConversionPlan, expected_tensors, plan_conversion
from moetool.convert.processor import build_converted_processor, prepare_tokenizer
from moetool.convert.source import SourceCheckpoint


@dataclass(frozen=True)
class ConvertOptions:
    vision_config: str | Path | None = None  # CLIP/SigLIP config.json or checkpoint directory
    tokenizer: str | Path | None = None  # tokenizer directory; default SRC
    template: str | None = None  # conversation template; default the backbone's
    keep_capacity: bool = False  # keep the official capacity factors (default: dropless)
    drop_lm_head_bias: bool = False


@dataclass(frozen=True)
class ConversionResult:
    plan: ConversionPlan
    backbone: Backbone
    config: object  # MoELlavaConfig
    template: str
    vocab_padded: tuple[int, int] | None  # (official vocab, converted vocab) when <image> grew it

    def summary(self) -> dict:
        return {
            "model_type": self.backbone.official_model_type,
            "text_model_type": self.backbone.text_model_type,
            "moe": self.plan.moe.to_dict(),
            "template": self.template,
            "image_token_id": self.config.image_token_id,
            "vision_tower": self.config.vision_config.model_type,
            "tensors": len(self.plan.tensors),
            "bytes": sum(t.nbytes for t in self.plan.tensors),
            "dropped": list(self.plan.dropped),
            "vocab_padded": list(self.vocab_padded) if self.vocab_padded else None,
        }


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    options: ConvertOptions = ConvertOptions(),
    source_format: str = "moe-llava",
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
    progress: Callable[[int, int], None] | None = None,
) -> ConversionResult:
    """Convert the official checkpoint directory ``src`` into the moetool checkpoint ``out``.

    Everything is checked before anything is written; the output is written to a temporary
    directory renamed when complete."""
    from transformers import GenerationConfig

    if source_format not in SOURCE_FORMATS:
        raise ConvertError(f"--from {source_format!r}; known: {', '.join(SOURCE_FORMATS)}")
    inputs = [options.tokenizer, options.vision_config]
    with CheckpointTransform(src, out, ConvertError, overwrite, inputs) as job:
        official = job.config
        backbone = get_backbone(official.get("model_type"))
        text_kwargs = text_config_kwargs(official, backbone)
        moe = moe_section_from_official(
            official.get("moe"), text_kwargs["num_hidden_layers"], options.keep_capacity
        )
        source = SourceCheckpoint(job.src)
        job.close_with(source.close)
        vision = vision_config_for(official, options.vision_config)
        template = options.template or backbone.template
        tokenizer, image_token_id, eos_id = prepare_tokenizer(
            Path(options.tokenizer) if options.tokenizer else job.src, template
        )
        vocab = text_kwargs["vocab_size"]
        overrides = {"eos_token_id": eos_id, "pad_token_id": tokenizer.pad_token_id}
        vocab_padded = None
        if image_token_id >= vocab:  # no spare embedding row: grow by zero rows
            vocab_padded = (vocab, image_token_id + 1)
            overrides["vocab_size"] = image_token_id + 1
        config = build_sparse_config(official, backbone, vision, moe, image_token_id, overrides)
        plan = plan_conversion(
            source.entries,
            expected_tensors(config),
            backbone,
            moe,
            options.drop_lm_head_bias,
            vocab_padded,
        )
        config.moetool = {
            "version": __version__,
            "stage": "converted",
            "source": str(job.src),
            "convert": {
                "from": source_format,
                "model_type": backbone.official_model_type,
                "official_moe": official.get("moe"),
                "capacity": "official" if options.keep_capacity else "dropless",
                "template": template,
                "dropped": list(plan.dropped),
                "vocab_padded": list(vocab_padded) if vocab_padded else None,
            },
        }
        vision_dir = Path(options.vision_config) if options.vision_config else None
        processor = build_converted_processor(
            vision,
            tokenizer,
            config.vision_feature_select_strategy,
            vision_dir if vision_dir is not None and vision_dir.is_dir() else None,
        )
        generation = GenerationConfig(
            bos_token_id=config.text_config.bos_token_id,
            eos_token_id=eos_id,
            pad_token_id=tokenizer.pad_token_id,
        )

        def write_processor(tmp: Path) -> None:  # built here, not copied from the source
            processor.save_pretrained(tmp)
            generation.save_pretrained(tmp)

        job.write(
            plan.tensors,
            source.write,
            config,
            side_files=False,
            finish=write_processor,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
        )
    return ConversionResult(plan, backbone, config, template, vocab_padded)
