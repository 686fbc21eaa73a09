"""Wall time of `moetool quickstart` against its 10-minute budget on this machine, with the time
of each phase and the learning bar (sparse POPE accuracy >= 0.75, blind <= 0.60). Prints JSON.

Runs the real command (a fresh process, as a user would) into a temporary directory and reads
its summary.json; the phases are the stage times summary.json records.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 600.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=Path, help="write the quickstart here instead of a temp dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp) / "quickstart"
        moetool = Path(sys.executable).parent / "moetool"
        started = time.perf_counter()
        subprocess.run(
            [str(moetool), "quickstart", "--out", str(out), "--json"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - started
        summary = json.loads((out / "summary.json").read_text())
    stages = {name: s["seconds"] for name, s in summary["stages"].items()}
    pope = {name: round(p["accuracy"], 4) for name, p in summary["pope"].items()}
    print(
        json.dumps(
            {
                "wall_s": round(wall, 1),
                "budget_s": BUDGET_S,
                "wall_over_budget": round(wall / BUDGET_S, 3),
                "pipeline_s": summary["seconds"],
                "stage_s": stages,
                "stage_share_of_wall": {k: round(v / wall, 3) for k, v in stages.items()},
                "pope_accuracy": pope,
                "learning_bar_met": pope["moe"] >= 0.75 and pope["moe_blind"] <= 0.60,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
