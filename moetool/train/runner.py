"""One loop for the three stages of MoE-Tuning, on DeepSpeed ZeRO.

Stage I (``pretrain``) trains the projector, stage II (``instruct``) the LLM and projector, stage
III (``moe_tune``) the FFNs and routers of the sparse model; the recipe's ``trainable`` list
decides. Loss = LM loss + alpha * aux loss (Eq. 7), computed by the sparse model itself.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from moetool.io import describe_write_error, inputs_inside
from moetool.models.lora import LoraError, check_quantization
from moetool.recipe.load import recipe_to_dict
from moetool.recipe.schema import Recipe, StageSection
from moetool.train import checkpoints
from moetool.train.checkpoints import (
    final_outputs,
    keep_trained_state,
    last_good_checkpoint,
    resume_point,
    save_checkpoint,
    save_final,
)
from moetool.train.engine import (
    TrainingError,
    batch_plan_note,
    build_optimizer,
    deepspeed_config,
    enable_activation_checkpointing,
    lr_lambda,
    micro_batch_plan,
    partitioned_loading,
    stage_dtype,
)
from moetool.train.ranks import (
    agree_on_step,
    ensure_distributed_env,
    gather_counts,
    init_distributed,
)
from moetool.train.start import (
    check_stage_attention,
    check_whole_vlm_stage,
    default_init,
    load_start_model,
)
from moetool.train.tracking import (
    NoTracker,
    Tracker,
    TrackingError,
    check_available,
    open_tracker,
)

if TYPE_CHECKING:
    from moetool.data.pipeline import EncodedDataset, StageBatchSampler

__all__ = [
    "StageParts",
    "StageResult",
    "StepMetrics",
    "TrainingError",
    "run_stage",
    "setup_stage",
    "train",
]


@dataclass(frozen=True)
class StageResult:
    stage: str
    checkpoint: Path  # the final HF checkpoint
    steps: int
    loss_first: float
    loss_last: float
    metrics: Path
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples skipped, by reason


@dataclass(frozen=True)
class StepMetrics:
    step: int
    total_steps: int
    loss: float
    lm_loss: float
    aux_loss: float | None  # per MoE layer mean (1.0 = balanced)
    lr: float
    tokens_per_s: float
    skipped: int = 0  # bad samples skipped in this step, all ranks

    def tracked(self) -> dict[str, float]:
        """The step's scalars as trackers show them (TensorBoard tags, wandb keys)."""
        out = {
            "train/loss": self.loss,
            "train/lm_loss": self.lm_loss,
            "train/lr": self.lr,
            "train/tokens_per_s": self.tokens_per_s,
            "train/skipped_samples": float(self.skipped),
        }
        if self.aux_loss is not None:
            out["train/aux_loss_per_layer"] = self.aux_loss
        return out


@dataclass(frozen=True)
class _StagePlan:
    """What a stage reads and writes, checked before any process starts work."""

    stage: StageSection
    out: Path  # the final HF checkpoint
    state: Path  # DeepSpeed checkpoints, metrics.jsonl
    init: Path | None
    data_files: list[Path]
    image_folder: Path
    run: dict  # the run's fingerprint (checkpoints.fingerprint)
    resume_from: tuple[int, Path] | None


