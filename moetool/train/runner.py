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
from typing import NoReturn

from moetool.io import describe_write_error, inputs_inside
from moetool.recipe.load import recipe_to_dict
from moetool.recipe.schema import Recipe, StageSection
from moetool.train import checkpoints
from moetool.train.checkpoints import (
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
)
from moetool.train.ranks import (
    ensure_distributed_env,
    failures_on_any_rank,
    gather_counts,
    init_distributed,
    sum_over_ranks,
)
from moetool.train.start import check_stage_attention, default_init, load_start_model
from moetool.train.tracking import NoTracker, TrackingError, check_available, open_tracker

__all__ = ["StageResult", "StepMetrics", "TrainingError", "run_stage"]


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
    out = run_dir / stage_name
    state = run_dir / f"{stage_name}-state"
    if out.exists() and not overwrite:
        raise TrainingError(f"{out} already exists (pass --overwrite to train it again)")
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
    data_root = Path(recipe_dir) / recipe.data.root
    data_files = [data_root / f for f in stage.data]
    image_folder = Path(recipe_dir) / recipe.data.image_folder
    # The stage writes (and --overwrite replaces) only <stage>/ and <stage>-state/: never
    # where one of its inputs lies.
    for written in (out, state):
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
    ``run_dir/<stage>-state`` (DeepSpeed checkpoints, metrics.jsonl).

    ``stop_after`` ends the process's work after that many optimizer steps without writing the
    final checkpoint (a deliberate interruption, for resume tests). ``on_note`` gets, on rank 0,
    a line at the start when the recipe's per-device batch changes for this world size."""
    run_dir = Path(run_dir)
    plan = _plan_stage(recipe, stage_name, run_dir, init, resume, overwrite, recipe_dir)
    stage, out, state = plan.stage, plan.out, plan.state

    ensure_distributed_env()
    import deepspeed
    import torch

    from moetool.data.llava_json import load_llava_json
    from moetool.data.pipeline import (
        Collate,
        EncodedDataset,
        StageBatchSampler,
        first_good,
        make_loader,
        reason_of,
    )
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
    template = get_template(stage.template or recipe.data.template)
    preprocessor = Preprocessor(
        processor,
        template,
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
    if stage.gradient_checkpointing:
        enable_activation_checkpointing(model)
    # No KV cache in training: the language model reads its own config's flag, and with a
    # cache transformers ignores packed position ids (samples would attend to each other).
    model.config.use_cache = model.config.get_text_config().use_cache = False

    micro_steps = ds_config["gradient_accumulation_steps"]
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
    aux_layers = len(getattr(model, "moe_blocks", lambda: [])())
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
    )
    collator = Collate(processor.tokenizer.pad_token_id, stage.packing)

    def stand_in(micro_step: int) -> dict | None:
        """A good micro-batch for the zero-weight pass of a rank that has met none yet: the
        first sample that encodes from its micro-batch ``micro_step`` of the epoch on (the
        sampler's order is untouched); ``None`` when no sample of the stage is good."""
        item = first_good(dataset, sampler.lookahead(sampler.epoch, micro_step))
        return None if item is None else collator.batch([item])

    skip_bad = recipe.data.skip_bad_samples
    skipped: Counter[str] = Counter()
    if rank == 0:  # every rank parsed the same files; rank 0 counts what parsing left out
        skipped.update(reason_of(message) for message in parse_skipped)
    done_this_run = 0
    pending: str | None = None  # a failed write on rank 0, reported at the next agreement
    batches, batches_epoch, last_good = None, None, None
    tracker = NoTracker()
    if rank == 0:
        tracker = open_tracker(
            recipe.tracking.report_to,
            state,
            recipe.tracking.project or recipe.name,
            f"{run_dir.name}/{stage_name}",
            recipe_to_dict(recipe),
            first_step=step + 1,
        )

    def fail(message: str) -> NoReturn:
        """Every rank stops here with the same message, naming where to resume from."""
        raise TrainingError(
            f"stage {stage_name}: {message}; " + last_good_checkpoint(state / "checkpoints")
        )

    try:
        engine.train()
        while step < total_steps:
            epoch, within = divmod(step, steps_per_epoch)
            if batches_epoch != epoch:  # skip what a resumed run already trained on, unloaded
                sampler.set_epoch(epoch, within * micro_steps)
                batches, batches_epoch = iter(loader), epoch
            started = time.perf_counter()
            totals, last_good = _optimizer_step(
                engine, batches, micro_steps, aux_layers, skip_bad, skipped, last_good,
                pending, rank, world, fail, step + 1, stand_in, within * micro_steps,
            )  # fmt: skip
            step += 1
            done_this_run += 1
            elapsed = time.perf_counter() - started
            metrics = StepMetrics(
                step,
                total_steps,
                totals.loss,
                totals.lm_loss,
                totals.aux_loss if aux_layers else None,
                scheduler.get_last_lr()[0],
                totals.tokens * world / elapsed,
                sum_over_ranks(totals.skipped, world),
            )
            if rank == 0:
                try:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(metrics.__dict__) + "\n")
                except OSError as err:  # the ranks learn it at the next check
                    pending = f"could not write {metrics_path}: {describe_write_error(err)}"
                try:
                    tracker.log(metrics.tracked(), step)
                except Exception as err:  # the run goes on: metrics.jsonl has every step
                    warnings.warn(
                        f"tracking.report_to = {recipe.tracking.report_to!r} failed at step "
                        f"{step} ({err}); tracking stops, {metrics_path} keeps every step",
                        stacklevel=1,
                    )
                    tracker = NoTracker()
            if on_step is not None and rank == 0:
                on_step(metrics)
            if stage.save_steps and step % stage.save_steps == 0 and step < total_steps:
                failed = save_checkpoint(
                    engine, state / "checkpoints", step, plan.run, stage.save_total_limit, pending
                )
                if failed:
                    fail(failed)
            if stop_after is not None and done_this_run >= stop_after:
                break
        else:
            failed = save_final(
                engine, model, processor, recipe, stage_name, out, overwrite, pending
            )
            if failed:
                raise TrainingError(
                    f"stage {stage_name}: {failed}; "
                    + keep_trained_state(engine, state / "checkpoints", step, plan.run, stage)
                )
    finally:
        tracker.close()

    skipped = gather_counts(skipped, world)
    torch.distributed.barrier()  # every rank returns after rank 0 has written its files
    return StageResult(
        stage_name, out, step, *_first_last(metrics_path), metrics_path, dict(skipped)
    )


