"""`moetool quickstart` end to end through the real command: it must learn (shared/DESIGN.md
contract 4), and `moetool predict` must answer with the models it leaves. The whole-VLM
quickstart (`--base qwen3-vl`) runs on a shortened schedule and a small world (it need not
learn here; docs/getting-started.md records its full run)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
# summary.json's keys (docs/getting-started.md)
SUMMARY_KEYS = {
    "seconds",
    "base",
    "recipe",
    "stages",
    "pope",
    "params",
    "routing",
    "checkpoints",
    "notes",
}


def moetool(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "moetool"), *args], capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    proc = moetool("quickstart", "--out", str(out), "--json")
    summary = json.loads(proc.stdout)  # --json keeps stdout clean of training logs
    assert summary == json.loads((out / "summary.json").read_text())
    (out.parent / "output.txt").write_text(proc.stdout + proc.stderr)
    return out, summary


def test_the_quickstart_prints_no_library_output(quickstart, library_chatter):
    out, _ = quickstart
    assert library_chatter((out.parent / "output.txt").read_text()) == []


def test_the_sparse_model_learns_from_the_images(quickstart):
    _, summary = quickstart
    pope = summary["pope"]
    for name in ("dense", "moe", "moe_blind"):
        assert set(pope[name]) >= {"accuracy", "f1"}
        assert set(pope[name]["splits"]) == {"pope_adv", "pope_pop", "pope_random"}
    assert pope["moe"]["accuracy"] >= 0.75, pope
    # The control: with every image blank the same model is at chance.
    assert pope["moe_blind"]["accuracy"] <= 0.60, pope
    print(
        f"quickstart: {summary['seconds']} s, POPE {pope['dense']['accuracy']:.3f} dense, "
        f"{pope['moe']['accuracy']:.3f} MoE, {pope['moe_blind']['accuracy']:.3f} blind"
    )


def test_summary_follows_the_contract(quickstart):
    out, summary = quickstart
    assert set(summary) == SUMMARY_KEYS and summary["base"] == "llava"
    assert summary["seconds"] > 0
    assert set(summary["stages"]) == {"pretrain", "instruct", "moe_tune"}
    for name, stage in summary["stages"].items():
        assert stage["steps"] > 0
        if name != "moe_tune":  # stage III starts from a trained model: its loss is already low
            assert stage["loss_last"] < stage["loss_first"], (name, stage)
    assert (
        summary["stages"]["moe_tune"]["loss_last"]
        < 0.5 * summary["stages"]["instruct"]["loss_first"]
    )
    params = summary["params"]
    assert params["dense_total"] < params["moe_activated"] < params["moe_total"]
    for name, sparse in (("dense", False), ("moe", True)):
        ckpt = out / name
        config = json.loads((ckpt / "config.json").read_text())
        assert ("moe" in config) is sparse
        assert (ckpt / "model.safetensors").is_file()
        assert (ckpt / "tokenizer.json").is_file() and (ckpt / "tokenizer_config.json").is_file()
        assert (ckpt / "processor_config.json").is_file() or (
            ckpt / "preprocessor_config.json"
        ).is_file()
    for figure in summary["routing"]["figures"]:
        assert (out / figure).stat().st_size > 0


def test_other_commands_accept_the_checkpoints(quickstart):
    out, _ = quickstart
    proc = moetool("routing", "stats", str(out / "routing"), "--json")
    assert json.loads(proc.stdout)


def test_predict_answers_synthetic_questions(quickstart):
    from moetool.predict import predict

    out, _ = quickstart
    annotations = json.loads((out / "data" / "annotations.json").read_text())
    held_out = [a for a in annotations if a["split"] == "eval"][:8]
    names = ("red circle", "blue square", "green triangle", "yellow star")
    suffix = "\nAnswer the question using a single word or phrase."
    for model in ("moe", "dense"):
        asked = right = 0
        for a in held_out:
            present = {f"{o['colour']} {o['shape']}" for o in a["objects"]}
            image = out / "data" / a["image"]
            for name in names:
                if name.split()[0] == a["background"]:
                    continue
                result = predict(out / model, f"Is there a {name} in the image?{suffix}", image)
                assert result.sparse is (model == "moe")
                asked += 1
                right += result.answer.lower().startswith("yes") == (name in present)
        assert right / asked >= 0.75, (model, right, asked)


def test_predict_command_prints_one_answer(quickstart, library_chatter):
    out, _ = quickstart
    image = out / "data" / "images" / "eval" / "eval_000000.png"
    proc = moetool(
        "predict",
        "--model",
        str(out / "moe"),
        "--image",
        str(image),
        "--prompt",
        "Is there a red circle in the image?",
        "--json",
    )
    answer = json.loads(proc.stdout)
    assert library_chatter(proc.stdout + proc.stderr) == []
    assert answer["sparse"] is True and answer["answer"] in {"Yes", "No"}
    plain = moetool(
        "predict",
        "--model",
        str(out / "dense"),
        "--image",
        str(image),
        "--prompt",
        "Is there a red circle in the image?",
    )
    assert plain.stdout.strip() in {"Yes", "No"}


def test_an_existing_output_is_refused(tmp_path):
    (tmp_path / "qs").mkdir()
    proc = subprocess.run(
        [str(BIN / "moetool"), "quickstart", "--out", str(tmp_path / "qs")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_an_unknown_base_is_one_error_listing_the_known(tmp_path):
    proc = subprocess.run(
        [str(BIN / "moetool"), "quickstart", "--base", "qwen9", "--out", str(tmp_path / "qs")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: --base 'qwen9': unknown base; known: llava, qwen3-vl"
    assert not (tmp_path / "qs").exists()


# Two steps of each stage on a small world: the pipeline of --base qwen3-vl end to end.
SHORT_RUN = """
import dataclasses, json, sys
from moetool.quickstart import SYNTH, run_quickstart

