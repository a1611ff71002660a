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


def test_an_image_inside_an_input_folder_is_refused_even_with_force(tmp_path):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    (imgs / "sub" / "0001_a.png").write_bytes(b"png")
    link = tmp_path / "link"  # the folder reached through a symbolic link
    link.symlink_to(imgs)
    for out in (imgs / "sub" / "0001_a.png", imgs / "new.JPG", link / "sub" / "0001_a.png"):
        with pytest.raises(NormswapError, match="would be an image inside .*the image folder this run reads as "
                                                "--calib data"):
            OutputSet({"-o": out}, inputs=[("the --calib data", imgs)], force=True).claim()
    assert (imgs / "sub" / "0001_a.png").read_bytes() == b"png" and sorted(os.listdir(imgs)) == ["sub"]
    # an image the folder reads through a symbolic link to elsewhere, named either way
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "0002_b.png").write_bytes(b"png2")
    (imgs / "ext").symlink_to(tmp_path / "elsewhere")
    for out in (imgs / "ext" / "0002_b.png", tmp_path / "elsewhere" / "0002_b.png"):
        with pytest.raises(NormswapError, match="would be an image inside"):
            OutputSet({"-o": out}, inputs=[("the --calib data", imgs)], force=True).claim()
    assert (tmp_path / "elsewhere" / "0002_b.png").read_bytes() == b"png2"
    (imgs / "ext").unlink()
    # a file the folder scan never reads may go there (an ONNX file, a report)
    with OutputSet({"--onnx": imgs / "m.onnx"}, inputs=[("the --calib data", imgs)]) as outs:
        outs.staged("--onnx").write_text("onnx")
        outs.commit()
    assert (imgs / "m.onnx").read_text() == "onnx"


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


def _killed_mid_commit(tmp_path, force: bool, after: str) -> None:
    """A real child process claims and stages m.pt + m.onnx, then is SIGKILLed right after its
    first ``after`` call (os.link without --force, os.replace with it) during the commit."""
    code = textwrap.dedent(f"""
        import os, signal
        from normswap.outputs import OutputSet
        o = OutputSet({{"-o": {str(tmp_path / 'm.pt')!r}, "--onnx": {str(tmp_path / 'm.onnx')!r}}},
                      force={force!r}).claim()
        o.staged("-o").write_text("new model")
        o.staged("--onnx").write_text("new onnx")
        real = getattr(os, {after!r})
        def once(*a, **k):
            real(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        setattr(os, {after!r}, once)
        o.commit()
    """)
    subprocess.run([sys.executable, "-c", code], check=False, timeout=120)


@pytest.mark.parametrize("force, after", [(False, "link"), (True, "replace")])
def test_an_interrupted_commit_is_completed_by_the_next_run(tmp_path, force, after):
    if force:
        (tmp_path / "m.pt").write_text("old model")
        (tmp_path / "m.onnx").write_text("old onnx")
    _killed_mid_commit(tmp_path, force, after)
    left = os.listdir(tmp_path)
    assert any(n.startswith(".normswap-commit-") for n in left), left  # killed between its moves
    done = clean_leftovers(tmp_path)
    assert any("completed" in d for d in done), done
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.pt"]
    assert (tmp_path / "m.pt").read_text() == "new model" and (tmp_path / "m.onnx").read_text() == "new onnx"


def test_a_recovery_never_moves_over_an_input_of_the_recovering_run(tmp_path):
    (tmp_path / "m.pt").write_text("old model")
    (tmp_path / "m.onnx").write_text("old onnx")
    _killed_mid_commit(tmp_path, True, "replace")
    warns: list[str] = []
    clean_leftovers(tmp_path, protect=[tmp_path / "m.onnx"], warnings=warns)
    assert (tmp_path / "m.onnx").read_text() == "old onnx"  # the input stays as it was
    assert any("input of this run" in w for w in warns), warns