def _plan_stage(
    recipe: Recipe,
    stage_name: str,
    run_dir: Path,
    init: str | Path | None,
    resume: bool,
    overwrite: bool,
    recipe_dir: str | Path,
) -> _StagePlan:
    """The stage's inputs and outputs; a ``TrainingError`` for a missing section, input or data
    file, an output that would overwrite an earlier run or hold an input, an attention
    implementation or a tracker unavailable here, or a ``--resume`` that does not match its
    checkpoint."""
    stage: StageSection | None = getattr(recipe.stages, stage_name)
    if stage is None:
        raise TrainingError(f"the recipe has no [stages.{stage_name}] section")
    check_stage_attention(recipe, stage_name)  # before anything is read or written
    lora = recipe.lora_for(stage_name)
    if lora is not None:
        try:
            check_quantization(lora)
        except LoraError as err:
            raise TrainingError(str(err)) from None
    out = run_dir / stage_name
    state = run_dir / f"{stage_name}-state"
    for written in final_outputs(out, lora.save if lora else None):
        if written.exists() and not overwrite:
            raise TrainingError(f"{written} already exists (pass --overwrite to train it again)")
    trained_before = (state / "checkpoints").exists() or (
        (state / "metrics.jsonl").exists() and (state / "metrics.jsonl").stat().st_size > 0
    )
    if trained_before and not resume and not overwrite:
        raise TrainingError(
            f"{state} holds an earlier run of this stage: pass --resume to "
            "continue it or --overwrite to start again"
        )
    if init is not None:
        init = Path(init)
    elif (init := default_init(run_dir, stage_name, recipe)) is not None and not init.exists():
        raise TrainingError(
            f"{init} does not exist: run stage {init.name} of this recipe with "
            f"--out {run_dir} first, or pass --init CHECKPOINT"
        )
    if recipe.model.base:
        check_whole_vlm_stage(recipe, stage_name, init)
        init = init or Path(recipe.model.path)
    data_root = Path(recipe_dir) / recipe.data.root
    data_files = [data_root / f for f in stage.data]
    image_folder = Path(recipe_dir) / recipe.data.image_folder
    # The stage writes (and --overwrite replaces) only <stage>/ and <stage>-state/: never
    # where one of its inputs lies.
    for written in (*final_outputs(out, lora.save if lora else None), state):
        inside = inputs_inside(written, [init, *data_files, image_folder])
        if inside:
            raise TrainingError(
                f"{written} (written by stage {stage_name}) contains its input "
                f"{', '.join(map(str, inside))}: choose another --out"
            )
    try:
        check_available(recipe.tracking.report_to)
    except TrackingError as err:
        raise TrainingError(str(err)) from None
    missing = [str(f) for f in data_files if not f.is_file()]
    if missing:
        raise TrainingError(f"stage {stage_name}: no such data file {', '.join(missing)}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:  # the global batch is the recipe's promise: refused only when no per-device batch keeps it
        micro_batch_plan(stage.global_batch_size, stage.per_device_batch_size, world_size)
    except TrainingError as err:
        raise TrainingError(f"stages.{stage_name}.{err}") from None
    run = checkpoints.fingerprint(recipe_to_dict(recipe), stage_name, data_files, world_size, init)
    resume_from = resume_point(state / "checkpoints", run) if resume else None
    return _StagePlan(stage, out, state, init, data_files, image_folder, run, resume_from)


@dataclass
class StageParts:
    """A stage set up to train (``setup_stage``): what ``train`` runs and the plain settings it
    needs. The recipe was taken apart in ``setup_stage``; nothing here refers to it."""

    name: str  # pretrain, instruct or moe_tune
    engine: Any  # DeepSpeed's engine: the model, optimizer and lr schedule
    model: Any  # the module the engine wraps, saved at the end
    processor: Any
    scheduler: Any  # the lr schedule the engine steps
    dataset: EncodedDataset
    sampler: StageBatchSampler
    loader: Any  # a DataLoader over the sampler's micro-batches
    tracker: Tracker  # rank 0's (NoTracker elsewhere)
    rank: int
    world: int
    out: Path  # the final HF checkpoint
    state: Path  # DeepSpeed checkpoints, metrics.jsonl
    run: dict  # the run's fingerprint, written with each checkpoint
    first_step: int  # optimizer steps already trained (those of a resumed checkpoint)
    total_steps: int
    steps_per_epoch: int
    micro_steps: int  # micro-batches per optimizer step (gradient accumulation)
    aux_layers: int  # MoE layers; 0 for a dense model
    skip_bad: bool  # data.skip_bad_samples
    save_steps: int
    save_total_limit: int
    overwrite: bool
    report_to: str  # the tracker's name, for its warning
    dtype: Any  # the stage's precision: the final checkpoint's dtype
    provenance: dict  # the final config's moetool block: version, stage, recipe, attention
    template: str  # the chat template the final tokenizer carries ("": the base's own)
    skipped: Counter[str]  # bad samples parsing left out (counted on rank 0), by reason
    seed: int  # each step's dropout is drawn from (seed, step, rank): a resumed run redraws it
    lora_save: str | None = None  # with adapters: "merged", "adapter" or "both"


def setup_stage(
    recipe: Recipe,
    stage_name: str,
    run_dir: str | Path,
    init: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    recipe_dir: str | Path = ".",
    on_note: Callable[[str], None] | None = None,
) -> StageParts:
    """Everything one stage of ``recipe`` trains with, before its first step: the checked plan
    (inputs, outputs, ``--overwrite``, ``--resume``), the process group, the starting model
    with its trainable parts, the DeepSpeed engine (resumed from the newest complete checkpoint
    with ``resume``), the data pipeline and rank 0's tracker. ``on_note`` gets, on rank 0, a
    line when the recipe's per-device batch changes for this world size. The recipe is taken
    apart here, once: ``train`` gets plain values."""
    run_dir = Path(run_dir)
    plan = _plan_stage(recipe, stage_name, run_dir, init, resume, overwrite, recipe_dir)
    stage, state = plan.stage, plan.state

    ensure_distributed_env()
    import deepspeed
    import torch

    from moetool._version import __version__
    from moetool.data.chat import ChatPreprocessor
    from moetool.data.llava_json import load_llava_json
    from moetool.data.pipeline import EncodedDataset, StageBatchSampler, make_loader, reason_of
    from moetool.data.preprocess import Preprocessor
    from moetool.data.templates import get_template
    from moetool.models.packed_attention import use_packed_sdpa
    from moetool.models.parts import set_trainable

    init_distributed()  # on a CPU without DeepSpeed's shm op (a minute's build)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds_config = deepspeed_config(stage, world, pin_memory=torch.cuda.is_available())
    note = batch_plan_note(stage_name, stage, world)
    if note and rank == 0 and on_note is not None:
        on_note(note)
    torch.manual_seed(stage.seed)
    samples, parse_skipped = load_llava_json(
        plan.data_files, plan.image_folder, recipe.data.skip_bad_samples
    )
    if not samples:
        raise TrainingError(f"stage {stage_name}: no training samples in {list(stage.data)}")
    created = not state.exists()
    torch.distributed.barrier()  # every rank has looked before rank 0 changes anything
    if rank == 0:
        if overwrite and not resume and state.exists():
            shutil.rmtree(state)  # --overwrite: the stage starts again; nothing old stays
        state.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    with partitioned_loading(ds_config):
        try:
            model, processor = load_start_model(recipe, stage_name, plan.init, state)
        except BaseException:
            if rank == 0 and created:  # a failed start leaves no state directory behind
                shutil.rmtree(state, ignore_errors=True)
            raise
    if recipe.model.base:  # the base's own processor and chat template, as published
        preprocessor = ChatPreprocessor(processor, stage.max_length)
    else:
        preprocessor = Preprocessor(
            processor,
            get_template(stage.template or recipe.data.template),
            model.config.image_seq_length,
            stage.max_length,
            stage.image_aspect_ratio,
        )
        # The stage's checkpoint carries the image processor its samples went through.
        processor.image_processor = preprocessor.image_processor
    if stage.packing:  # each sample's attention on its own, not the whole packed row
        use_packed_sdpa(model)
    trainable = set_trainable(model, stage.trainable)
    if not trainable:
        raise TrainingError(
            f"stages.{stage_name}.trainable {list(stage.trainable)} selects no "
            "parameter of this model"
        )
    aux_layers = len(getattr(model, "moe_blocks", lambda: [])())
    if stage.gradient_checkpointing:
        enable_activation_checkpointing(model)
    # No KV cache in training: the language model reads its own config's flag, and with a
    # cache transformers ignores packed position ids (samples would attend to each other).
    model.config.use_cache = model.config.get_text_config().use_cache = False
    lora = recipe.lora_for(stage_name)
    if lora is not None:  # adapters on lora.targets; the trainable parts train in full
        from moetool.models.lora import apply_lora

        try:
            model = apply_lora(model, lora, trainable)
        except LoraError as err:
            raise TrainingError(str(err)) from None

    steps_per_epoch = len(samples) // stage.global_batch_size
    if steps_per_epoch == 0:
        raise TrainingError(
            f"stage {stage_name}: {len(samples)} samples make no full global "
            f"batch of {stage.global_batch_size}"
        )
    total_steps = max(1, math.floor(steps_per_epoch * stage.epochs))
    if stage.max_steps:
        total_steps = min(total_steps, stage.max_steps)
    warmup = math.ceil(stage.warmup_ratio * total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(stage, params)  # DeepSpeed's CPU Adam with offload_optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(stage.lr_schedule, warmup, total_steps)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )

    step = 0
    metrics_path = state / "metrics.jsonl"
    if plan.resume_from is not None:
        resumed, path = plan.resume_from
        loaded, client = engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None or int(client["step"]) != resumed:
            raise TrainingError(f"--resume: DeepSpeed could not load the checkpoint {path}")
        step = resumed
        if rank == 0:
            checkpoints.truncate_metrics(metrics_path, step)  # one row per step
    elif rank == 0:
        metrics_path.write_text("")
    if recipe.data.num_workers > 0:
        # Fast tokenizers warn (and may deadlock) when used across fork; workers encode alone.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sampler = StageBatchSampler(
        samples,
        ds_config["train_micro_batch_size_per_gpu"],  # micro_batch_plan's, maybe not the recipe's
        rank,
        world,
        stage.seed,
        stage.group_by_modality_length,
        global_batch=stage.global_batch_size,
    )
    dataset = EncodedDataset(samples, preprocessor)
    loader = make_loader(
        dataset,
        sampler,
        processor.tokenizer.pad_token_id,
        recipe.data.num_workers,
        pin_memory=torch.cuda.is_available(),
        packing=stage.packing,
        features=bool(recipe.model.base),
    )
    skipped: Counter[str] = Counter()
    if rank == 0:  # every rank parsed the same files; rank 0 counts what parsing left out
        skipped.update(reason_of(message) for message in parse_skipped)
    snapshot = recipe_to_dict(recipe)
    tracker: Tracker = NoTracker()
    if rank == 0:
        tracker = open_tracker(
            recipe.tracking.report_to,
            state,
            recipe.tracking.project or recipe.name,
            f"{run_dir.name}/{stage_name}",
            snapshot,
            first_step=step + 1,
        )
    return StageParts(
        name=stage_name,
        engine=engine,
        model=model,
        processor=processor,
        scheduler=scheduler,
        dataset=dataset,
        sampler=sampler,
        loader=loader,
        tracker=tracker,
        rank=rank,
        world=world,
        out=plan.out,
        state=state,
        run=plan.run,
        first_step=step,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        micro_steps=ds_config["gradient_accumulation_steps"],
        aux_layers=aux_layers,
        skip_bad=recipe.data.skip_bad_samples,
        save_steps=stage.save_steps,
        save_total_limit=stage.save_total_limit,
        overwrite=overwrite,
        report_to=recipe.tracking.report_to,
        dtype=stage_dtype(stage),
        provenance={
            "version": __version__,
            "stage": stage_name,
            "recipe": snapshot,
            # What predict, eval and routing capture attend with unless told otherwise.
            "attn_implementation": recipe.model.attn_implementation,
        },
        template="" if recipe.model.base else recipe.data.template,
        skipped=skipped,
        seed=stage.seed,
        lora_save=lora.save if lora else None,
    )


def train(
    parts: StageParts,
    on_step: Callable[[StepMetrics], None] | None = None,
    stop_after: int | None = None,
) -> StageResult:
    """Train the stage ``setup_stage`` built, from its first step to its last, then write the
    final checkpoint; ``on_step`` gets each step's metrics on rank 0. ``stop_after`` ends the
    process's work after that many optimizer steps without writing the final checkpoint (a
    deliberate interruption, for resume tests).

    A step runs its passes with no host sync, reads its losses once, and agrees with the other
    ranks in one all-reduce (``agree_on_step``) before the optimizer updates: a non-finite loss
    on any rank, or a failed write pending on rank 0, stops every rank before the update. The
    next step's micro-batches are loaded before that agreement, so a bad sample among them stops
    every rank too, after this step is logged and saved, and no rank ever meets the next step
    with nothing to run while the others run theirs."""
    import torch

    p, engine = parts, parts.engine
    metrics_path = p.state / "metrics.jsonl"
    skipped = Counter(p.skipped)
    steps = _StepLoader(p, skipped)
    step, done_this_run, pending, tracker = p.first_step, 0, None, p.tracker

    def fail(message: str) -> NoReturn:
        """Every rank stops here with the same message, naming where to resume from."""
        raise TrainingError(
            f"stage {p.name}: {message}; " + last_good_checkpoint(p.state / "checkpoints")
        )

    try:
        engine.train()
        ahead = steps.load(step) if step < p.total_steps else _Step()
        _, stop, ahead_skipped = agree_on_step(None, ahead.problem, ahead.skipped, p.rank, p.world)
        if stop:
            fail(stop)
        while step < p.total_steps:
            current, current_skipped = ahead, ahead_skipped
            started = time.perf_counter()
            step += 1
            done_this_run += 1
            losses = []
            torch.manual_seed(_step_seed(p.seed, step, p.rank))  # dropout, as a resumed run
            for i, (batch, weight) in enumerate(current.passes):
                outputs = engine(**{k: v.to(engine.device) for k, v in batch.items()})
                engine.backward(outputs.loss * weight if weight != 1.0 else outputs.loss)
                losses.append(_loss_terms(outputs))
                if i + 1 < len(current.passes):
                    engine.step()  # inside the accumulation: DeepSpeed counts, nothing updates
            values = torch.stack(losses).tolist()  # the step's one read of its losses
            goes_on = step < p.total_steps and (stop_after is None or done_this_run < stop_after)
            ahead = steps.load(step) if goes_on else _Step()
            failed, stop, ahead_skipped = agree_on_step(
                pending or _non_finite(values, step), ahead.problem, ahead.skipped, p.rank, p.world
            )
            if failed:
                fail(failed)
            engine.step()
            weights = [weight for _, weight in current.passes]
            loss, lm_loss, aux = _step_means(values, weights, p.micro_steps, p.aux_layers)
            metrics = StepMetrics(
                step,
                p.total_steps,
                loss,
                lm_loss,
                aux if p.aux_layers else None,
                p.scheduler.get_last_lr()[0],
                current.tokens * p.world / (time.perf_counter() - started),
                current_skipped,
            )
            if p.rank == 0:
                try:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(metrics.__dict__) + "\n")
                except OSError as err:  # the ranks learn it at the next agreement
                    pending = f"could not write {metrics_path}: {describe_write_error(err)}"
                try:
                    tracker.log(metrics.tracked(), step)
                except Exception as err:  # the run goes on: metrics.jsonl has every step
                    warnings.warn(
                        f"tracking.report_to = {p.report_to!r} failed at step {step} ({err}); "
                        f"tracking stops, {metrics_path} keeps every step",
                        stacklevel=1,
                    )
                    tracker = NoTracker()
                if on_step is not None:
                    on_step(metrics)
            if p.save_steps and step % p.save_steps == 0 and step < p.total_steps:
                failed = save_checkpoint(
                    engine, p.state / "checkpoints", step, p.run, p.save_total_limit, pending
                )
                if failed:
                    fail(failed)
            if stop:  # a bad sample in the next step's micro-batches
                fail(stop)
            if stop_after is not None and done_this_run >= stop_after:
                break
        else:
            failed = save_final(
                engine, p.model, p.processor, p.out, p.overwrite, p.dtype, p.provenance,
                p.template, pending, p.lora_save,
            )  # fmt: skip
            if failed:
                kept = keep_trained_state(
                    engine, p.state / "checkpoints", step, p.run, p.save_total_limit
                )
                raise TrainingError(f"stage {p.name}: {failed}; {kept}")
    finally:
        tracker.close()

    skipped = gather_counts(skipped, p.world)
    torch.distributed.barrier()  # every rank returns after rank 0 has written its files
    written = final_outputs(p.out, p.lora_save)[0]  # the merged checkpoint, else the adapter
    first, last = _first_last(metrics_path)
    return StageResult(p.name, written, step, first, last, metrics_path, dict(skipped))


