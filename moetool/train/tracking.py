"""Experiment tracking: a stage's step metrics to TensorBoard or Weights & Biases, besides
``metrics.jsonl``. One small interface (``log``, ``close``); only rank 0 opens a tracker.

- ``tensorboard``: event files in ``<stage>-state/tensorboard`` (torch's ``SummaryWriter``);
  a resumed run purges the events of the steps it trains again.
- ``wandb``: a run in ``<stage>-state/wandb``; ``WANDB_MODE=offline`` needs no network
  (``wandb sync`` uploads later). The run id is kept in the state folder, so a resumed stage
  continues the same wandb run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

# Each tracker is the package of its name (the ``tracking`` extra).
PACKAGES = ("tensorboard", "wandb")


class TrackingError(RuntimeError):
    pass


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NoTracker:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    def __init__(self, log_dir: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events at and after it: the steps a resumed run trains again.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, state: Path, project: str, name: str, config: dict):
        import wandb

        ids = state / "wandb-run.json"
        run_id = json.loads(ids.read_text())["id"] if ids.is_file() else wandb.util.generate_id()
        ids.write_text(json.dumps({"id": run_id}))
        offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
        self.run = wandb.init(
            project=project,
            name=name,
            id=run_id,
            resume=None if offline else "allow",  # offline runs cannot resume; sync merges them
            dir=str(state),
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def check_available(report_to: str) -> None:
    """Raise ``TrackingError`` (before any training starts) when the package is missing."""
    if report_to not in PACKAGES:
        return
    import importlib.util

    if importlib.util.find_spec(report_to) is None:
        raise TrackingError(
            f"tracking.report_to = {report_to!r} needs the {report_to} package: "
            "pip install 'moetool[tracking]'"
        )


def open_tracker(
    report_to: str, state: Path, project: str, name: str, config: dict, first_step: int
) -> Tracker:
    if report_to == "tensorboard":
        return TensorBoardTracker(state / "tensorboard", first_step)
    if report_to == "wandb":
        return WandbTracker(state, project, name, config)
    return NoTracker()
