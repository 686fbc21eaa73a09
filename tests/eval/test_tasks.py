"""The evaluation task table against lmms-eval's own task definitions and the paper's tables."""

from __future__ import annotations

from pathlib import Path

import lmms_eval
import pytest
import yaml

from moetool.eval import tasks
from moetool.eval.runner import lmms_tasks
from moetool.paper import TABLE3_4

LMMS_ROOT = Path(lmms_eval.__file__).parent / "tasks"


def builtin_task(folder: str, name: str) -> dict:
    """The built-in YAML of lmms-eval task ``name`` (its `!function` tags read as strings)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    for path in sorted((LMMS_ROOT / folder).glob("*.yaml")):
        config = yaml.load(path.read_text(), Loader=Loader) or {}
        if config.get("task") == name:
            return config
    raise AssertionError(f"lmms-eval has no task {name!r} under tasks/{folder}")


@pytest.mark.parametrize("name", sorted(tasks.LMMS_TASKS))
def test_every_lmms_task_is_lmms_evals_own_with_our_split_and_metrics(name):
    spec = tasks.LMMS_TASKS[name]
    config = builtin_task(spec.yaml_folder, name)
    assert config.get("test_split") == spec.split
    reported = {m["metric"] for m in config.get("metric_list", [])}
    assert set(spec.metrics) <= reported


def test_every_moetool_task_names_known_lmms_tasks():
    for spec in tasks.TASKS.values():
        for name in spec.lmms + (spec.unjudged or ()):
            assert name in tasks.LMMS_TASKS, (spec.name, name)


def test_tasks_share_a_data_folder_only_with_the_same_columns():
    columns: dict[str, tuple[str, ...]] = {}
    for spec in tasks.LMMS_TASKS.values():
        assert columns.setdefault(spec.data_folder, spec.columns) == spec.columns, spec.name


def test_mmbench_without_a_judge_runs_the_rule_scored_task(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("API_TYPE", raising=False)
    assert lmms_tasks("mmbench") == ("mmbench_en_dev_static",)
    assert lmms_tasks("pope") == ("pope_adv", "pope_pop", "pope_random")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert lmms_tasks("mmbench") == ("mmbench_en_dev",)


def test_overrides_replace_only_the_data_source_and_local_hooks(tmp_path):
    pope = tasks.task_overrides("pope_pop", tmp_path, judge=False)
    assert pope == {
        "task": "pope_pop",
        "dataset_path": str(tmp_path / "pope_full"),
        "dataset_kwargs": {"load_from_disk": True},
    }
    # GQA's process_docs joins images from the hub; local data carries them.
    assert tasks.task_overrides("gqa", tmp_path, judge=True)["process_docs"] is None
    unjudged = tasks.task_overrides("mmvet", tmp_path, judge=False)
    judged = tasks.task_overrides("mmvet", tmp_path, judge=True)
    assert unjudged["process_results"] is tasks.mmvet_without_judge
    assert "process_results" not in judged


def test_mmvet_without_judge_keeps_the_prediction_with_score_zero():
    doc = {"question_id": "v1", "question": "Q?", "answer": "red", "capability": "rec"}
    record = tasks.mmvet_without_judge(doc, ["blue"])["gpt_eval_score"]
    assert record["pred_answer"] == "blue" and record["gt_answer"] == "red"
    assert record["score"] == 0.0


def test_paper_reference_reads_the_papers_figures():
    # MoE-LLaVA-1.8B×4-Top2: Table 3 GQA 61.5, MM-Vet 25.3; Table 4 adversarial acc 86.1,
    # popular F1 87.7, random yes 43.0.
    paper = next(r for r in TABLE3_4 if r.name == "MoE-LLaVA-1.8B×4-Top2")
    assert tasks.paper_reference(paper, "gqa", "exact_match") == 61.5
    assert tasks.paper_reference(paper, "mmvet", "gpt_eval_score") == 25.3
    assert tasks.paper_reference(paper, "mmbench_en_dev_static", "gpt_eval_score") == 59.7
    assert tasks.paper_reference(paper, "vqav2_val", "exact_match") == 76.2
    assert tasks.paper_reference(paper, "pope_adv", "pope_accuracy") == 86.1
    assert tasks.paper_reference(paper, "pope_pop", "pope_f1_score") == 87.7
    assert tasks.paper_reference(paper, "pope_random", "yes_ratio_predicted") == 43.0
    # The ground truth's yes share has no paper figure; nor has a checkpoint of another recipe.
    assert tasks.paper_reference(paper, "pope_random", "pope_yes_ratio") is None
    assert tasks.paper_reference(None, "gqa", "exact_match") is None


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="known: pope, gqa, vqav2, mmbench, mmvet"):
        tasks.get_task("textvqa")
    with pytest.raises(KeyError, match="tasks with local data: pope, pope_adv"):
        tasks.get_lmms_task("textvqa")


def test_each_paper_figure_names_the_split_the_paper_measured_it_on():
    """The paper's splits (its official scripts): VQAv2 test-dev where our task reads
    validation (and the report says so), GQA test-dev balanced, POPE's samplings of COCO val2014
    split by split as ours, MMBench's English dev set."""
    found = tasks.splits(tasks.LMMS_TASKS)
    assert found["vqav2_val"] == {"split": "validation", "paper_split": "test-dev"}
    assert "test-dev" in tasks.LMMS_TASKS["vqav2_val"].split_note
    assert found["gqa"] == {"split": "testdev", "paper_split": "test-dev balanced"}
    for name in ("pope_adv", "pope_pop", "pope_random"):
        split = found[name]["split"]
        assert found[name]["paper_split"] == f"COCO val2014, {split}"
    for name in ("mmbench_en_dev", "mmbench_en_dev_static"):
        assert found[name]["split"] == "dev" and found[name]["paper_split"].startswith("dev (en")
    assert found["mmvet"]["paper_split"].startswith("test")
    assert found["pope"]["paper_split"] is None  # no paper figure for the pooled task
    # Only tasks whose split differs from the paper's carry a note.
    assert [n for n, t in tasks.LMMS_TASKS.items() if t.split_note] == ["vqav2_val"]
