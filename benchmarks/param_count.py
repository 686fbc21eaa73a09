"""Wall time of `moetool param-count` for a 7B recipe: cold (no cached count) and warm.

Prints JSON. Each figure is the median of --runs whole-process runs of the console script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="openchat-7b/moe-4x-top2")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    script = shutil.which("moetool", path=str(Path(sys.executable).parent)) or "moetool"
    cmd = [script, "param-count", args.recipe, "--json"]
    cold, warm = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, MOETOOL_CACHE_DIR=cache, HF_HUB_OFFLINE="1")
            cold.append(timed(cmd, env))
            warm.append(timed(cmd, env))
    imports = timed([sys.executable, "-c", "import transformers.modeling_utils"], dict(os.environ))
    print(
        json.dumps(
            {
                "recipe": args.recipe,
                "runs": args.runs,
                "cold_s": {"min": min(cold), "median": statistics.median(cold), "max": max(cold)},
                "warm_s": {"min": min(warm), "median": statistics.median(warm), "max": max(warm)},
                "import_torch_transformers_s": imports,
                "cold_over_warm": statistics.median(cold) / statistics.median(warm),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