def _planted(tmp_path, doc, name="999999"):
    import json

    (tmp_path / f".normswap-commit-{name}.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))


@pytest.mark.parametrize("form", ["old list", "outside the folder", "absolute path", "at the input", "no nonce",
                                  "wrong nonce", "not staged", "garbage", "symlink staged"])
def test_a_planted_journal_moves_nothing(tmp_path, form):
    victim, model = tmp_path / "victim.txt", tmp_path / "m.pt"
    victim.write_text("victim")
    model.write_text("model")
    nonce = "0123456789abcdef"
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("outside")
    staged = f".victim.normswap-999999-{nonce}.tmp.txt"
    docs = {
        "old list": [["m.pt", "victim.txt"]],
        "outside the folder": {"normswap_journal": 1, "pid": 999999, "start": "1", "nonce": nonce,
                               "moves": [[staged, f"../{outside.name}"]]},
        "absolute path": {"normswap_journal": 1, "pid": 999999, "start": "1", "nonce": nonce,
                          "moves": [[str(model), str(victim)]]},
        "at the input": {"normswap_journal": 1, "pid": 999999, "start": "1", "nonce": nonce,
                         "moves": [["m.pt", "victim.txt"]]},
        "no nonce": {"normswap_journal": 1, "pid": 999999, "start": "1",
                     "moves": [[staged, "victim.txt"]]},
        "wrong nonce": {"normswap_journal": 1, "pid": 999999, "start": "1", "nonce": "f" * 16,
                        "moves": [[staged, "victim.txt"]]},
        "not staged": {"normswap_journal": 1, "pid": 999999, "start": "1", "nonce": nonce,
                       "moves": [["m.pt", "victim.txt"]]},
        "garbage": "{not json",
        "symlink staged": {"normswap_journal": 1, "pid": 999999, "start": "1", "nonce": nonce, "force": True,
                           "moves": [[staged, "victim.txt"]]},
    }
    if form == "symlink staged":
        (tmp_path / staged).symlink_to(model)
    else:
        (tmp_path / staged).write_text("planted")
    _planted(tmp_path, docs[form])
    warns: list[str] = []
    clean_leftovers(tmp_path, protect=[model], warnings=warns)
    assert victim.read_text() == "victim" and model.read_text() == "model" and outside.read_text() == "outside"
    if form != "symlink staged":
        assert warns and "alone" in warns[0], warns
    outside.unlink()


def test_a_journal_of_a_live_run_is_left_alone(tmp_path):
    import json

    (tmp_path / "victim.txt").write_text("victim")
    nonce = "0123456789abcdef"
    pid = os.getppid()  # alive
    from normswap.outputs import _start_time

    s = tmp_path / f".victim.normswap-{pid}-{nonce}.tmp.txt"
    s.write_text("staged")
    (tmp_path / f".normswap-commit-{pid}.json").write_text(json.dumps(
        {"normswap_journal": 1, "pid": pid, "start": _start_time(pid), "nonce": nonce, "force": True,
         "moves": [[s.name, "victim.txt"]]}))
    clean_leftovers(tmp_path)
    assert (tmp_path / "victim.txt").read_text() == "victim"
    assert (tmp_path / f".normswap-commit-{pid}.json").exists()


def test_a_journal_whose_pid_was_recycled_is_completed(tmp_path):
    """Same pid as a live process, another start time: the journal's run is gone."""
    import json

    nonce = "0123456789abcdef"
    pid = os.getppid()
    s = tmp_path / f".m.normswap-{pid}-{nonce}.tmp.pt"
    s.write_text("new model")
    (tmp_path / f".normswap-commit-{pid}.json").write_text(json.dumps(
        {"normswap_journal": 1, "pid": pid, "start": "1", "nonce": nonce, "force": False,
         "moves": [[s.name, "m.pt"]]}))
    done = clean_leftovers(tmp_path)
    assert any("completed" in d for d in done) and (tmp_path / "m.pt").read_text() == "new model"
    assert os.listdir(tmp_path) == ["m.pt"]


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
