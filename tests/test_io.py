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


def test_a_write_known_not_to_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    import errno
    import shutil

    from moetool.io import check_free_space, describe_write_error

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10**9))
    check_free_space(tmp_path / "not/yet/there", 10**9)  # fits exactly; parents measured
    with pytest.raises(OSError) as caught:
        check_free_space(tmp_path / "out", 10**9 + 1)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "out")
    line = describe_write_error(caught.value)
    assert "needs 1.00 GB" in line and "1.00 GB free" in line and str(tmp_path) in line
    assert line.endswith("free space there (or choose another output) and run again")


def test_write_errors_are_one_line_and_other_errors_are_not_hidden(monkeypatch, capsys):
    import errno

    import moetool.cli.app as cli_app

    def read_only():
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out.tmp-1/model.safetensors")

    monkeypatch.setattr(cli_app, "app", read_only)
    with pytest.raises(SystemExit) as exit_:
        cli_app.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Read-only file system (/mnt/ro/out.tmp-1/model.safetensors)")
    assert "writable filesystem" in err and "Traceback" not in err

    def bug():
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cli_app, "app", bug)
    with pytest.raises(OSError, match="Input/output"):
        cli_app.main()
