"""Attack the command line as a hostile user would and print the table for a closing note.

Every case runs the installed ``normswap`` in a fresh folder with real files (the bundled digits
model and data, PNG folders written from them, real ONNX / .pt2 files) and records the exit code,
the first line of stderr, whether any input changed (SHA-256 before/after) and what the output folder
holds afterwards.  Expected: exit 2 with one line for bad input (130/143 for signals), inputs intact,
no output left behind by a failed run.

    python benchmarks/hostile_table.py            # ~3 minutes on 2 cores
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "samples" / "digits"
ARCH = "samples.digits:digits_resnet"


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:  # (is_file() leaves FIFOs out)
            h.update(str(f).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                PYTHONWARNINGS="ignore")


def _run(args, cwd, timeout=300, kill_after=None, sig=signal.SIGTERM, env=None):
    cmd = ["normswap", *args]
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(_env(), COLUMNS="80", **(env or {})))
    if kill_after is not None:
        time.sleep(kill_after)
        p.send_signal(sig)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        return 124, "(timed out)", time.time() - t0, out, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    tb = any("Traceback" in ln for ln in lines)
    first = "TRACEBACK" if tb else (lines[0] if lines else (out.strip().splitlines() or [""])[-1])
    return p.returncode, first, time.time() - t0, out, err


_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def _png_folder(dst: Path, n: int, split: str = "calib"):
    import numpy as np
    from PIL import Image

    d = np.load(DIGITS / f"{split}.npz")
    x, y = d["x"][:n], d["y"][:n]
    for i, (img, lab) in enumerate(zip(x, y)):
        a = img[0]
        a = ((a - a.min()) / (a.max() - a.min() + 1e-9) * 255).astype("uint8")
        (dst / str(int(lab))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(dst / str(int(lab)) / f"{i:04d}.png")


def main() -> int:
    import numpy as np
    import torch

    base = Path(tempfile.mkdtemp(prefix="ns-hostile-"))
    model = base / "in" / "digits.pt"
    model.parent.mkdir()
    model.write_bytes((DIGITS / "digits_resnet.pt").read_bytes())
    calib = base / "in" / "calib.npz"
    calib.write_bytes((DIGITS / "calib.npz").read_bytes())
    test = base / "in" / "test.npz"
    test.write_bytes((DIGITS / "test.npz").read_bytes())
    imgs = base / "in" / "imgs"
    _png_folder(imgs, 64)
    bad = base / "in" / "bad_imgs"
    _png_folder(bad, 32)
    (bad / "3" / "9999_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    empty = base / "in" / "empty"
    empty.mkdir()
    fifo = base / "in" / "fifo.pt"
    os.mkfifo(fifo)
    nanck = base / "in" / "nan.pt"
    sd = torch.load(model, weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    k = next(k for k in sd if k.endswith("running_var"))
    sd2 = dict(sd)
    sd2[k] = sd[k].clone()
    sd2[k][0] = float("nan")
    torch.save(sd2, nanck)
    wrong = base / "in" / "wrong_arch.pt"
    torch.save({**sd, "extra.weight": torch.zeros(3)}, wrong)
    trunc = base / "in" / "trunc.pt"
    trunc.write_bytes(model.read_bytes()[:5000])
    pickled = base / "in" / "pickled.pt"
    sys.path.insert(0, str(REPO))
    from samples.digits import digits_resnet

    m = digits_resnet()
    m.load_state_dict(sd)
    m.eval()
    torch.save(m, pickled)
    static_pt2 = base / "in" / "static.pt2"
    torch.export.save(torch.export.export(m, (torch.randn(2, 1, 32, 32),)), static_pt2)
    dyn_onnx = base / "in" / "dyn.onnx"
    subprocess.run(["normswap", "export", str(model), "--arch", ARCH, "-o", str(dyn_onnx),
                    "--input-shape", "2,1,32,32"], check=True, capture_output=True, env=_env(), cwd=REPO)
    wrongshape = base / "in" / "rgb.npz"
    np.savez(wrongshape, x=np.random.rand(8, 3, 32, 32).astype("float32"))
    inputs = [base / "in"]
    conv = ["convert", str(model), "--arch", ARCH, "--to", "gn", "--no-onnx", "-o", "conv.pt"]  # a later -o wins
    cases = [
        # (issue, case, args, expected exit, kwargs)
        ("18", "broken PNG in --calib folder", conv + ["--calib", str(bad), "--image-size", "32"], 2, {"need": "9999_broken"}),
        ("18", "same with --skip-bad-images", conv + ["--calib", str(bad), "--image-size", "32", "--skip-bad-images"], 0,
         {}),
        ("18", "empty folder as --calib", conv + ["--calib", str(empty), "--image-size", "32"], 2, {}),
        ("18", "checkpoint with NaN running_var", ["convert", str(nanck), "--arch", ARCH, "--to", "gn",
                                                   "--no-onnx", "--calib", str(calib)], 2, {}),
        ("18", "--calib of 3-channel data, 1-channel model", conv + ["--calib", str(wrongshape)], 2, {}),
        ("18", "--eval is the --calib data", conv + ["--calib", str(calib), "--eval", str(calib)], 2, {}),
        ("18", "--repair without --calib", conv + ["--repair", "--input-shape", "4,1,32,32"], 2, {}),
        ("18", "--time-budget without --repair", conv + ["--calib", str(calib), "--time-budget", "5"], 2, {}),
        ("18", "--preprocess bogus", conv + ["--calib", str(imgs), "--preprocess", "bogus"], 2, {}),
        ("18", "--image-size 0", conv + ["--calib", str(imgs), "--image-size", "0"], 2, {}),
        ("20.1", "planted journal (dead pid) lists the input", None, 0, {"journal": True}),
        ("20.2", "-o with a 300-character file name", conv + ["--calib", str(calib), "-o", "x" * 300 + ".pt"], 2, {}),
        ("20.2", "-o longer than PATH_MAX", conv + ["--calib", str(calib), "-o", "/".join(["d" * 200] * 25) + ".pt"],
         2, {}),
        ("20.3", "FIFO as MODEL", ["audit", str(fifo), "--arch", ARCH], 2, {"timeout": 60}),
        ("20.3", "FIFO as --calib", conv + ["--calib", str(fifo)], 2, {"timeout": 60}),
        ("20.6", "wrong --arch: only unexpected keys", ["convert", str(wrong), "--arch", ARCH, "--to", "gn",
                                                        "--no-onnx", "--calib", str(calib)], 2, {}),
        ("20.6", "same with --non-strict", ["convert", str(wrong), "--arch", ARCH, "--to", "gn", "--no-onnx",
                                            "--calib", str(calib), "--non-strict", "-o", "ns.pt"], 0, {}),
        ("20.7", "--time-budget -1", conv + ["--calib", str(calib), "--repair", "--time-budget", "-1"], 2, {}),
        ("20.7", "--time-budget nan", conv + ["--calib", str(calib), "--repair", "--time-budget", "nan"], 2, {}),
        ("20.7", "--time-budget inf", conv + ["--calib", str(calib), "--repair", "--time-budget", "inf"], 2, {}),
        ("20.8", "static-batch .pt2 vs dynamic ONNX", ["check", str(static_pt2), str(dyn_onnx),
                                                        "--input-shape", "3,1,32,32"], 2, {}),
        ("20.10", "SIGTERM 6 s into convert --repair", conv + ["--calib", str(calib), "--repair", "--time-budget", "60", "-o", "killed.pt"], 143,
         {"kill_after": 6}),
        ("20.10", "SIGINT 6 s into convert --repair", conv + ["--calib", str(calib), "--repair", "--time-budget", "60", "-o", "killed.pt"], 130,
         {"kill_after": 6, "sig": signal.SIGINT}),
        ("20.4", "claim locked by a program that is not normswap", ["--force", "audit", str(model), "--arch", ARCH,
                                                                     "--json", "a.json"], 2, {"foreign": True}),
        ("20.5", "forward raises (3-channel data into a 1-channel model)", conv + ["--calib", str(wrongshape)], 2,
         {"need": "raised"}),
        ("20.9", "fold --onnx of an eval model: no training-mode warning",
         ["fold", str(model), "--arch", ARCH, "--input-shape", "2,1,32,32", "-o", "f.pt", "--onnx", "f.onnx"], 0,
         {"forbid": "training"}),
        ("20.11", "audit at 80 columns: no line over 80", ["audit", str(model), "--arch", ARCH, "--input-shape",
                                                           "2,1,32,32"], 0, {"maxcol": 80}),
        ("20.11", "convert at 80 columns: no line over 80", conv + ["--calib", str(calib), "-o", "c.pt"], 0,
         {"maxcol": 80}),
        ("misc", "two converts to the same -o at once (the second)", conv + ["--calib", str(calib), "-o", "same.pt"],
         2, {"concurrent": True}),
        ("misc", "directory as MODEL", ["audit", str(imgs), "--arch", ARCH], 2, {}),
        ("misc", "truncated state dict", ["audit", str(trunc), "--arch", ARCH], 2, {}),
        ("misc", "pickled module without --trust", ["audit", str(pickled)], 2, {}),
        ("misc", "missing MODEL", ["audit", str(base / "nope.pt"), "--arch", ARCH], 2, {}),
    ]
    rows = []
    for issue, name, args, want, kw in cases:
        out = base / f"out{len(rows)}"
        out.mkdir()
        before = _digest(inputs)
        if kw.get("journal"):  # a well-formed journal of a dead pid: move a planted file onto the input
            local = out / "m.pt"
            local.write_bytes(model.read_bytes())
            (out / ".m.normswap-999999-0123456789abcdef.tmp.pt").write_text("planted")
            (out / "victim.txt").write_text("keep me")
            (out / ".normswap-commit-999999.json").write_text(json.dumps(
                {"normswap_journal": 1, "pid": 999999, "start": "1", "nonce": "0123456789abcdef", "force": True,
                 "moves": [[".m.normswap-999999-0123456789abcdef.tmp.pt", "m.pt"], ["victim.txt", str(model)]]}))
            args = ["convert", "m.pt", "--arch", ARCH, "--to", "gn", "--no-onnx", "--calib", str(calib), "-o", "ok.pt"]
            before += hashlib.sha256(local.read_bytes()).hexdigest()
        holder = first_run = None
        if kw.get("foreign"):  # another program holds the claim's lock
            holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out / ".a.json.normswap-claim")],
                                      stdout=subprocess.PIPE, text=True)
            holder.stdout.readline()
        if kw.get("concurrent"):  # a first run of the same command, already working
            first_run = subprocess.Popen(["normswap", *args], cwd=out, env=_env(), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            time.sleep(4)
        rc, first, secs, sout, serr = _run(args, out, timeout=kw.get("timeout", 300), kill_after=kw.get("kill_after"),
                                           sig=kw.get("sig", signal.SIGTERM),
                                           env={"NORMSWAP_CLAIM_WAIT": "3"} if holder else None)
        extra_ok = True
        if holder:
            holder.kill()
            holder.wait()
        if first_run:
            extra_ok = first_run.wait() == 0  # the first run is not disturbed
        if kw.get("need"):
            extra_ok = extra_ok and kw["need"] in serr
        if kw.get("forbid"):
            extra_ok = extra_ok and kw["forbid"] not in (sout + serr).lower()
        if kw.get("maxcol"):
            widest = max((len(ln) for ln in (sout + serr).splitlines()), default=0)
            extra_ok = extra_ok and widest <= kw["maxcol"]
            first = f"widest line {widest} columns; " + first
        after = _digest(inputs)
        if kw.get("journal"):
            after += hashlib.sha256((out / "m.pt").read_bytes()).hexdigest()
            after += "" if (out / "victim.txt").read_text() == "keep me" else "victim moved"
        intact = after == before
        planted = {"victim.txt", "m.pt", ".normswap-commit-999999.json", ".m.normswap-999999-0123456789abcdef.tmp.pt",
                   ".a.json.normswap-claim" if holder else ""}  # the foreign program's own file
        left = sorted(p.name for p in out.iterdir() if p.name not in planted)
        if first_run:
            left = [n for n in left if n != "same.pt"]  # the first run's output
        ok = rc == want and intact and extra_ok and first != "TRACEBACK" and (rc == 0 or not left)
        rows.append((issue, name, want, rc, f"{secs:.1f}", "yes" if intact else "NO", ",".join(left) or "-",
                     "pass" if ok else "FAIL", first[:110]))
        print(rows[-1], flush=True)
    print()
    print("| issue | case | expected | exit | s | inputs intact | left in output dir | verdict | first line |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
    bad_rows = [r for r in rows if r[7] != "pass"]
    print(f"\n{'PASSED' if not bad_rows else 'FAILED'} | hostile table | {len(rows) - len(bad_rows)}/{len(rows)} cases")
    return 1 if bad_rows else 0


if __name__ == "__main__":
    sys.exit(main())
