"""`moetool eval` and the `lmms-eval` command line run lmms-eval's own tasks on local data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic data (with its lmms-eval datasets) and a tiny random sparse checkpoint."""
    from moetool.models.build import save_checkpoint
    from moetool.models.moe.config import MoEConfig
    from moetool.recipe import load_recipe
    from moetool.recipe.paths import recipes_root
    from moetool.tiny import build_random_lvlm
    from moetool.upcycle import upcycle_checkpoint

    root = tmp_path_factory.mktemp("eval")
    subprocess.run(
        [
            str(BIN / "moetool"),
            "data",
            "synth",
            str(root / "data"),
            "--stage1",
            "8",
            "--stage2",
            "8",
            "--stage3",
            "8",
            "--eval-images",
            "6",
            "--image-size",
            "32",
        ],
        check=True,
        capture_output=True,
    )
    model, processor = build_random_lvlm(load_recipe(recipes_root() / "tiny/qwen2.toml"))
    save_checkpoint(model, processor, root / "dense")
    upcycle_checkpoint(root / "dense", root / "moe", MoEConfig())
    return root


def moetool(*args):
    env = dict(os.environ, COLUMNS="120")
    return subprocess.run(
        [str(BIN / "moetool"), *args], capture_output=True, text=True, env=env, timeout=900
    )


