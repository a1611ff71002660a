"""normswap.outputs: outputs claimed as a whole, staged, committed together; leftovers of killed
runs recognised and cleaned; inputs never overwritten."""

import os
import subprocess
import sys
import textwrap

import pytest

from normswap.errors import NormswapError
from normswap.outputs import OutputSet, clean_leftovers


def test_an_output_naming_an_input_is_refused_even_with_force(tmp_path):
    calib = tmp_path / "calib.npz"
    calib.write_bytes(b"data")
    with pytest.raises(NormswapError, match="is an input of this run"):
        OutputSet({"--onnx": calib}, inputs=[tmp_path / "m.pt", calib], force=True).claim()
    assert calib.read_bytes() == b"data"


def test_two_outputs_on_one_file_are_refused(tmp_path):
    with pytest.raises(NormswapError, match="would both be"):
        OutputSet({"-o": tmp_path / "a.pt", "--json": tmp_path / "a.pt"}).claim()


def test_existing_output_needs_force_and_nothing_is_touched(tmp_path):
    a = tmp_path / "a.pt"
    a.write_text("old")
    with pytest.raises(NormswapError, match="exists; pass --force"):
        OutputSet({"-o": a}).claim()
    assert a.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.pt"]


def test_commit_moves_the_set_and_release_leaves_nothing(tmp_path):
    outs = OutputSet({"-o": tmp_path / "m.pt", "--onnx": tmp_path / "m.onnx"})
    with outs:
        outs.staged("-o").write_text("model")
        outs.staged("--onnx").write_text("onnx")
        assert not (tmp_path / "m.pt").exists()
        outs.commit()
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.pt"]


def test_a_failed_run_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with OutputSet({"-o": tmp_path / "m.pt", "--onnx": tmp_path / "m.onnx"}) as outs:
            outs.staged("-o").write_text("model")
            raise RuntimeError("export failed")
    assert os.listdir(tmp_path) == []


def test_a_second_run_on_claimed_names_stops_and_touches_nothing(tmp_path):
    first = OutputSet({"-o": tmp_path / "m.pt", "--onnx": tmp_path / "m.onnx"}).claim()
    first.staged("-o").write_text("winner")
    with pytest.raises(NormswapError, match="being written by another normswap run"):
        OutputSet({"-o": tmp_path / "x.pt", "--onnx": tmp_path / "m.onnx"}).claim()
    first.staged("--onnx").write_text("winner onnx")
    first.commit()
    first.release()
    assert (tmp_path / "m.onnx").read_text() == "winner onnx"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.pt"]


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    # a child claims and stages, then is SIGKILLed before committing
    code = textwrap.dedent(f"""
        import os, signal
        from normswap.outputs import OutputSet
        o = OutputSet({{"-o": {str(tmp_path / 'm.pt')!r}, "--onnx": {str(tmp_path / 'm.onnx')!r}}}).claim()
        o.staged("-o").write_text("partial")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    subprocess.run([sys.executable, "-c", code], check=False)
    left = os.listdir(tmp_path)
    assert left and not {"m.pt", "m.onnx"} & set(left)  # hidden leftovers only, no final file
    outs = OutputSet({"-o": tmp_path / "m.pt", "--onnx": tmp_path / "m.onnx"}).claim()  # not "being written"
    assert any("killed run" in n for n in outs.notes)
    outs.release()
    assert os.listdir(tmp_path) == []


def test_an_interrupted_commit_is_completed_by_the_next_run(tmp_path):
    # simulate a SIGKILL between the two renames: journal + one staged file still there
    import json

    dead = 999999
    s = tmp_path / f".m.normswap-{dead}.tmp.onnx"
    s.write_text("onnx")
    (tmp_path / "m.pt").write_text("model")
    (tmp_path / f".normswap-commit-{dead}.json").write_text(json.dumps([[str(s), str(tmp_path / "m.onnx")]]))
    done = clean_leftovers(tmp_path)
    assert any("completed" in d for d in done)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.pt"]


def test_a_claim_whose_pid_was_reused_is_not_a_live_writer(tmp_path):
    # a claim from a dead run whose pid now belongs to another process (start time differs)
    (tmp_path / ".m.pt.normswap-claim").write_text(f"{os.getpid()} 1")
    outs = OutputSet({"-o": tmp_path / "m.pt"}).claim()
    outs.release()
    assert os.listdir(tmp_path) == []


def test_commit_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    outs = OutputSet({"-o": tmp_path / "m.pt", "--onnx": tmp_path / "m.onnx"}).claim()
    outs.staged("-o").write_text("mine")
    outs.staged("--onnx").write_text("mine")
    (tmp_path / "m.onnx").write_text("someone else's")  # not a normswap run: no claim
    with pytest.raises(NormswapError, match="exists"):
        outs.commit()
    outs.release()
    assert (tmp_path / "m.onnx").read_text() == "someone else's"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # and no m.pt without its m.onnx


def test_an_orphan_staged_file_without_its_claim_is_removed(tmp_path):
    (tmp_path / f".m.normswap-{os.getppid()}.tmp.pt").write_text("partial")  # live pid, but no claim
    assert clean_leftovers(tmp_path) and os.listdir(tmp_path) == []