@dataclass
class _StepTotals:
    """One optimizer step's means over its micro-batches (skipped ones weigh 0)."""

    loss: float = 0.0
    lm_loss: float = 0.0
    aux_loss: float = 0.0  # per MoE layer
    tokens: int = 0
    skipped: int = 0  # bad samples skipped on this rank


def _optimizer_step(
    engine, batches, micro_steps, aux_layers, skip_bad, skipped, last_good, pending, rank, world,
    fail, step, stand_in, first_micro,
):  # fmt: skip
    """One optimizer step over ``micro_steps`` micro-batches (DeepSpeed accumulates them; the
    first is micro-batch ``first_micro`` of the epoch).

    A bad sample stops every rank (``fail``) unless ``skip_bad``: then it is counted in
    ``skipped`` and a micro-batch with no good sample left is a zero-weight pass over
    ``last_good`` (the last good micro-batch) or, on a rank that has met none yet (the first
    steps, or a resumed run), over ``stand_in(micro)``; so every rank runs the same forward and
    backward passes and the ranks' collectives stay in step. Only when no sample of the stage is
    good does every rank stop. A failure pending on rank 0 or a non-finite loss on any rank
    stops every rank too. Returns the step's totals and the new ``last_good``."""
    import torch

    from moetool.data.pipeline import batch_tokens

    totals = _StepTotals()
    for micro in range(first_micro, first_micro + micro_steps):
        batch, bad = next(batches)
        problem, weight = None, 1.0
        if bad and not skip_bad:
            problem = bad[0].message
        elif bad:
            skipped.update(b.reason for b in bad)
            totals.skipped += len(bad)
            if batch is None:  # nothing left: a zero-weight pass keeps the ranks in step
                if last_good is None:
                    last_good = stand_in(micro)
                if last_good is None:
                    problem = (
                        "no sample of the stage's data can be used: every one is bad (this "
                        f"micro-batch's first: {bad[0].message})"
                    )
                batch, weight = last_good, 0.0
        # every rank stops together (a bad sample here, a failed metrics write on rank 0)
        failed = failures_on_any_rank(problem or pending, rank, world)
        if failed:
            fail(failed)
        if weight:
            last_good = batch
            totals.tokens += batch_tokens(batch)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        outputs = engine(**batch)
        loss = outputs.loss
        bad_loss = None if torch.isfinite(loss) else f"non-finite loss ({loss.item()})"
        failed = failures_on_any_rank(bad_loss, rank, world)
        if failed:
            fail(f"{failed} at step {step}")
        engine.backward(loss * weight if weight != 1.0 else loss)
        engine.step()
        totals.loss += weight * loss.item() / micro_steps
        lm = getattr(outputs, "lm_loss", None)
        totals.lm_loss += weight * (lm if lm is not None else loss).item() / micro_steps
        aux = getattr(outputs, "aux_loss", None)
        if aux is not None:
            totals.aux_loss += weight * aux.item() / aux_layers / micro_steps
    return totals, last_good


def _first_last(metrics_path: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return (rows[0]["loss"], rows[-1]["loss"]) if rows else (math.nan, math.nan)
