"""Issue 20 regressions, each with real files and real processes: planted commit journals move
nothing, too-long names and FIFOs are one-line exit-2 errors, a claim held by a program that is
not normswap is waited on for a bounded time with advice, state dicts must fit --arch unless
--non-strict, a static-batch .pt2 checked against a dynamic ONNX file is explained, fold's
Identity keeps the mode, a signal removes a run's hidden files at once, 80-column output,
HTML reports.  The slow cases (a convert killed while it writes) run with ``-m slow``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from normswap.outputs import STAGED_RE

ROOT = Path(__file__).resolve().parents[1]
ARCH = "samples.digits:digits_resnet"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="80", NORMSWAP_CLAIM_WAIT="1")


def md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def run(*args, cwd: Path, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """``normswap ARGS`` as a real process (killed, and the test failed, if it blocks)."""
    return subprocess.run([sys.executable, "-m", "normswap_cli.main", *map(str, args)], cwd=str(cwd),
                          env=env or ENV, capture_output=True, text=True, timeout=timeout)


def hidden(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


@pytest.fixture()
def work(tmp_path):
    from samples.digits import digits_resnet
    from samples.models import randomize_norm_stats

    torch.manual_seed(0)
    torch.save(randomize_norm_stats(digits_resnet()).eval().state_dict(), tmp_path / "m.pt")
    (tmp_path / "victim.txt").write_text("the user's file\n")
    return tmp_path


# ----------------------------------------------------------------------- 1: planted journals

NONCE = "0123456789abcdef"


def _journal(folder: Path, pid: int, moves, *, start="1", nonce=NONCE, force=True, name=None):
    doc = {"normswap_journal": 1, "pid": pid, "start": start, "nonce": nonce, "force": force, "moves": moves}
    (folder / (name or f".normswap-commit-{pid}.json")).write_text(json.dumps(doc))


def test_planted_journals_move_nothing_and_never_touch_the_input(work):
    """Several planted forms at once in the folder a run writes into (its input model is there)."""
    model, victim = work / "m.pt", work / "victim.txt"
    before = {p.name: md5(p) for p in (model, victim)}
    outside = work.parent / f"{work.name}-outside.txt"
    outside.write_text("outside\n")
    # the original attack: an old-style list journal of a dead pid renaming the input
    (work / ".normswap-commit-999991.json").write_text(json.dumps([["m.pt", "victim.txt"]]))
    (work / ".normswap-commit-999992.json").write_text(json.dumps([[str(model), str(victim)]]))
    # well-formed journals: onto the input itself (with a planted staged file), out of the folder
    staged_for_input = f".m.normswap-999993-{NONCE}.tmp.pt"
    (work / staged_for_input).write_text("planted")
    _journal(work, 999993, [[staged_for_input, "m.pt"]])
    _journal(work, 999994, [[f".x.normswap-999994-{NONCE}.tmp.txt", f"../{outside.name}"]])
    # a live pid (this test's parent): must be left alone entirely
    _journal(work, os.getppid(), [["m.pt", "victim.txt"]], start="")
    r = run("audit", model, "--arch", ARCH, "--json", work / "a.json", cwd=work)
    assert r.returncode == 0, r.stderr
    assert {p.name: md5(p) for p in (model, victim)} == before
    assert outside.read_text() == "outside\n"
    assert "left .normswap-commit-99999" in r.stderr and "nothing was moved" in r.stderr
    assert "input of this run" in r.stderr  # the well-formed journal onto m.pt
    assert (work / f".normswap-commit-{os.getppid()}.json").exists()  # a live run's journal: untouched
    outside.unlink()


def test_a_real_interrupted_commit_is_still_completed_by_the_next_cli_run(work):
    """The narrow rules keep the feature: a run SIGKILLed between its moves is completed."""
    code = textwrap.dedent(f"""
        import os, signal
        from normswap.outputs import OutputSet
        o = OutputSet({{"-o": {str(work / 'out.pt')!r}, "--onnx": {str(work / 'out.onnx')!r}}}).claim()
        o.staged("-o").write_text("model")
        o.staged("--onnx").write_text("onnx")
        real = os.link
        def once(*a, **k):
            real(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        os.link = once
        o.commit()
    """)
    subprocess.run([sys.executable, "-c", code], env=ENV, timeout=120)
    assert any(n.startswith(".normswap-commit-") for n in hidden(work))
    r = run("audit", work / "m.pt", "--arch", ARCH, "--json", work / "a.json", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "completed an interrupted write" in r.stderr
    assert (work / "out.pt").read_text() == "model" and (work / "out.onnx").read_text() == "onnx"
    assert hidden(work) == []


# ----------------------------------------------------------------------- 2: names too long


@pytest.mark.parametrize("case", ["-o name", "-o path", "--json name", "MODEL name", "MODEL path", "--calib name"])
def test_too_long_names_are_one_line_exit_2(work, case):
    long_name = "a" * 300
    deep = "/".join(["b" * 200] * 25)
    args = {
        "-o name": ["fold", work / "m.pt", "--arch", ARCH, "-o", work / f"{long_name}.pt"],
        "-o path": ["fold", work / "m.pt", "--arch", ARCH, "-o", work / deep / "x.pt"],
        "--json name": ["audit", work / "m.pt", "--arch", ARCH, "--json", work / f"{long_name}.json"],
        "MODEL name": ["audit", work / f"{long_name}.pt"],
        "MODEL path": ["audit", work / deep / "x.pt"],
        "--calib name": ["export", work / "m.pt", "--arch", ARCH, "-o", work / "e.onnx", "--data",
                         work / f"{long_name}.npz"],
    }[case]
    r = run(*args, cwd=work)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "internal error" not in lines[0], r.stderr
    assert "long" in lines[0] and len(lines[0]) < 400
    assert sorted(os.listdir(work)) == ["m.pt", "victim.txt"]


def test_a_long_but_legal_output_name_works(work):
    """A 250-byte name is legal: its hidden staged/claim names are shortened to fit."""
    name = "c" * 245 + ".json"
    r = run("audit", work / "m.pt", "--arch", ARCH, "--json", work / name, "--quiet", cwd=work)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(work)) == sorted(["m.pt", "victim.txt", name])


# ----------------------------------------------------------------------- 3: FIFOs


@pytest.mark.parametrize("case", ["audit MODEL", "fold --data", "export --calib", "convert --calib",
                                  "convert --eval", "check ONNX", "check --calib", "fold -o"])
def test_a_fifo_is_refused_before_it_is_opened(work, case):
    fifo = work / "pipe"
    os.mkfifo(fifo)
    m = work / "m.pt"
    args = {
        "audit MODEL": ["audit", fifo],
        "fold --data": ["fold", m, "--arch", ARCH, "--data", fifo, "-o", work / "f.pt"],
        "export --calib": ["export", m, "--arch", ARCH, "--data", fifo, "-o", work / "e.onnx"],
        "convert --calib": ["convert", m, "--arch", ARCH, "--to", "gn", "--calib", fifo],
        "convert --eval": ["convert", m, "--arch", ARCH, "--to", "gn", "--calib", "random", "--input-shape",
                           "4,1,32,32", "--eval", fifo],
        "check ONNX": ["check", m, "--arch", ARCH, fifo],
        "check --calib": ["check", m, "--arch", ARCH, work / "x.onnx", "--data", fifo],
        "fold -o": ["fold", m, "--arch", ARCH, "-o", fifo, "--force"],
    }[case]
    t0 = time.time()
    r = run(*args, cwd=work, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "FIFO" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert time.time() - t0 < 30
    assert sorted(os.listdir(work)) == ["m.pt", "pipe", "victim.txt"]


# ----------------------------------------------------------------------- 4: claims held by others

_HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, sys.argv[2].encode())
    print("locked", flush=True)
    time.sleep(120)
""")


