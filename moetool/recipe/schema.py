"""The recipe schema: frozen dataclasses, one per TOML section.

Each dataclass checks its own values in ``problems()``; checks that span sections live in
``Recipe.problems()``. The loader (``load.py``) turns TOML into these classes and raises every
problem at once as a ``RecipeError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from moetool.models.arch import ModelSection, VisionSection  # the [model] and [vision] sections
from moetool.models.attention import AttnImplementation  # noqa: F401  (model's annotation)
from moetool.models.families import known_families  # noqa: F401  (docs read it)
from moetool.models.lora import QUANTIZED_PARTS, LoraSection  # the [lora] section
from moetool.models.moe.config import (  # noqa: F401  (the [moe] section and its layouts)
    LAYER_LAYOUTS,
    LayerLayout,
    MoEConfig,
    parse_layer_layout,
    resolve_moe_layers,
)

# A problem is (dotted key relative to the section, message).
Problem = tuple[str, str]
__all__ = ["ModelSection", "VisionSection", "MoEConfig", "LoraSection", "Recipe", "Problem"]

TRAINABLE_PARTS = (
    "vision",  # the vision tower
    "projector",  # the 2-layer MLP projector
    "llm",  # the whole language model (embeddings, attention, FFN/experts, routers, norms, head)
    "embeddings",
    "attention",
    "ffn",  # the FFN of every layer: experts of MoE layers and the dense FFNs between them
    "experts",  # experts of MoE layers only
    "routers",
    "norms",
    "lm_head",
)
SPARSE_ONLY_PARTS = ("experts", "routers")
STAGE_NAMES = ("pretrain", "instruct", "moe_tune")


def _template_problems(name: str) -> list[Problem]:
    from moetool.data.templates import TEMPLATES

    if name in TEMPLATES:
        return []
    return [("template", f"unknown conversation template {name!r}; known: {', '.join(TEMPLATES)}")]


@dataclass(frozen=True)
class ProjectorSection:
    type: Literal["mlp2x_gelu"] = "mlp2x_gelu"  # LLaVA-1.5: Linear, GELU, Linear

    def problems(self) -> list[Problem]:
        return []


@dataclass(frozen=True)
class DataSection:
    root: str = ""  # folder the stage data files are relative to
    image_folder: str = ""
    template: str = "plain"  # conversation template of the base (stage I uses "plain")
    skip_bad_samples: bool = False  # false: stop at the first bad sample, naming it
    num_workers: int = 2

    def problems(self) -> list[Problem]:
        out: list[Problem] = _template_problems(self.template)
        if self.num_workers < 0:
            out.append(("num_workers", f"must be >= 0, got {self.num_workers}"))
        return out


@dataclass(frozen=True)
class TrackingSection:
    """Where a stage's step metrics go besides ``<stage>-state/metrics.jsonl`` (rank 0 only)."""

    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    project: str = ""  # wandb project (default: the recipe's name)

    def problems(self) -> list[Problem]:
        return []


