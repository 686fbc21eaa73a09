"""One loop for the three stages of MoE-Tuning, on DeepSpeed ZeRO.

Stage I (``pretrain``) trains the projector, stage II (``instruct``) the LLM and projector, stage
III (``moe_tune``) the FFNs and routers of the sparse model; the recipe's ``trainable`` list
decides. Loss = LM loss + alpha * aux loss (Eq. 7), computed by the sparse model itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moetool.io import describe_write_error, held_output, inputs_inside
from moetool.recipe.load import recipe_to_dict
from moetool.recipe.schema import Recipe, StageSection
from moetool.train import checkpoints
from moetool.train.tracking import NoTracker, TrackingError, check_available, open_tracker

STAGE_INPUTS = {"pretrain": (), "instruct": ("pretrain",), "moe_tune": ("instruct", "pretrain")}


class TrainingError(RuntimeError):
    pass


def enable_activation_checkpointing(model, reentrant: bool = False) -> None:
    """Activation (gradient) checkpointing of every decoder layer (non-reentrant unless asked),
    through transformers' ``activation_checkpointing_enable`` where it exists; the older name,
    ``gradient_checkpointing_enable``, warns that it goes in transformers v6. The sparse model
    gives the same loss and gradients either way."""
    kwargs = {"use_reentrant": reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        enable(activation_checkpointing_kwargs=kwargs)


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


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup to the peak, then cosine or linear decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _ensure_distributed_env() -> None:
    """A single process without a launcher still runs as a one-rank world."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )


def deepspeed_config(stage: StageSection, world_size: int) -> dict:
    per_step = stage.per_device_batch_size * world_size
    if stage.global_batch_size % per_step:
        raise TrainingError(
            f"global_batch_size {stage.global_batch_size} is not a multiple of per-device batch "
            f"{stage.per_device_batch_size} x world size {world_size}"
        )
    zero: dict = {"stage": stage.zero_stage}
    if stage.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_batch_size": stage.global_batch_size,
        "train_micro_batch_size_per_gpu": stage.per_device_batch_size,
        "gradient_accumulation_steps": stage.global_batch_size // per_step,
        "gradient_clipping": stage.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": stage.precision == "bf16"},
        "fp16": {"enabled": stage.precision == "fp16"},
        "zero_force_ds_cpu_optimizer": False,  # our torch AdamW also runs on offloaded states
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def default_init(run_dir: Path, stage: str, recipe: Recipe) -> Path | None:
    """The checkpoint a stage starts from: the previous stage's output in the same run."""
    for previous in STAGE_INPUTS[stage]:
        if getattr(recipe.stages, previous) is not None:
            return run_dir / previous
    return None


PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def stage_dtype(stage: StageSection):
    """The torch dtype of the stage's ``precision``: what it loads and saves in."""
    import torch

    return getattr(torch, PRECISION_DTYPES[stage.precision])