def _hold(claim: Path, content: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(claim), content], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


@pytest.mark.parametrize("content", ["", "self", "1 2 3"])
def test_a_claim_locked_by_a_program_that_is_not_normswap_times_out_with_advice(work, content):
    claim = work / ".a.json.normswap-claim"
    holder = _hold(claim, str(os.getpid()) if content == "self" else content)  # "self": a live pid, no start
    try:
        t0 = time.time()
        r = run("--force", "audit", work / "m.pt", "--arch", ARCH, "--json", work / "a.json", cwd=work, timeout=60)
        took = time.time() - t0
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2, r.stderr
    assert ".a.json.normswap-claim" in r.stderr and "not a normswap run" in r.stderr, r.stderr
    assert "delete" in r.stderr and f"pid {holder.pid}" in r.stderr
    assert took < 30
    assert not (work / "a.json").exists()


def test_a_claim_naming_a_live_program_that_holds_no_lock_is_taken_over(work):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (work / ".a.json.normswap-claim").write_text(f"{sleeper.pid}")
        r = run("audit", work / "m.pt", "--arch", ARCH, "--json", work / "a.json", "--quiet", cwd=work)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert r.returncode == 0, r.stderr
    assert json.loads((work / "a.json").read_text())["job"] == "audit"
    assert hidden(work) == []