@dataclass(frozen=True)
class StageSection:
    """Training settings of one stage (Table 9)."""

    trainable: tuple[str, ...]
    data: tuple[str, ...]  # LLaVA-JSON files, mixed (relative to data.root)
    lr: float
    global_batch_size: int
    per_device_batch_size: int
    template: str = ""  # overrides data.template for this stage ("plain" in stage I)
    image_aspect_ratio: Literal["pad", "resize"] = "pad"  # pad to square with the mean colour
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = 0  # 0 = run the full epochs
    max_length: int = 2048
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    gradient_checkpointing: bool = True
    max_grad_norm: float = 1.0
    save_steps: int = 0  # 0 = only at the end
    save_total_limit: int = 2  # complete checkpoints kept in <stage>-state; 0 = all
    # Batches of one modality (image-text or text-only) and similar lengths, as the official
    # stage II/III scripts (LLaVA's group_by_modality_length).
    group_by_modality_length: bool = False
    # Padding-free micro-batches: the micro-batch's samples laid end to end in one row, position
    # ids restarting per sample, attention kept inside each sample (data/preprocess.py).
    packing: bool = False
    seed: int = 42

    def problems(self) -> list[Problem]:
        out: list[Problem] = _template_problems(self.template) if self.template else []
        unknown = [p for p in self.trainable if p not in TRAINABLE_PARTS]
        if unknown:
            out.append(
                ("trainable", f"unknown part(s) {unknown}; known: {', '.join(TRAINABLE_PARTS)}")
            )
        if not self.trainable:
            out.append(("trainable", "is empty: a stage must train something"))
        if not self.data:
            out.append(("data", "is empty: a stage needs at least one data file"))
        if not math.isfinite(self.lr) or self.lr <= 0:
            out.append(("lr", f"must be > 0, got {self.lr}"))
        if not 0.0 <= self.warmup_ratio < 1.0:
            out.append(("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"))
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            out.append(("weight_decay", f"must be a finite number >= 0, got {self.weight_decay}"))
        if not math.isfinite(self.epochs) or self.epochs <= 0:
            out.append(("epochs", f"must be a finite number > 0, got {self.epochs}"))
        for key in ("max_steps", "save_steps", "save_total_limit"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0, got {getattr(self, key)}"))
        for key in ("global_batch_size", "per_device_batch_size", "max_length"):
            if getattr(self, key) <= 0:
                out.append((key, f"must be positive, got {getattr(self, key)}"))
        if (
            self.global_batch_size > 0
            and self.per_device_batch_size > 0
            and self.global_batch_size % self.per_device_batch_size
        ):
            out.append(
                (
                    "global_batch_size",
                    f"{self.global_batch_size} is not a multiple of "
                    f"per_device_batch_size {self.per_device_batch_size}",
                )
            )
        if self.offload_optimizer and self.zero_stage < 2:
            out.append(("offload_optimizer", f"needs zero_stage 2 or 3, got {self.zero_stage}"))
        if not math.isfinite(self.max_grad_norm) or self.max_grad_norm < 0:
            out.append(("max_grad_norm", f"must be a finite number >= 0, got {self.max_grad_norm}"))
        return out


@dataclass(frozen=True)
class Stages:
    pretrain: StageSection | None = None
    instruct: StageSection | None = None
    moe_tune: StageSection | None = None

    def problems(self) -> list[Problem]:
        return []

    def present(self) -> dict[str, StageSection]:
        return {name: s for name in STAGE_NAMES if (s := getattr(self, name)) is not None}


@dataclass(frozen=True)
class PaperRef:
    """Where a recipe sits in the paper, for tables that compare against it."""

    table8_row: str = ""  # the exact "Name" of its Table 8 row, if it has one
    tables: tuple[str, ...] = ()  # e.g. ("Table 3", "Table 5d")
    note: str = ""

    def problems(self) -> list[Problem]:
        return []


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSection
    vision: VisionSection = field(default_factory=VisionSection)
    projector: ProjectorSection = field(default_factory=ProjectorSection)
    moe: MoEConfig | None = None  # the sparse architecture of stage III
    lora: LoraSection | None = None  # adapters instead of full training, in the stages it names
    data: DataSection = field(default_factory=DataSection)
    stages: Stages = field(default_factory=Stages)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    paper: PaperRef = field(default_factory=PaperRef)
    description: str = ""

    def problems(self) -> list[Problem]:
        """Checks that span sections; keys are full dotted TOML keys."""
        out: list[Problem] = []
        if self.moe is not None and self.model.num_layers > 0:  # else reported under [model]
            # The section's own checks ran when it was read; this adds the model's depth.
            own = set(self.moe.problems())
            out.extend(
                (f"moe.{key}", message)
                for key, message in self.moe.problems(self.model.num_layers)
                if (key, message) not in own
            )
        if self.vision.path and not self.model.path:
            out.append(
                (
                    "vision.path",
                    "is set but model.path is empty: a real run starts from both local "
                    "checkpoints (without model.path stage I builds a random model and would "
                    "ignore the vision tower); set model.path too, or leave vision.path empty",
                )
            )
        if self.model.base and self.stages.pretrain is not None:
            out.append(
                (
                    "stages.pretrain",
                    f"model.base is {self.model.base!r}: the recipe starts from a trained VLM; "
                    "stage I trains a new projector from scratch — not for a whole-VLM recipe",
                )
            )
        for name, stage in self.stages.present().items():
            sparse_parts = [p for p in stage.trainable if p in SPARSE_ONLY_PARTS]
            if sparse_parts and (name != "moe_tune" or self.moe is None):
                why = (
                    "the recipe has no [moe] section"
                    if self.moe is None
                    else ("only stage moe_tune trains a sparse model")
                )
                out.append(
                    (f"stages.{name}.trainable", f"{sparse_parts} need a sparse model: {why}")
                )
        out.extend(self._lora_problems())
        return out

    def _lora_problems(self) -> list[Problem]:
        from moetool.models.parts import expand_parts

        lora = self.lora
        if lora is None:
            return []
        out: list[Problem] = []
        unknown = [s for s in lora.stages if s not in STAGE_NAMES]
        if unknown:
            out.append(
                ("lora.stages", f"unknown stage(s) {unknown}; known: {', '.join(STAGE_NAMES)}")
            )
        present = self.stages.present()
        absent = [s for s in lora.stages if s in STAGE_NAMES and s not in present]
        if absent:
            out.append(("lora.stages", f"{absent} have no [stages.<name>] section in the recipe"))
        targets = expand_parts(lora.targets) - {"routers"}  # reported in the section itself
        for name in lora.stages:
            stage = present.get(name)
            if stage is None:
                continue
            if "experts" in lora.targets and (name != "moe_tune" or self.moe is None):
                out.append(
                    ("lora.targets", f"'experts' in stage {name}: only a sparse stage III has them")
                )
            both = sorted(expand_parts(stage.trainable) & targets)
            if both:
                out.append(
                    (
                        f"stages.{name}.trainable",
                        f"{both} are also lora.targets: a part trains in full or through "
                        "adapters, not both",
                    )
                )
            if name == "moe_tune" and self.moe is not None and "routers" not in stage.trainable:
                out.append(
                    (
                        f"stages.{name}.trainable",
                        "lacks 'routers': with lora the new routers train in full (Eq. 5); "
                        'set trainable = ["routers"]',
                    )
                )
            quantized = sorted(expand_parts(stage.trainable) & set(QUANTIZED_PARTS))
            if lora.quantize != "none" and quantized:
                out.append(
                    (
                        f"stages.{name}.trainable",
                        f"{quantized} are stored in {lora.quantize} with lora.quantize and "
                        "cannot train in full",
                    )
                )
            if lora.quantize != "none" and stage.zero_stage == 3:
                out.append(
                    (
                        "lora.quantize",
                        f"is {lora.quantize!r} but stages.{name}.zero_stage is 3: quantized "
                        "weights are not partitioned; use zero_stage 2",
                    )
                )
        return out

    def lora_for(self, stage_name: str) -> LoraSection | None:
        """The ``[lora]`` section when ``stage_name`` trains adapters, else None."""
        if self.lora is not None and stage_name in self.lora.stages:
            return self.lora
        return None

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        if self.moe is None:
            return ()
        return self.moe.layer_indices(self.model.num_layers)
