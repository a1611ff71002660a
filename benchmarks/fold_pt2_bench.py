"""Fold a ``.pt2`` (torch.export program): time and silent-error table.

1. Fold time of a ResNet-50-shaped exported program (``samples.models.resnet50_like``, 53
   BatchNorms) with :func:`normswap.fold.program.fold_program`, vs the eager normswap fold of
   the same model, vs torch's pt2e fold helper (``_fuse_conv_bn_`` from
   ``torch.ao.quantization.pt2e.utils`` or torchao's ``torchao.quantization.pt2e.utils``)
   where importable, printed as ratios.  With and without the verification run.
2. The zero-silent-error table: the hidden-trap patterns (a conv whose output feeds two
   BatchNorms, a conv whose output also feeds a skip path, a conv module called twice into two
   BatchNorms, one weight tied into two convs) folded by normswap and by the pt2e helper: max
   abs error of each against the original model.

    PYTHONPATH=. .venv/bin/python benchmarks/fold_pt2_bench.py [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from normswap.fold import fold  # noqa: E402
from normswap.fold.program import fold_program  # noqa: E402
from samples.models import ALL_SAMPLES, randomize_norm_stats, resnet50_like  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(1)


def _pt2e_fuse():
    for mod in ("torch.ao.quantization.pt2e.utils", "torchao.quantization.pt2e.utils"):
        try:
            m = __import__(mod, fromlist=["_fuse_conv_bn_"])
            return getattr(m, "_fuse_conv_bn_"), mod
        except Exception:  # noqa: BLE001
            continue
    return None, None


def _time(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _export(m, ex):
    return torch.export.export(m, tuple(ex))


def bench_time(repeat: int) -> dict:
    m, ex = resnet50_like()
    ep = _export(m, ex)
    ep_noinputs = _export(m, ex)
    ep_noinputs.example_inputs = None
    fuse, where = _pt2e_fuse()
    out: dict = {"model": "resnet50_like (53 BatchNorm2d)", "repeat": repeat}
    out["normswap_pt2_verified_s"] = _time(lambda: fold_program(ep), repeat)
    out["normswap_pt2_s"] = _time(lambda: fold_program(ep_noinputs), repeat)
    out["normswap_eager_verified_s"] = _time(lambda: fold(m, ex), repeat)
    out["normswap_eager_s"] = _time(lambda: fold(m), repeat)
    if fuse is not None:
        def pt2e():
            gm = ep.module()  # the helper works on the unlifted GraphModule (as prepare_pt2e does)
            fuse(gm)
            return gm

        out["pt2e_helper"] = where
        out["pt2e_s"] = _time(pt2e, repeat)
        out["pt2e_module_only_s"] = _time(lambda: ep.module(), repeat)
    else:
        out["pt2e_helper"] = None
    _, rep = fold_program(ep)
    out["normswap_pt2_folded"] = len(rep.folded)
    out["normswap_pt2_max_abs_error"] = rep.verification["max_abs_error"]
    return out


# --------------------------------------------------------------------------- traps


class SkipPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((F.relu(self.bn(y)) + y).mean((2, 3)))


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.bn_b = nn.BatchNorm2d(6)

    def forward(self, x):
        return (self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))).mean((2, 3))


class TiedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv2.weight = self.conv1.weight
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return (self.bn1(self.conv1(x)) * self.bn2(self.conv2(x))).mean((2, 3))


def _traps():
    def mk(cls):
        m = randomize_norm_stats(cls(), seed=1).eval()
        return m, (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)

    return {
        "conv -> two BNs (shared_producer)": ALL_SAMPLES["shared_producer"](),
        "conv -> BN + skip path": mk(SkipPath),
        "conv module called twice -> two BNs": mk(CalledTwice),
        "one weight tied into two convs -> two BNs": mk(TiedConvs),
        "conv+BN pair called twice (foldable)": ALL_SAMPLES["shared_pair"](),
        "ResNet block (foldable)": ALL_SAMPLES["resnet_style"](),
    }


def bench_traps() -> list[dict]:
    fuse, _ = _pt2e_fuse()
    rows = []
    for name, (m, ex) in _traps().items():
        with torch.no_grad():
            ref = m(*ex)
        ep = _export(m, ex)
        folded, rep = fold_program(ep)
        with torch.no_grad():
            err = float((folded.module()(*ex) - ref).abs().max())
        row = {"pattern": name, "normswap_folded": len(rep.folded), "normswap_refused": len(rep.skipped),
               "normswap_max_abs_error": err,
               "normswap_reason": rep.skipped[0]["reason"] if rep.skipped else None}
        if fuse is not None:
            gm = _export(m, ex).module()
            fuse(gm)
            n_bn = sum(1 for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))
            with torch.no_grad():
                row["pt2e_max_abs_error"] = float((gm(*ex) - ref).abs().max())
            row["pt2e_bn_left"] = n_bn
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    t = bench_time(args.repeat)
    print(f"fold time, {t['model']}, median of {t['repeat']} (torch {torch.__version__}, 1 thread)")
    print(f"  normswap fold_program (.pt2), verified   {t['normswap_pt2_verified_s']:.3f} s")
    print(f"  normswap fold_program (.pt2), no inputs  {t['normswap_pt2_s']:.3f} s")
    print(f"  normswap eager fold, verified            {t['normswap_eager_verified_s']:.3f} s")
    print(f"  normswap eager fold, no inputs           {t['normswap_eager_s']:.3f} s")
    print(f"  ratio pt2 / eager (verified)             {t['normswap_pt2_verified_s'] / t['normswap_eager_verified_s']:.2f}x")
    print(f"  ratio pt2 / eager (no inputs)            {t['normswap_pt2_s'] / t['normswap_eager_s']:.2f}x")
    if t["pt2e_helper"]:
        print(f"  pt2e _fuse_conv_bn_ ({t['pt2e_helper']}) incl. ep.module()  {t['pt2e_s']:.3f} s "
              f"(ep.module() alone {t['pt2e_module_only_s']:.3f} s)")
        print(f"  ratio normswap pt2 (no inputs) / pt2e     {t['normswap_pt2_s'] / t['pt2e_s']:.2f}x")
    else:
        print("  pt2e fold helper: not importable (torch.ao.quantization.pt2e / torchao)")
    print(f"  folded {t['normswap_pt2_folded']} sites, max |diff| {t['normswap_pt2_max_abs_error']:.2e}")
    rows = bench_traps()
    print("\nsilent-error table: max abs error vs the original model")
    print(f"  {'pattern':45s} {'normswap':>10s} {'(folded/refused)':>16s} {'pt2e':>10s}")
    for r in rows:
        pe = f"{r['pt2e_max_abs_error']:.2e}" if "pt2e_max_abs_error" in r else "n/a"
        print(f"  {r['pattern']:45s} {r['normswap_max_abs_error']:10.2e} "
              f"{r['normswap_folded']:>7d}/{r['normswap_refused']:<8d} {pe:>10s}")
    if args.json:
        args.json.write_text(json.dumps({"time": t, "traps": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