@pytest.mark.parametrize("task", ["pope", "gqa", "vqav2", "mmbench", "mmvet"])
def test_every_task_runs_through_moetool_eval(world, task, tmp_path, library_chatter):
    proc = moetool(
        "eval",
        task,
        "--model",
        str(world / "moe"),
        "--data",
        str(world / "data/lmms"),
        "--out",
        str(tmp_path / task),
        "--limit",
        "3",
        "--batch-size",
        "2",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert library_chatter(proc.stdout + proc.stderr) == []
    report = json.loads(proc.stdout)
    results = json.loads((tmp_path / task / "results.json").read_text())["results"]
    assert set(report["metrics"]) <= set(results)
    rows = (tmp_path / task / "samples.jsonl").read_text().splitlines()
    assert len(rows) == report["samples"] == 3 * len(report["metrics"])
    assert (tmp_path / task / "results.csv").read_text().startswith("task,metric,value")
    if task == "mmvet":
        assert any("judge" in note for note in report["notes"])


def test_pope_metrics_agree_with_the_per_sample_log(world, tmp_path):
    proc = moetool(
        "eval",
        "pope",
        "--model",
        str(world / "dense"),
        "--data",
        str(world / "data/lmms"),
        "--out",
        str(tmp_path / "p"),
        "--limit",
        "8",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "p/results.json").read_text())["results"]
    samples = [json.loads(x) for x in (tmp_path / "p/samples.jsonl").read_text().splitlines()]
    for task in ("pope_adv", "pope_pop", "pope_random"):
        rows = [s["pope_accuracy"] for s in samples if s["task"] == task]
        preds = [r["prediction"] for r in rows]
        truth = [r["ground_truth"] for r in rows]
        pairs = list(zip(preds, truth, strict=True))
        accuracy = sum(p == t for p, t in pairs) / len(rows)
        tp = sum(p == t == "yes" for p, t in pairs)
        fp = sum(p == "yes" and t == "no" for p, t in pairs)
        fn = sum(p == "no" and t == "yes" for p, t in pairs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        predicted_yes = sum(p == "yes" for p in preds) / len(rows)
        report = json.loads((tmp_path / "p/metrics.json").read_text())
        assert report[task]["yes_ratio_predicted"] == pytest.approx(predicted_yes)
        assert results[task]["pope_accuracy,none"] == pytest.approx(accuracy)
        assert results[task]["pope_f1_score,none"] == pytest.approx(f1)
        assert results[task]["pope_yes_ratio,none"] == pytest.approx(truth.count("yes") / len(rows))


def oracle():
    """An lmms-eval model that answers from the annotations."""
    from lmms_eval.api.model import lmms

    class Oracle(lmms):
        is_simple = True

        def generate_until(self, requests):
            return [
                self.task_dict[r.args[4]][r.args[5]][r.args[3]]["answer"].capitalize()
                for r in requests
            ]

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

    return Oracle()


def test_a_model_that_answers_from_the_annotations_scores_one(world, tmp_path):
    from moetool.eval.runner import run_eval

    report = run_eval(
        "pope", world / "dense", world / "data/lmms", tmp_path / "o", lmms_model=oracle()
    )
    for split in ("pope_adv", "pope_pop", "pope_random"):
        assert report.metrics[split]["pope_accuracy"] == 1.0
        assert report.metrics[split]["pope_f1_score"] == 1.0


def test_evaluation_leaves_the_callers_environment_as_it_was(world, tmp_path, monkeypatch):
    from moetool.eval.runner import run_eval

    for key in ("API_TYPE", "OPENAI_API_KEY", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    report = run_eval(
        "mmvet", world / "moe", world / "data/lmms", tmp_path / "m", limit=2, lmms_model=oracle()
    )
    assert report.samples == 2
    assert any("judge" in note for note in report.notes)  # ran with the dummy judge API
    assert dict(os.environ) == before


def test_the_table_puts_paper_figures_beside_ours_for_a_paper_recipe(world, tmp_path):
    """A checkpoint trained from a paper recipe (the 384 StableLM variant, Table 4's dagger row):
    the predicted-yes share sits beside the paper's "Yes", the ground-truth share beside none."""
    checkpoint = tmp_path / "paper"
    shutil.copytree(world / "moe", checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["moetool"] = {"stage": "moe_tune", "recipe": {"name": "MoE-LLaVA-1.6B×4-Top2 (384)"}}
    (checkpoint / "config.json").write_text(json.dumps(config))
    proc = moetool(
        "eval", "pope", "--model", str(checkpoint), "--data", str(world / "data/lmms"),
        "--out", str(tmp_path / "t"), "--limit", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if "Metric" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")][-1] == "Paper split"
    rows = {
        (cells[0], cells[2]): (cells[1], cells[4], cells[5])
        for line in lines
        if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) == 6
    }
    # Our split, the paper's figure, the split the paper measured it on.
    assert rows[("pope_adv", "pope_accuracy")] == (
        "adversarial",
        "86.9",
        "COCO val2014, adversarial",
    )
    assert rows[("pope_adv", "yes_ratio_predicted")][1] == "41.5"  # Table 4, adversarial "Yes"
    assert rows[("pope_pop", "yes_ratio_predicted")][1] == "43.0"
    assert rows[("pope_adv", "pope_yes_ratio")][1:] == ("-", "-")
    assert rows[("pope_pop", "pope_accuracy")][0] == "popular"


def test_lmms_eval_command_line_with_the_moetool_model(world, tmp_path):
    tasks = world / "data/lmms/tasks"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", API_TYPE="dummy")
    env.pop("OPENAI_API_KEY", None)
    proc = subprocess.run(
        [
            str(BIN / "lmms-eval"),
            "--model",
            "moetool",
            "--model_args",
            f"pretrained={world / 'moe'}",
            "--tasks",
            str(tasks),
            "--limit",
            "4",
            "--batch_size",
            "2",
            "--device",
            "cpu",
            "--output_path",
            str(tmp_path / "out"),
            "--log_samples",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [
        p for p in (tmp_path / "out").rglob("*_results.json") if "submissions" not in p.parts
    ]
    assert results
    data = json.loads(results[0].read_text())["results"]
    # Every one of the five tasks ran through lmms-eval's own command line.
    for task, metric in (
        ("pope_adv", "pope_accuracy"),
        ("pope_pop", "pope_f1_score"),
        ("pope_random", "pope_accuracy"),
        ("gqa", "exact_match"),
        ("vqav2_val", "exact_match"),
        ("mmbench_en_dev_static", "gpt_eval_score"),
        ("mmvet", "gpt_eval_score"),
    ):
        assert f"{metric},none" in data[task], task
        assert list((tmp_path / "out").rglob(f"*_samples_{task}.jsonl")), task


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "popee"], "unknown task 'popee'"),
        (["eval", "pope", "--data", "/nonexistent"], "no such directory"),
        (["eval", "gqa", "--data", "{wrong}"], "expected a DatasetDict with split(s) ['testdev']"),
    ],
)
def test_eval_errors(world, tmp_path, args, message):
    wrong = tmp_path / "wrong"
    shutil.copytree(world / "data/lmms/pope", wrong / "gqa")  # a POPE dataset where GQA belongs
    args = [a.replace("{wrong}", str(wrong)) for a in args]
    if "--data" not in args:
        args += ["--data", str(world / "data/lmms")]
    proc = moetool(*args, "--model", str(world / "moe"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_overwrite_never_deletes_the_model_or_data_it_reads(world, tmp_path):
    """`moetool eval --out OUT --overwrite` where OUT holds the --model checkpoint (or the
    --data) is refused before anything runs, and nothing is deleted."""
    out = tmp_path / "out"
    shutil.copytree(world / "moe", out / "moe")
    proc = moetool(
        "eval",
        "pope",
        "--model",
        str(out / "moe"),
        "--data",
        str(world / "data/lmms"),
        "--out",
        str(out),
        "--overwrite",
    )
    assert proc.returncode == 2 and "contains this command's input" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "moe/config.json").is_file()


def samples_and_results(out: Path) -> tuple[list[dict], dict]:
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return samples, json.loads((out / "results.json").read_text())


def test_data_parallel_evaluation_answers_as_one_rank(world, tmp_path):
    """Two ranks (gloo) under torchrun answer a shard each; rank 0 merges and scores: the same
    per-sample log, in the same order, and the same results as one rank, which it alone writes
    and prints."""
    runs = {}
    for ranks in (1, 2):
        proc = subprocess.run(
            [
                str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(ranks),
                "-m", "moetool", "eval", "pope", "--model", str(world / "moe"),
                "--data", str(world / "data/lmms"), "--out", str(tmp_path / f"r{ranks}"),
                "--limit", "5", "--batch-size", "2", "--json",
            ],
            capture_output=True, text=True, timeout=900,
            env=dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="120"),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[ranks] = json.loads(proc.stdout)  # one report: rank 0's
        assert runs[ranks]["world_size"] == ranks
    (one, one_results), (two, two_results) = (
        samples_and_results(tmp_path / f"r{n}") for n in (1, 2)
    )
    assert len(one) == 15 and [s["doc_id"] for s in one[:5]] == [0, 1, 2, 3, 4]
    assert len({s["resps"][0][0] for s in one}) > 1  # answers that tell samples apart
    assert two == one
    assert two_results["results"] == one_results["results"]
    assert runs[2]["metrics"] == runs[1]["metrics"]
    assert two_results["moetool"]["world_size"] == 2
    assert one_results["moetool"]["world_size"] == 1


def test_eval_runs_the_model_in_the_dtype_asked_for(world, tmp_path):
    proc = moetool(
        "eval", "vqav2", "--model", str(world / "moe"), "--data", str(world / "data/lmms"),
        "--out", str(tmp_path / "b"), "--limit", "2", "--dtype", "bf16", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["dtype"] == "bfloat16"
    assert report["splits"] == {"vqav2_val": {"split": "validation", "paper_split": "test-dev"}}
    assert any("test-dev" in note for note in report["notes"])
    _, results = samples_and_results(tmp_path / "b")
    assert results["moetool"]["dtype"] == "bfloat16"
    assert results["moetool"]["splits"] == report["splits"]
    bad = moetool(
        "eval", "vqav2", "--model", str(world / "moe"), "--data", str(world / "data/lmms"),
        "--out", str(tmp_path / "c"), "--dtype", "fp16",
    )  # fmt: skip
    assert bad.returncode == 2 and "error: --dtype fp16: expected one of fp32, bf16" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def base_checkpoints(tmp_path_factory):
    """Tiny random dense Qwen3-VL and Gemma 3 checkpoints, each upcycled too."""
    from moetool.models.moe.config import MoEConfig
    from moetool.tiny_vlm import build_random_vlm
    from moetool.upcycle import upcycle_checkpoint

    root = tmp_path_factory.mktemp("bases")
    for base in ("qwen3_vl", "gemma3"):
        model, processor = build_random_vlm(base, seed=2)
        model.save_pretrained(root / base / "dense")
        processor.save_pretrained(root / base / "dense")
        upcycle_checkpoint(root / base / "dense", root / base / "moe", MoEConfig())
    return root


@pytest.mark.parametrize(("base", "which"), [("qwen3_vl", "moe"), ("gemma3", "dense")])
def test_eval_runs_on_dense_and_sparse_bases(world, base_checkpoints, base, which, tmp_path):
    """``moetool eval`` (lmms-eval with moetool's model plugin) on a whole VLM's checkpoint,
    asking in the base's own chat template through its processor."""
    proc = moetool(
        "eval",
        "pope",
        "--model",
        str(base_checkpoints / base / which),
        "--data",
        str(world / "data/lmms"),
        "--out",
        str(tmp_path / "p"),
        "--limit",
        "4",
        "--batch-size",
        "2",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["samples"] == 4 * len(report["metrics"]) and report["samples"] > 0
    rows = [json.loads(r) for r in (tmp_path / "p/samples.jsonl").read_text().splitlines()]
    assert len(rows) == report["samples"]