@contextlib.contextmanager
def partitioned_loading(ds_config: dict) -> Iterator[None]:
    """Under ZeRO-3, models that ``from_pretrained`` builds in the block are created partitioned
    over the ranks (transformers' DeepSpeed integration: ``HfDeepSpeedConfig`` makes it use
    ``deepspeed.zero.Init``; only rank 0 reads the weights), so no rank ever holds the whole
    model. The setting is process-wide in transformers: it is undone when the block ends (a
    quickstart runs every stage in one process)."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    held = HfDeepSpeedConfig(ds_config)  # transformers keeps a weak reference: hold it
    try:
        yield
    finally:
        del held
        unset_hf_deepspeed_config()


def _load_start_model(recipe: Recipe, stage_name: str, init: Path | None, work: Path):
    """The stage's starting model and processor, in the stage's precision (a bf16 stage never
    materialises fp32 weights); partitioned when called under ``partitioned_loading``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.integrations import is_deepspeed_zero3_enabled

    from moetool.models.build import build_lvlm_from_parts
    from moetool.models.registration import register
    from moetool.tiny import build_random_lvlm

    register()  # the sparse model type, for the Auto classes

    stage: StageSection = getattr(recipe.stages, stage_name)
    dtype = stage_dtype(stage)
    if init is None:
        if stage_name != "pretrain":
            raise TrainingError(f"stage {stage_name} needs a checkpoint to start from (--init)")
        if recipe.model.path:
            return build_lvlm_from_parts(recipe.model, recipe.vision, dtype=dtype)
        model, processor = build_random_lvlm(recipe, seed=stage.seed)
        return model.to(dtype), processor
    if not (init / "config.json").is_file():
        raise TrainingError(f"--init {init}: not a checkpoint directory (no config.json)")
    config = json.loads((init / "config.json").read_text())
    sparse = config.get("model_type") == "moetool_llava"
    if stage_name == "moe_tune" and recipe.moe is not None and not sparse:
        # Upcycle on the fly from the recipe's [moe] section (exact copies of the FFNs).
        from moetool.upcycle import upcycle_checkpoint

        target = work / "upcycled"
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:  # one process writes, the others wait for it
            upcycle_checkpoint(init, target, recipe.moe, seed=stage.seed, overwrite=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        init = target
    model = AutoModelForImageTextToText.from_pretrained(init, dtype=dtype)
    conversions = getattr(model, "_weight_conversions", None)
    if conversions and is_deepspeed_zero3_enabled():
        # transformers (5.24)'s ZeRO-3 load keeps every key renaming it tried, where its whole-
        # model load keeps only those that matched; save_pretrained reverses them all and would
        # write doubled prefixes (language_model.model.model.*). Keep the used ones, as the
        # whole-model load does (the ZeRO-3 training test compares the saved key names).
        model._weight_conversions = [c for c in conversions if c.was_used()]
    return model, AutoProcessor.from_pretrained(init)


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
) -> StageResult:
    """Train one stage of ``recipe``; writes ``run_dir/<stage>`` (HF checkpoint) and
    ``run_dir/<stage>-state`` (DeepSpeed checkpoints, metrics.jsonl).

    ``stop_after`` ends the process's work after that many optimizer steps without writing the
    final checkpoint (a deliberate interruption, for resume tests)."""
    stage: StageSection | None = getattr(recipe.stages, stage_name)
    if stage is None:
        raise TrainingError(f"the recipe has no [stages.{stage_name}] section")
    run_dir = Path(run_dir)
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
    run = checkpoints.fingerprint(recipe_to_dict(recipe), stage_name, data_files, world_size, init)
    resume_from = _resume_point(state / "checkpoints", run) if resume else None

    _ensure_distributed_env()
    import deepspeed
    import torch

    from moetool.data.llava_json import load_llava_json
    from moetool.data.pipeline import EncodedDataset, StageBatchSampler, make_loader, reason_of
    from moetool.data.preprocess import Preprocessor
    from moetool.data.templates import get_template
    from moetool.models.parts import set_trainable

    if not torch.distributed.is_initialized():
        # DeepSpeed prints "... deepspeed_shm_comm_op built successfully" here on CPU.
        with held_output("stdout"):
            deepspeed.init_distributed(
                dist_backend="gloo" if not torch.cuda.is_available() else "nccl", verbose=False
            )
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds_config = deepspeed_config(stage, world)
    torch.manual_seed(stage.seed)
    samples, parse_skipped = load_llava_json(data_files, image_folder, recipe.data.skip_bad_samples)
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
            model, processor = _load_start_model(recipe, stage_name, init, state)
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
    trainable = set_trainable(model, stage.trainable)
    if not trainable:
        raise TrainingError(
            f"stages.{stage_name}.trainable {list(stage.trainable)} selects no "
            "parameter of this model"
        )
    if stage.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False

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
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(stage.lr_schedule, warmup, total_steps)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )

    step = 0
    metrics_path = state / "metrics.jsonl"
    if resume_from is not None:
        resumed, path = resume_from
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
        stage.per_device_batch_size,
        rank,
        world,
        stage.seed,
        stage.group_by_modality_length,
    )
    loader = make_loader(
        EncodedDataset(samples, preprocessor),
        sampler,
        processor.tokenizer.pad_token_id,
        recipe.data.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
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
    try:
        engine.train()
        while step < total_steps:
            epoch, within = divmod(step, steps_per_epoch)
            if batches_epoch != epoch:  # skip what a resumed run already trained on, unloaded
                sampler.set_epoch(epoch, within * micro_steps)
                batches, batches_epoch = iter(loader), epoch
            started = time.perf_counter()
            tokens = 0
            sums = {"loss": 0.0, "lm": 0.0, "aux": 0.0}
            skipped_this_step = 0
            for _ in range(micro_steps):
                batch, bad = next(batches)
                problem, weight = None, 1.0
                if bad and not skip_bad:
                    problem = bad[0].message
                elif bad:
                    skipped.update(b.reason for b in bad)
                    skipped_this_step += len(bad)
                    if batch is None:  # nothing left: a zero-weight pass keeps the ranks in step
                        if last_good is None:
                            problem = (
                                f"every sample of a micro-batch is bad ({bad[0].message}), and no "
                                "good one came before it"
                            )
                        batch, weight = last_good, 0.0
                # every rank stops together (a bad sample here, a failed metrics write on rank 0)
                failed = _failures_on_any_rank(problem or pending, rank, world)
                if failed:
                    raise TrainingError(
                        f"stage {stage_name}: {failed}; " + _last_good(state / "checkpoints")
                    )
                if weight:
                    last_good = batch
                    tokens += int(batch["attention_mask"].sum())
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                outputs = engine(**batch)
                loss = outputs.loss
                bad_loss = None if torch.isfinite(loss) else f"non-finite loss ({loss.item()})"
                failed = _failures_on_any_rank(bad_loss, rank, world)
                if failed:
                    raise TrainingError(
                        f"stage {stage_name}: {failed} at step {step + 1}; "
                        + _last_good(state / "checkpoints")
                    )
                engine.backward(loss * weight if weight != 1.0 else loss)
                engine.step()
                sums["loss"] += weight * loss.item() / micro_steps
                lm = getattr(outputs, "lm_loss", None)
                sums["lm"] += weight * (lm if lm is not None else loss).item() / micro_steps
                aux = getattr(outputs, "aux_loss", None)
                if aux is not None:
                    sums["aux"] += weight * aux.item() / aux_layers / micro_steps
            step += 1
            done_this_run += 1
            elapsed = time.perf_counter() - started
            metrics = StepMetrics(
                step,
                total_steps,
                sums["loss"],
                sums["lm"],
                sums["aux"] if aux_layers else None,
                scheduler.get_last_lr()[0],
                tokens * world / elapsed,
                _sum_over_ranks(skipped_this_step, world),
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
                failed = _save_checkpoint(
                    engine, state / "checkpoints", step, run, stage.save_total_limit, pending
                )
                if failed:
                    raise TrainingError(
                        f"stage {stage_name}: {failed}; " + _last_good(state / "checkpoints")
                    )
            if stop_after is not None and done_this_run >= stop_after:
                break
        else:
            failed = _save_final(
                engine, model, processor, recipe, stage_name, out, overwrite, pending
            )
            if failed:
                raise TrainingError(
                    f"stage {stage_name}: {failed}; "
                    + _keep_trained_state(engine, state / "checkpoints", step, run, stage)
                )
    finally:
        tracker.close()

    skipped = _gather_counts(skipped, world)
    torch.distributed.barrier()  # every rank returns after rank 0 has written its files
    return StageResult(
        stage_name, out, step, *_first_last(metrics_path), metrics_path, dict(skipped)
    )


def _resume_point(root: Path, run: dict) -> tuple[int, Path] | None:
    """The newest complete checkpoint under ``root`` if it belongs to ``run``; None when there
    is none at all (the stage starts from the beginning)."""
    complete = checkpoints.complete_checkpoints(root)
    if not complete:
        partial = checkpoints.checkpoint_dirs(root)
        if partial:
            names = ", ".join(p.name for _, p in partial)
            raise TrainingError(
                f"--resume: no complete checkpoint in {root} ({names} were not finished, or were "
                "written by a moetool without checkpoint fingerprints); pass --overwrite without "
                "--resume to start the stage again"
            )
        return None
    step, path = complete[-1]
    saved = checkpoints.read_marker(path).get("fingerprint", {})
    changed = checkpoints.differences(saved, run)
    if changed:
        raise TrainingError(
            f"--resume: the checkpoint {path} belongs to another run of this stage; it differs "
            f"in {'; '.join(changed[:6])}{' …' if len(changed) > 6 else ''}. Resume with what it "
            "was trained with, or pass --overwrite without --resume to start again"
        )
    return step, path


def _save_checkpoint(
    engine, root: Path, step: int, run: dict, keep: int, pending: str | None = None
) -> str | None:
    """DeepSpeed checkpoint ``step-N``; complete (marked) once every rank has written its part;
    older ones beyond ``keep`` removed. A write that fails on any rank (a full disk, a read-only
    folder) is returned on every rank as one message, and the unfinished ``step-N`` removed;
    ``pending`` is an earlier failure of rank 0 that must stop the ranks here too."""
    import torch

    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    target = root / f"step-{step}"
    problem = None
    if rank == 0:  # DeepSpeed creates the folder on rank 0 before its first collective
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            problem = f"could not write checkpoint {target}: {describe_write_error(err)}"
    failed = _failures_on_any_rank(problem or pending, rank, world)
    if failed:
        return failed
    try:
        engine.save_checkpoint(str(root), tag=target.name, client_state={"step": step})
    except Exception as err:
        problem = f"could not write checkpoint {target}: {describe_write_error(err)}"
        # DeepSpeed's save ends in a barrier that the other ranks wait in: meet them there.
        torch.distributed.barrier()
    failed = _failures_on_any_rank(problem, rank, world)
    if rank == 0:
        if failed:
            shutil.rmtree(target, ignore_errors=True)
        else:
            checkpoints.mark_complete(target, run, step)
            checkpoints.prune(root, keep)
    torch.distributed.barrier()
    return failed


def _keep_trained_state(engine, root: Path, step: int, run: dict, stage: StageSection) -> str:
    """After a failed final write: save the trained state as checkpoint ``step-N`` (from which
    ``--resume`` writes the final checkpoint without training again) and say where it is; if that
    fails too, name the last good checkpoint."""
    if any(saved == step for saved, _ in checkpoints.complete_checkpoints(root)):
        failed = None  # a resumed run that failed to write again: its checkpoint is still there
    else:
        failed = _save_checkpoint(engine, root, step, run, stage.save_total_limit)
    if not failed:
        return (
            f"the trained state (step {step}) is kept in {root / f'step-{step}'}: run the same "
            "command with --resume to write the final checkpoint from it"
        )
    return f"keeping the trained state failed too ({failed}); " + _last_good(root)


def _last_good(root: Path) -> str:
    complete = checkpoints.complete_checkpoints(root)
    if not complete:
        return "no checkpoint was saved (set save_steps to keep some)"
    return f"the last good checkpoint is {complete[-1][1]} (--resume continues from it)"


def _collective_device():
    """Where a tensor for a collective must live: NCCL reduces only CUDA tensors, gloo CPU
    ones."""
    import torch

    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _failures_on_any_rank(message: str | None, rank: int, world: int) -> str | None:
    """Every rank learns whether any rank failed, and the same message: the failed ranks'
    messages, named by rank. One small all-reduce when nothing failed."""
    import torch

    if world == 1:
        return message
    flags = torch.zeros(world, device=_collective_device())
    flags[rank] = message is not None
    torch.distributed.all_reduce(flags)
    if not flags.any():
        return None
    messages: list = [None] * world
    torch.distributed.all_gather_object(messages, message)
    return "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)


def _sum_over_ranks(count: int, world: int) -> int:
    import torch

    if world == 1:
        return count
    total = torch.tensor([count], dtype=torch.long, device=_collective_device())
    torch.distributed.all_reduce(total)
    return int(total.item())


def _gather_counts(counts: Counter, world: int) -> Counter:
    """Every rank's counts, summed (once, at the end of the stage)."""
    import torch

    if world == 1:
        return counts
    every: list = [None] * world
    torch.distributed.all_gather_object(every, dict(counts))
    return sum((Counter(c) for c in every), Counter())


def _first_last(metrics_path: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return (rows[0]["loss"], rows[-1]["loss"]) if rows else (math.nan, math.nan)


def full_state_dict(module, dtype, rank: int, partitioned: bool) -> dict:
    """``module``'s whole state on rank 0 (an empty dict elsewhere), floating-point tensors in
    ``dtype``. Under ZeRO-3 (``partitioned``) the weights are gathered one submodule at a time
    with ``deepspeed.zero.GatheredParameters``; every rank must call it."""
    import torch

    def cast(t, copy: bool = False):
        return t.detach().to("cpu", dtype, copy=copy) if t.is_floating_point() else t.detach()

    gathered: dict[int, torch.Tensor] = {}
    if partitioned:
        import deepspeed

        for sub in module.modules():
            params = list(sub.parameters(recurse=False))
            if not params:
                continue
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if rank == 0:  # a copy: the gathered storage is released when the block ends
                    gathered.update((id(p), cast(p, copy=True)) for p in params)
    if rank != 0:
        return {}
    return {
        k: gathered[id(v)] if id(v) in gathered else cast(v)
        for k, v in module.state_dict(keep_vars=True).items()
    }


def _save_final(engine, model, processor, recipe, stage_name, out, overwrite, pending=None):
    """The final HF checkpoint, written by rank 0 into a temporary folder and renamed; returns
    the agreed error of every rank when it could not be written (nothing of it is left)."""
    import torch

    from moetool._version import __version__
    from moetool.data.templates import get_template
    from moetool.io import atomic_output_dir, check_free_space
    from moetool.recipe.load import recipe_to_dict

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dtype = stage_dtype(getattr(recipe.stages, stage_name))
    state_dict = full_state_dict(engine.module, dtype, rank, engine.zero_optimization_stage() == 3)
    problem = pending
    if rank == 0 and problem is None:
        try:
            check_free_space(out.parent, sum(t.nbytes for t in state_dict.values()))
            model.config.use_cache = True
            model.config.moetool = {
                "version": __version__,
                "stage": stage_name,
                "recipe": recipe_to_dict(recipe),
            }
            get_template(recipe.data.template).attach(processor)
            with atomic_output_dir(out, overwrite) as tmp:
                model.save_pretrained(tmp, state_dict=state_dict)
                processor.save_pretrained(tmp)
        except Exception as err:  # the disk, a quota, permissions: say so on every rank
            problem = f"could not write the final checkpoint {out}: {describe_write_error(err)}"
    del state_dict
    return _failures_on_any_rank(problem, rank, world)