def test_a_fifo_claim_is_refused_at_once(work):
    os.mkfifo(work / ".a.json.normswap-claim")
    t0 = time.time()
    r = run("--force", "audit", work / "m.pt", "--arch", ARCH, "--json", work / "a.json", cwd=work, timeout=60)
    assert r.returncode == 2 and "is a FIFO, not a normswap claim file" in r.stderr, r.stderr
    assert time.time() - t0 < 20


def test_a_live_normswap_claim_still_stops_a_second_run_at_once(work):
    from normswap.outputs import OutputSet

    outs = OutputSet({"--json": work / "a.json"}).claim()  # this process: a live normswap run
    try:
        t0 = time.time()
        r = run("audit", work / "m.pt", "--arch", ARCH, "--json", work / "a.json", cwd=work, timeout=60)
    finally:
        outs.release()
    assert r.returncode == 2 and "being written by another normswap run" in r.stderr, r.stderr
    assert time.time() - t0 < 20  # no waiting for a live normswap run


# ----------------------------------------------------------------------- 6: keys must fit --arch


@pytest.fixture()
def unexpected(work):
    sd = torch.load(work / "m.pt", weights_only=True)
    sd["head2.weight"] = torch.zeros(3, 3)
    sd["head2.bias"] = torch.zeros(3)
    torch.save(sd, work / "wrong.pt")
    return work / "wrong.pt"


@pytest.mark.parametrize("cmd", ["audit", "fold", "convert", "export", "check"])
def test_unexpected_keys_alone_are_an_error_without_non_strict(work, unexpected, cmd):
    extra = {"audit": [], "fold": ["-o", work / "f.pt"], "convert": ["--to", "bn"],
             "export": ["-o", work / "e.onnx"], "check": [work / "x.onnx"]}[cmd]
    if cmd == "check":
        (work / "x.onnx").write_bytes(b"\x08\x07")
    r = run(cmd, unexpected, "--arch", ARCH, *extra, cwd=work)
    assert r.returncode == 2, r.stderr
    assert "does not fit --arch" in r.stderr and "head2.weight" in r.stderr and "--non-strict" in r.stderr


