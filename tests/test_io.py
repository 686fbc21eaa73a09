"""moetool.io: held library output."""

import sys

import pytest

from moetool.io import held_output


def test_held_output_keeps_prints_out_of_the_stream_on_success(capsys):
    with held_output("stdout") as held:
        print("built successfully")
    with held_output("stderr") as held_err:
        print("  0%|   | 0/3", file=sys.stderr)
    assert capsys.readouterr() == ("", "")
    assert held.getvalue() == "built successfully\n"
    assert held_err.getvalue() == "  0%|   | 0/3\n"


def test_held_output_is_written_out_when_the_block_fails(capsys):
    with pytest.raises(RuntimeError), held_output("stderr"):
        print("what explains the failure", file=sys.stderr)
        raise RuntimeError("boom")
    assert capsys.readouterr().err == "what explains the failure\n"


def test_an_output_holding_an_input_is_refused_before_anything_is_removed(tmp_path):
    from moetool.io import UnsafeOverwriteError, atomic_output_dir, check_overwrite

    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    check_overwrite(out, [tmp_path / "elsewhere", None])  # fine
    for inside in (out, out / "model", out / "model" / ".." / "model"):
        with pytest.raises(UnsafeOverwriteError, match="contains this command's input"):
            check_overwrite(out, [inside])
    with (
        pytest.raises(UnsafeOverwriteError),
        atomic_output_dir(out, overwrite=True, inputs=[out / "model"]),
    ):
        pass
    assert (out / "model").is_dir() and not list(tmp_path.glob("out.tmp-*"))


def test_outputs_follow_the_umask(tmp_path):
    import os

    from moetool.io import atomic_output_dir

    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "o") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755  # mkdtemp alone gives 0o700
