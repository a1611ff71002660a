"""Issue 12 regressions as real subprocesses: ``normswap fold`` killed with SIGTERM / SIGKILL at
several points leaves no final file (only recognisable hidden files, which the next run
removes), and of two concurrent runs to the same outputs the loser exits 2 without touching
the winner's set, which stays consistent (the ONNX file matches the model)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normswap.outputs import STAGED_RE

ROOT = Path(__file__).resolve().parents[1]
ARCH = "samples.digits:digits_resnet"
HIDDEN = ("normswap-claim", ".normswap-commit-")


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture()
def work(tmp_path):
    from samples.digits import digits_resnet
    from samples.models import randomize_norm_stats

    torch.manual_seed(0)
    torch.save(randomize_norm_stats(digits_resnet()).eval().state_dict(), tmp_path / "m.pt")
    return tmp_path


def _cmd(work: Path, *more):
    return [sys.executable, "-m", "normswap_cli.main", "fold", str(work / "m.pt"), "--arch", ARCH,
            "--input-shape", "2,1,32,32", "-o", str(work / "out.pt"), "--onnx", str(work / "out.onnx"), *more]


def _start(work: Path, *more, pause: float = 0.0):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if pause:  # hold the run with every output staged (normswap.outputs._pause_before_commit)
        env["NORMSWAP_PAUSE_BEFORE_COMMIT"] = str(pause)
    return subprocess.Popen(_cmd(work, *more), cwd=str(work), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(work: Path, pred, proc, timeout=120.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred(os.listdir(work)):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def _recognisable(name: str) -> bool:
    return bool(STAGED_RE.match(name)) or name.endswith(".normswap-claim") or name.startswith(".normswap-commit-")


POINTS = {
    "claimed": lambda names: any(n.endswith(".normswap-claim") for n in names),
    "model staged": lambda names: any(STAGED_RE.match(n) and n.endswith(".pt") for n in names),
    "onnx staged": lambda names: any(STAGED_RE.match(n) and n.endswith(".onnx") for n in names),
}


_FAST = {("SIGTERM", "onnx staged"), ("SIGKILL", "model staged")}  # the rest: -m slow
CASES = [pytest.param(sig, point, id=f"{name}-{point.replace(' ', '_')}",
                      marks=() if (name, point) in _FAST else pytest.mark.slow)
         for name, sig in (("SIGTERM", signal.SIGTERM), ("SIGKILL", signal.SIGKILL)) for point in POINTS]


@pytest.mark.parametrize("sig, point", CASES)
def test_a_killed_fold_leaves_no_final_file_and_the_next_run_cleans_up(work, sig, point):
    before = _digest(work / "m.pt")
    for _attempt in range(5):  # a fast run can pass the point between two polls: try again
        proc = _start(work, pause=30.0 if point == "onnx staged" else 0.0)
        reached = _wait_for(work, POINTS[point], proc)
        if reached:
            break
        out, err = proc.communicate()
        if proc.returncode != 0:
            pytest.fail(f"never reached {point!r} (rc {proc.returncode}): {err[-2000:]}")
        for name in ("out.pt", "out.onnx"):
            (work / name).unlink(missing_ok=True)
    else:
        pytest.fail(f"never caught a run at {point!r} in 5 runs (each finished first)")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    left = set(os.listdir(work)) - {"m.pt"}
    committed = proc.returncode == 0 or "after the outputs were written" in err
    if committed:  # the signal came after the commit: the whole set is there, and says so
        assert {"out.pt", "out.onnx"} <= left, (left, err)
        assert proc.returncode in (0, 143), (proc.returncode, err)
    else:
        assert not {"out.pt", "out.onnx"} & left, (left, err)  # never one final file of the set
        assert all(_recognisable(n) for n in left), left
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and "interrupted" in err, err
            assert left == set(), left  # a SIGTERMed run removes its own staged files and claims
    assert _digest(work / "m.pt") == before
    # the next run is not blocked by the leftovers, removes them and writes the whole set
    again = subprocess.run(_cmd(work, "--force"), cwd=str(work), env=dict(os.environ, PYTHONPATH=str(ROOT)),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert sorted(os.listdir(work)) == ["m.pt", "out.onnx", "out.pt"]


def test_two_concurrent_folds_to_the_same_outputs(work):
    a = _start(work)
    assert _wait_for(work, POINTS["claimed"], a)
    b = _start(work)  # starts while a holds the claim
    out_b, err_b = b.communicate(timeout=300)
    out_a, err_a = a.communicate(timeout=300)
    assert a.returncode == 0, err_a
    assert b.returncode == 2, (out_b, err_b)
    assert "being written by another normswap run" in err_b or "exists" in err_b, err_b
    assert sorted(os.listdir(work)) == ["m.pt", "out.onnx", "out.pt"]
    # the winner's set is consistent: its ONNX file computes what its model computes
    from normswap.check import check
    from normswap.io import load_model

    loaded = load_model(work / "out.pt", arch=ARCH)
    rep = check(loaded, work / "out.onnx", torch.randn(2, 1, 32, 32), providers="cpu", repeats=0, warmup=0)
    assert rep.passed, rep.summary_line()
