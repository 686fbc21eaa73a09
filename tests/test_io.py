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
