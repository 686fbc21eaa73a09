"""Training checkpoints: fingerprints, completeness, pruning, metrics on resume."""

import json

from moetool.train import checkpoints


def _recipe(lr=2e-5, save_steps=2):
    return {"name": "r", "stages": {"instruct": {"lr": lr, "save_steps": save_steps}}}


def test_fingerprint_names_what_differs_and_ignores_how_the_run_is_saved(tmp_path):
    data = tmp_path / "d.json"
    data.write_text("[1]")
    init = tmp_path / "init"
    init.mkdir()
    (init / "config.json").write_text("{}")
    base = checkpoints.fingerprint(_recipe(), "instruct", [data], 2, init)
    assert checkpoints.differences(base, base) == []
    resaved = checkpoints.fingerprint(_recipe(save_steps=5), "instruct", [data], 2, init)
    assert checkpoints.differences(base, resaved) == []
    other = checkpoints.fingerprint(_recipe(lr=1e-4), "instruct", [data], 1, init)
    assert checkpoints.differences(base, other) == [
        "recipe.stages.instruct.lr: 2e-05 -> 0.0001",
        "world_size: 2 -> 1",
    ]
    data.write_text("[2]")
    edited = checkpoints.fingerprint(_recipe(), "instruct", [data], 2, init)
    (diff,) = checkpoints.differences(base, edited)
    assert diff.startswith(f"data.{data}:")


def test_the_attention_implementation_is_not_part_of_the_run(tmp_path):
    """Same maths on other kernels: a run may resume with another one (and runs fingerprinted
    before the key existed resume as they were)."""
    data = tmp_path / "d.json"
    data.write_text("[1]")
    fingerprints = [
        checkpoints.fingerprint({**_recipe(), "model": model}, "instruct", [data], 1, None)
        for model in ({}, {"attn_implementation": "sdpa"}, {"attn_implementation": "eager"})
    ]
    assert all(checkpoints.differences(fingerprints[0], f) == [] for f in fingerprints)


def _save(root, step, marked=True):
    path = root / f"step-{step}"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if marked:
        checkpoints.mark_complete(path, {"stage": "s"}, step)
    return path


def test_only_marked_checkpoints_are_complete_and_pruning_keeps_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _save(root, step)
    _save(root, 3, marked=False)  # an interrupted save older than the newest complete one
    _save(root, 8, marked=False)  # one being written now
    (root / "latest").write_text("")  # DeepSpeed's pointer, empty after a crash
    assert [s for s, _ in checkpoints.complete_checkpoints(root)] == [2, 4, 6]
    assert json.loads((root / "step-6/moetool.json").read_text())["step"] == 6
    removed = checkpoints.prune(root, keep=2)
    assert sorted(p.name for p in removed) == ["step-2", "step-3"]
    assert [s for s, _ in checkpoints.checkpoint_dirs(root)] == [4, 6, 8]
    assert checkpoints.prune(root, keep=0) == []  # 0 keeps every complete one


def test_truncate_metrics_keeps_one_row_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3, 4)))
    checkpoints.truncate_metrics(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