def _step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a step's random draws (dropout) on a rank: the same in a resumed run."""
    return (seed * 1_000_003 + step) * 4099 + rank


def run_stage(
    recipe: Recipe,
    stage_name: str,
    run_dir: str | Path,
    init: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    recipe_dir: str | Path = ".",
    on_step: Callable[[StepMetrics], None] | None = None,
    stop_after: int | None = None,
    on_note: Callable[[str], None] | None = None,
) -> StageResult:
    """Train one stage of ``recipe``; writes ``run_dir/<stage>`` (HF checkpoint) and
    ``run_dir/<stage>-state`` (DeepSpeed checkpoints, metrics.jsonl): ``setup_stage`` then
    ``train``.

    ``stop_after`` ends the process's work after that many optimizer steps without writing the
    final checkpoint (a deliberate interruption, for resume tests). ``on_note`` gets, on rank 0,
    a line at the start when the recipe's per-device batch changes for this world size."""
    parts = setup_stage(recipe, stage_name, run_dir, init, resume, overwrite, recipe_dir, on_note)
    return train(parts, on_step=on_step, stop_after=stop_after)


@dataclass
class _Step:
    """One optimizer step's micro-batches as this rank runs them, loaded before any pass."""

    passes: list[tuple[dict, float]] = field(default_factory=list)  # weight 0: a stand-in
    tokens: int = 0  # tokens of the weighted passes (tokens/s)
    skipped: int = 0  # bad samples skipped on this rank
    problem: str | None = None  # why every rank stops before running the step


