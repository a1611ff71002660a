"""Repair variants from one calibrated model, measured on held-out ImageNet photographs.

The README's *Repair on top* table.  One EfficientNet-Lite network is converted BN -> GN with the
default calibration (as ``benchmarks/convert_imagenet.py`` does, same data and split), then each
variant runs :func:`normswap.convert.repair.repair` on a copy of that calibrated model, with the
calibration samples and the held-back 1/7 that ``convert(..., repair=True)`` would use, and the
repaired copy is measured on the held-out photos.  Each variant takes the time budget plus about
a minute (2 cores); the calibration about four minutes.

    pip install -e '.[bench]'
    python benchmarks/repair_variants.py --model 1 --split a --variants default,flip-only --json out.json
    python benchmarks/repair_variants.py --list

Printed per variant: accuracy, drop (points), top-1 agreement, KL on the held-out photos, repair
steps, whether repair kept its result, and, against calibration alone photo by photo, how many
held-out photos only the one or the other keeps the original's top-1 on / gets right (exact McNemar
p).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: the release before's repair (random resized crops, KL at temperature 1): the variants below that
#: the README measured against it change it in one way each
CROPS_T1 = {"temperature": 1.0, "crop_scale": (0.5, 1.0)}
#: name -> RepairOptions fields
VARIANTS = {
    "default": {},
    "crops-t1": dict(CROPS_T1),
    "norms-only": {**CROPS_T1, "params": "norms"},
    "flip-only": {**CROPS_T1, "crop_scale": None},
    "low-lr": {**CROPS_T1, "lr": 1e-5, "norm_lr": 3e-4},
    "logits-only": {**CROPS_T1, "feature_weight": 0.0},
    "temperature-0.5": {**CROPS_T1, "temperature": 0.5},
    # this release's defaults spelled out (the same run as "default" while they stay the defaults)
    "sharp-flips": {"temperature": 0.5, "crop_scale": None},
    "blend-0.5": {"blend": 0.5},
    "crops-t1-blend-0.5": {**CROPS_T1, "blend": 0.5},
}


def _run(conv, model, train, held, held_out, name: str, budget: float, batch: int) -> dict:
    import torch.nn as nn

    import convert_imagenet as ci
    from normswap.convert.repair import RepairOptions, repair

    replaced = [m for m in conv.modules() if isinstance(m, nn.GroupNorm)]
    t0 = time.perf_counter()
    r = repair(conv, model, train, held, replaced=replaced, to_dev=lambda x: x, time_budget_s=budget,
               opts=RepairOptions(**VARIANTS[name]), plain_batch=batch)
    seconds = time.perf_counter() - t0
    fid, photos = ci._held_out(conv, model, held_out, batch)
    return {"variant": name, "options": r.options, "seconds": seconds, "steps": r.steps, "kept": r.kept,
            "held_back_before": r.before, "held_back_after": r.after, "accuracy": fid.accuracy_converted,
            "drop": fid.accuracy_drop, "agreement": fid.top1_agreement, "kl": fid.kl, "photos": photos}


def paired_with_calibration(base: dict, row: dict, model: str, split: str) -> dict:
    """The benchmark's photo-by-photo comparison (:func:`convert_imagenet.paired`) of calibration
    alone (first) with a repair variant (second)."""
    import convert_imagenet as ci

    (pr,) = ci.paired([{"model": model, "method": "calibration", "split": split, "photos": base},
                       {"model": model, "method": row["variant"], "split": split, "photos": row["photos"]}])
    return pr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=int, default=1, choices=(0, 1, 2), help="EfficientNet-Lite variant")
    ap.add_argument("--split", default="a", choices=("a", "b"))
    ap.add_argument("--variants", default="default", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds of repair per variant")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--data", default=None, help="ImageNet-style folder (default ../shared/imagenet-sample)")
    ap.add_argument("--json", default=None, help="write the rows (with per-photo predictions) here")
    ap.add_argument("--list", action="store_true", help="list the variants and exit")
    a = ap.parse_args(argv)
    if a.list:
        for k, v in VARIANTS.items():
            print(f"{k:16} {v or '(RepairOptions defaults)'}")
        return 0
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")

    import torch

    import convert_imagenet as ci
    from normswap.convert import convert
    from normswap.convert.calibrate import held_parts, holdback_split

    torch.set_num_threads(2)
    model = ci._load(a.model).eval()
    calib, held_out = ci._split(a.data or str(ci.DEFAULT_DATA), model, a.calib, a.split)
    t0 = time.perf_counter()
    calibrated, _ = convert(model, "gn", calib, batch_size=a.batch)
    fid, photos = ci._held_out(calibrated, model, held_out, a.batch)
    base = {"variant": "calibration alone", "seconds": time.perf_counter() - t0, "accuracy": fid.accuracy_converted,
            "drop": fid.accuracy_drop, "agreement": fid.top1_agreement, "kl": fid.kl, "photos": photos}
    rows = [base]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    print(f"lite{a.model} split {a.split}: {len(held_out)} held-out photos, original accuracy "
          f"{pct(fid.accuracy_original)} %")
    print(f"{'variant':18} {'acc':>5} {'drop':>5} {'agree':>6} {'KL':>6} {'steps':>5}  keeps top-1 / right (p)")
    print(f"{base['variant']:18} {pct(base['accuracy']):>5} {pct(base['drop']):>5} {pct(base['agreement']):>6} "
          f"{base['kl']:6.3f}", flush=True)
    train, held = held_parts(*holdback_split(calib))  # what convert(..., repair=True) trains on and holds back
    for name in names:
        row = _run(copy.deepcopy(calibrated), model, train, held, held_out, name, a.budget, a.batch)
        row["paired"] = paired_with_calibration(photos, row, f"lite{a.model}", a.split)
        rows.append(row)
        k, r = row["paired"]["agree"], row["paired"]["correct"]
        print(f"{name:18} {pct(row['accuracy']):>5} {pct(row['drop']):>5} {pct(row['agreement']):>6} "
              f"{row['kl']:6.3f} {row['steps']:5d}  {k['only_first']}/{k['only_second']} ({k['p']:.2f}) / "
              f"{r['only_first']}/{r['only_second']} ({r['p']:.2f})", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "split": a.split, "budget": a.budget, "rows": rows},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