def test_non_strict_lists_the_keys_in_the_terminal_and_json_reports(work, unexpected):
    r = run("audit", unexpected, "--arch", ARCH, "--non-strict", "--json", work / "a.json", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "head2.weight" in r.stdout and "--non-strict" in r.stdout
    d = json.loads((work / "a.json").read_text())
    assert d["load"]["unexpected_keys"] == ["head2.weight", "head2.bias"]
    assert any("ignored" in w for w in d["summary_warnings"])


def test_non_strict_is_spelled_the_same_on_every_command_with_arch():
    for cmd in ("audit", "fold", "convert", "export", "check"):
        r = subprocess.run([sys.executable, "-m", "normswap_cli.main", cmd, "--help"], capture_output=True,
                           text=True, env=ENV, cwd=ROOT)
        assert "--arch" in r.stdout and "--non-strict" in r.stdout, cmd


# ----------------------------------------------------------------------- 8: static-batch .pt2


def test_a_static_batch_program_against_a_dynamic_onnx_is_explained(tmp_path):
    from normswap.export import export

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)).mean((2, 3))

    m = Tiny().eval()
    torch.export.save(torch.export.export(m, (torch.randn(2, 1, 8, 8),)), tmp_path / "static.pt2")
    export(m, tmp_path / "dyn.onnx", (torch.randn(2, 1, 8, 8),))
    r = run("check", tmp_path / "static.pt2", tmp_path / "dyn.onnx", "--providers", "cpu", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "accepts only batch size 2" in lines[0] and "Guard" not in lines[0], r.stderr


# ----------------------------------------------------------------------- 9: fold keeps the mode


def test_fold_inserts_modules_in_the_mode_of_the_ones_they_replace(work):
    from normswap.fold import fold
    from normswap.io import load_model

    model = load_model(work / "m.pt", arch=ARCH).module
    assert not any(m.training for m in model.modules())
    folded, _ = fold(model, torch.randn(2, 1, 32, 32))
    assert not any(m.training for m in folded.modules())
    r = run("fold", work / "m.pt", "--arch", ARCH, "-o", work / "f.pt", "--onnx", work / "f.onnx",
            "--input-shape", "2,1,32,32", "--json", work / "f.json", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "training mode" not in (work / "f.json").read_text()


# ----------------------------------------------------------------------- 10: signals


_SWALLOWER = textwrap.dedent("""
    import os, sys, time
    from normswap.outputs import OutputSet, install_signal_handlers
    install_signal_handlers()
    folder = sys.argv[1]
    o = OutputSet({"-o": os.path.join(folder, "out.pt"), "--onnx": os.path.join(folder, "out.onnx")}).claim()
    o.staged("-o").write_text("partial")
    print("staged", flush=True)
    deadline = time.time() + 60
    while time.time() < deadline:      # code that swallows the interrupt (as some libraries do)
        try:
            time.sleep(0.05)
        except BaseException:
            pass
""")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_removes_the_staged_files_and_claims_at_once(tmp_path, sig):
    p = subprocess.Popen([sys.executable, "-c", _SWALLOWER, str(tmp_path)], env=ENV, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "staged"
        assert len(hidden(tmp_path)) == 3  # two claims, one staged file
        p.send_signal(getattr(signal, sig))
        t0 = time.time()
        while hidden(tmp_path) and time.time() - t0 < 10:
            time.sleep(0.05)
        assert os.listdir(tmp_path) == []  # removed while the process still runs
    finally:
        p.kill()
        p.wait()


_HANDLED_BEFORE = textwrap.dedent("""
    import sys
    from normswap_cli.main import cli, main
    def interrupted(*args, **kwargs):  # a Ctrl-C that ends a string exec (namedtuple, dataclass)
        try:                           # in an import, handled the way the commands handle it
            exec("raise KeyboardInterrupt", {})
        except KeyboardInterrupt:
            sys.exit(130)
    def unhandled(*args, **kwargs):    # a Ctrl-C nobody handles
        exec("raise KeyboardInterrupt", {})
    if sys.argv[1] != "-":
        cli.main = {"interrupted": interrupted, "unhandled": unhandled}[sys.argv[1]]
    main(sys.argv[2:])
""")


@pytest.mark.parametrize("args, code", [(["interrupted"], 130), (["-", "--version"], 0),
                                        (["-", "audit", "no-such-file.pt"], 2),
                                        (["unhandled"], -signal.SIGINT)])  # still a death by SIGINT
def test_a_handled_interrupt_never_turns_the_exit_status_into_a_death_by_sigint(tmp_path, args, code):
    """CPython marks a KeyboardInterrupt that ended a string exec as unhandled even when it was
    caught, and under ``python -m`` then kills itself with SIGINT at exit (exit -2 instead of 130:
    seen once in ~50 interrupted convert runs). The CLI clears the mark before it exits."""
    (tmp_path / "handled_before.py").write_text(_HANDLED_BEFORE)
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    r = subprocess.run([sys.executable, "-m", "handled_before", *args], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == code, (r.returncode, r.stderr)


def _convert(work: Path, *more):
    return [sys.executable, "-m", "normswap_cli.main", "convert", str(work / "m.pt"), "--arch", ARCH, "--to", "gn",
            "--calib", "random", "--input-shape", "8,1,32,32", "--mode", "fast", *more]


POINTS = {
    "claimed": lambda names: any(n.endswith(".normswap-claim") for n in names),
    "model staged": lambda names: any(STAGED_RE.match(n) and n.endswith(".pt") for n in names),
    "onnx staged": lambda names: any(STAGED_RE.match(n) and n.endswith(".onnx") for n in names),
}


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("point", list(POINTS))
def test_a_convert_interrupted_while_it_writes_leaves_nothing(work, sig, point):
    before = md5(work / "m.pt")
    env = dict(ENV)
    if point == "onnx staged":  # hold the run with every output staged: a poller can miss that moment
        env["NORMSWAP_PAUSE_BEFORE_COMMIT"] = "30"
    p = subprocess.Popen(_convert(work), cwd=str(work), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    t0 = time.time()
    while not POINTS[point](os.listdir(work)) and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.005)
    if point == "onnx staged":
        # the exporter writes the staged file before the parity check: signal inside the 30 s hold
        # (once in CI a SIGINT that landed during the export exited 130 with an empty stderr; not
        # reproduced in 30 runs here: see the closing note)
        time.sleep(8)
    assert p.poll() is None, p.communicate()
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=120)
    left = sorted(os.listdir(work))
    if p.returncode == 0 or "after the outputs were written" in err:  # the signal came after the commit
        assert {"m.gn.pt", "m.gn.onnx"} <= set(left), (left, err)
        assert p.returncode in (0, 128 + getattr(signal, sig)), (p.returncode, err)
    else:
        assert p.returncode == 128 + getattr(signal, sig) and "interrupted by " + sig in err, err
        assert left == ["m.pt", "victim.txt"], left
    assert md5(work / "m.pt") == before


@pytest.mark.slow
def test_a_sigkilled_convert_is_cleaned_by_the_next_run(work):
    p = subprocess.Popen(_convert(work), cwd=str(work), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while not POINTS["model staged"](os.listdir(work)) and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.005)
    p.kill()
    p.communicate()
    assert not {"m.gn.pt", "m.gn.onnx"} & set(os.listdir(work))
    r = subprocess.run(_convert(work, "--quiet"), cwd=str(work), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(work)) == ["m.gn.onnx", "m.gn.pt", "m.pt", "victim.txt"]


# ----------------------------------------------------------------------- 11: 80 columns


class LongBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.depthwise_separable_convolution = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.batch_normalization_after_depthwise = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.batch_normalization_after_depthwise(self.depthwise_separable_convolution(x))


def long_names():
    model = torch.nn.Sequential()
    model.add_module("encoder_stage_one_residual_blocks", torch.nn.Sequential(LongBlock(), LongBlock()))
    return model.eval()


def test_layer_names_are_never_cut_at_80_columns(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from normswap_cli.main import cli

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    torch.save(long_names().state_dict(), tmp_path / "long.pt")
    names = ["encoder_stage_one_residual_blocks.0.batch_normalization_after_depthwise",
             "encoder_stage_one_residual_blocks.1.batch_normalization_after_depthwise"]
    arch = "test_hostile_20:long_names"
    for args in (["audit", tmp_path / "long.pt", "--arch", arch],
                 ["fold", tmp_path / "long.pt", "--arch", arch, "-o", tmp_path / "f.pt"]):
        r = CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "80"})
        assert r.exit_code == 0, r.output
        for n in names:
            assert n in r.output, r.output  # whole, on one line


def test_summary_lines_wrap_at_80_columns_and_join_back():
    from normswap_cli.common import unwrap_summary, wrap_summary

    line = ("PASSED | normswap convert | 11 bn->gn sites | calibrated (sequential, 256 samples): top-1 agreement "
            "99.2%, accuracy 99.2% (original 100.0%) in-sample (on the calibration data; pass --eval for held-out "
            "numbers) | wrote m.gn.pt, m.gn.onnx | parity ok | warning: 1 tensor missing from the file")
    lines = wrap_summary(line, 80)
    assert lines[0].startswith("PASSED | normswap convert | ")
    assert all(len(ln) <= 80 for ln in lines) and all(ln.startswith("  ") for ln in lines[1:])
    assert unwrap_summary("table\n" + "\n".join(lines)) == line


def test_check_at_80_columns_has_no_torch_ms_column(work):
    from normswap.export import export
    from normswap.io import load_model

    export(load_model(work / "m.pt", arch=ARCH), work / "m.onnx", (torch.randn(2, 1, 32, 32),))
    r = run("check", work / "m.pt", "--arch", ARCH, work / "m.onnx", "--providers", "cpu", "--repeats", "1", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "torch ms" not in r.stdout
    assert max(len(ln) for ln in r.stdout.splitlines()) <= 80, r.stdout


# ----------------------------------------------------------------------- 12: HTML reports


def test_html_reports_name_layers_on_axes_and_say_passed(tmp_path):
    from normswap.html_report import check_report_html, convert_report_html

    layers = [{"name": f"layer{i}.bn", "source_type": "BatchNorm2d", "target_type": "GroupNorm", "channels": 8,
               "groups": 2, "method": "fitted", "err_naive": 0.2, "err_fitted": 0.05} for i in range(3)]
    html = convert_report_html({"target": "gn", "sources": ["bn"], "layers": layers, "calibrated": True,
                                "mode": "sequential", "passed": True, "fidelity": {"samples": 8, "kl": 0.0}})
    assert "PASSED" in html and ">OK<" not in html
    assert "<title>#1 layer1.bn</title>" in html  # hover over a layer's column
    assert ">1 layer1.bn<" in html  # and a tick naming it
    uncal = convert_report_html({"target": "in", "sources": ["bn"], "calibrated": False, "mode": "sequential",
                                 "passed": True, "layers": [dict(layers[0], err_naive=None, err_fitted=None,
                                                                 method="copied", groups=None)]})
    assert "sequential" not in uncal and "Uncalibrated" in uncal and "Converted layers (1 layer)" in uncal
    assert "No fidelity numbers" not in uncal
    loc = {"status": "ok", "passed": True, "layers": [{"index": 0, "name": "conv", "type": "Conv2d",
                                                       "own_max_abs": 0.0, "acc_max_abs": 1e-7, "tolerance": 1e-3,
                                                       "acc_passed": True}], "unmapped": []}
    check = check_report_html({"onnx_path": "m.onnx", "passed": True, "providers": [], "locate": loc})
    assert "1 layer mapped" in check and "1 layers" not in check


def test_locate_advice_names_the_cli_flag():
    import normswap.locate_map as lm

    text = Path(lm.__file__).read_text()
    assert "keep_norms=True" not in text and "--keep-norms" in text