class _StepLoader:
    """This rank's micro-batches, one optimizer step at a time, with bad samples dealt with as
    ``data.skip_bad_samples`` says."""

    def __init__(self, parts: StageParts, skipped: Counter[str]):
        self.parts, self.skipped = parts, skipped
        self.batches, self.epoch, self.last_good = None, None, None

    def load(self, done: int) -> _Step:
        """The micro-batches of step ``done + 1``. A bad sample stops every rank (``problem``)
        unless ``skip_bad``: then it is counted in ``skipped``, and a micro-batch with no good
        sample left becomes a zero-weight pass over the last good micro-batch or, on a rank that
        has met none yet (the first steps, or a resumed run), over the next sample that encodes;
        so every rank runs the same passes and the ranks' collectives stay in step. Only when no
        sample of the stage is good is that a problem too."""
        from moetool.data.pipeline import batch_tokens

        p = self.parts
        epoch, within = divmod(done, p.steps_per_epoch)
        if self.epoch != epoch:  # skip what a resumed run already trained on, unloaded
            p.sampler.set_epoch(epoch, within * p.micro_steps)
            self.batches, self.epoch = iter(p.loader), epoch
        step = _Step()
        for micro in range(within * p.micro_steps, (within + 1) * p.micro_steps):
            batch, bad = next(self.batches)
            if bad and not p.skip_bad:
                step.problem = bad[0].message
                return step
            self.skipped.update(b.reason for b in bad)
            step.skipped += len(bad)
            weight = 1.0
            if batch is None:  # nothing left: a zero-weight pass keeps the ranks in step
                if self.last_good is None:
                    self.last_good = self._stand_in(epoch, micro)
                if self.last_good is None:
                    step.problem = (
                        "no sample of the stage's data can be used: every one is bad (this "
                        f"micro-batch's first: {bad[0].message})"
                    )
                    return step
                batch, weight = self.last_good, 0.0
            else:
                self.last_good = batch
                step.tokens += batch_tokens(batch)
            step.passes.append((batch, weight))
        return step

    def _stand_in(self, epoch: int, micro: int) -> dict | None:
        """A good micro-batch for the zero-weight pass of a rank that has met none yet: the
        first sample that encodes from its micro-batch ``micro`` of ``epoch`` on (the sampler's
        order is untouched); ``None`` when no sample of the stage is good."""
        from moetool.data.pipeline import first_good

        p = self.parts
        item = first_good(p.dataset, p.sampler.lookahead(epoch, micro))
        # collated as the loader collates the stage's micro-batches (padded or packed)
        return None if item is None else p.loader.collate_fn.batch([item])