world = dataclasses.replace(SYNTH, stage1=0, stage2=64, stage3=64, eval_images=6)
overrides = [
    f"stages.{stage}.{key}={value}"
    for stage in ("instruct", "moe_tune")
    for key, value in (("max_steps", 2), ("global_batch_size", 8), ("per_device_batch_size", 8))
]
summary = run_quickstart(sys.argv[1], base="qwen3-vl", overrides=overrides, synth=world)
print(json.dumps(summary))
"""


def test_the_qwen3_vl_quickstart_runs_the_pipeline_on_a_whole_vlm(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-c", SHORT_RUN, str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert (summary["base"], summary["recipe"]) == ("qwen3-vl", "tiny/quickstart-qwen3-vl")
    assert set(summary["stages"]) == {"instruct", "moe_tune"}  # a whole VLM has no stage I
    assert all(s["steps"] == 2 for s in summary["stages"].values())
    for name in ("dense", "moe", "moe_blind"):
        assert set(summary["pope"][name]) == {"accuracy", "f1", "yes_ratio", "splits"}
    params = summary["params"]
    assert params["dense_total"] < params["moe_activated"] < params["moe_total"]
    assert params["vision"] > 0 and params["projector"] > 0
    # The random base it started from, the dense model and the sparse one, in the base's layout
    # with the base's own chat template.
    template = (out / "base" / "chat_template.jinja").read_text()
    for name, model_type in (
        ("base", "qwen3_vl"),
        ("dense", "qwen3_vl"),
        ("moe", "moetool_qwen3_vl"),
    ):
        config = json.loads((out / name / "config.json").read_text())
        assert config["model_type"] == model_type
        assert config["text_config"]["hidden_size"] == 128
        assert (out / name / "chat_template.jinja").read_text().strip() == template.strip()
    assert summary["routing"]["figures"]
    for figure in summary["routing"]["figures"]:
        assert (out / figure).stat().st_size > 0
    assert not list(tmp_path.glob("qs.tmp-*"))