def _loss_terms(outputs):
    """A pass's loss, LM loss and aux loss (0 for a dense model) as one small device tensor,
    read with the step's other passes, once."""
    import torch

    loss = outputs.loss.detach().float()
    lm = getattr(outputs, "lm_loss", None)
    aux = getattr(outputs, "aux_loss", None)
    return torch.stack(
        [
            loss,
            loss if lm is None else lm.detach().float(),
            torch.zeros_like(loss) if aux is None else aux.detach().float(),
        ]
    )


def _non_finite(values: list[list[float]], step: int) -> str | None:
    """This rank's first non-finite loss of the step, in words."""
    bad = next((loss for loss, _, _ in values if not math.isfinite(loss)), None)
    return None if bad is None else f"non-finite loss ({bad}) at step {step}"


def _step_means(
    values: list[list[float]], weights: list[float], micro_steps: int, aux_layers: int
) -> tuple[float, float, float]:
    """The step's loss, LM loss and aux loss per MoE layer: means over its micro-batches, a
    stand-in pass weighing 0 (summed in the order and float arithmetic of the per-pass reads
    they replace, so the figures are those of earlier versions)."""
    loss = lm_loss = aux_loss = 0.0
    for weight, (pass_loss, pass_lm, pass_aux) in zip(weights, values, strict=True):
        loss += weight * pass_loss / micro_steps
        lm_loss += weight * pass_lm / micro_steps
        if aux_layers:
            aux_loss += weight * pass_aux / aux_layers / micro_steps
    return loss, lm_loss, aux_loss


def _first_last(metrics_path: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return (rows[0]["loss"], rows[-1]["loss"]) if rows else (math.nan, math.nan)
