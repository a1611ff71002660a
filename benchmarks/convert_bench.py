"""Benchmark of `normswap.convert` on the trained digits ResNet (samples/digits).

    OMP_NUM_THREADS=1 python benchmarks/convert_bench.py [--dir samples/digits] [--budget 60]

Prints two markdown tables:

1. BN-trained model -> gn / in / ln / frn: test accuracy of the original, of the naive swap (a fresh
   replacement with gamma=1, beta=0, GroupNorm(gcd(32, C)) -- what Opacus' ModuleValidator.fix
   does), calibrated fast, calibrated sequential, sequential + repair (time budget); the share of
   the original accuracy kept; calibration time as a multiple of one forward pass over the
   calibration set (both timed inside the same `convert` call: calib_seconds / forward_seconds).
2. GN-trained model -> bn -> folded (normswap.fold): the same columns, then the accuracy of the
   folded model and its CPU latency against the GroupNorm original.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from normswap.convert import convert  # noqa: E402
from normswap.convert import kinds as K  # noqa: E402


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def forward_seconds(model: nn.Module, x: torch.Tensor, batch: int = 64, repeats: int = 3) -> float:
    """Median time of one plain forward pass over x in batches."""
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(0, len(x), batch):
                model(x[i:i + batch])
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 50) -> float:
    model.eval()
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts)


from normswap.norms import classify  # noqa: E402


def naive_swap(model: nn.Module, to: str, source_kinds=("bn",)) -> nn.Module:
    """Replace every source norm by a *fresh* target (gamma=1, beta=0, default statistics)."""
    m = copy.deepcopy(model)
    for parent in list(m.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and classify(child) in source_kinds:
                c = getattr(child, "num_features", None) or child.num_channels
                new = K.build_target(to, c, 4, groups=K.naive_groups(c), eps=1e-5)
                parent._modules[name] = new
    return m.eval()


def opacus_fix(model: nn.Module):
    try:
        from opacus.validators import ModuleValidator
    except Exception:
        return None
    return ModuleValidator.fix(copy.deepcopy(model)).eval()


def pct(a: float, base: float) -> str:
    return f"{100 * a:.2f}% ({100 * a / base:.1f}%)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="digits artefacts (default samples/digits)")
    ap.add_argument("--budget", type=float, default=60.0, help="repair's time budget (seconds)")
    ap.add_argument("--targets", default="gn,in,ln,frn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-bn", action="store_true", help="skip the GN -> BN -> fold table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from samples.digits import load_split, load_trained

    model = load_trained("bn", args.dir)
    xc, yc = load_split("calib", args.dir)
    xt, yt = load_split("test", args.dir)
    base = accuracy(model, xt, yt)
    fwd = forward_seconds(model, xc)
    print(f"digits ResNet (BN): test accuracy {100 * base:.2f}% on {len(xt)} test images; "
          f"{len(xc)} calibration images; one forward pass over them {fwd * 1000:.0f} ms "
          f"({torch.get_num_threads()} thread(s))\n", flush=True)

    rows = []
    for to in args.targets.split(","):
        naive = accuracy(naive_swap(model, to), xt, yt)
        fast, rf = convert(model, to, (xc, yc), mode="fast")
        seq, rs = convert(model, to, (xc, yc), mode="sequential")
        rep_m, rr = convert(model, to, (xc, yc), mode="sequential", repair=True, time_budget_s=args.budget)
        a_fast, a_seq, a_rep = (accuracy(m, xt, yt) for m in (fast, seq, rep_m))
        rows.append((to, naive, a_fast, a_seq, a_rep, rf.calib_ratio, rs.calib_ratio,
                     rr.repair.seconds, [layer.groups for layer in rs.layers]))
        print(f"  {to}: naive {naive:.4f} fast {a_fast:.4f} seq {a_seq:.4f} +repair {a_rep:.4f}",
              file=sys.stderr, flush=True)
    fix = opacus_fix(model)
    print("| target | original | naive swap (fresh affine) | calibrated fast | calibrated sequential | "
          f"sequential + repair ({args.budget:.0f} s budget) | calib time fast / seq (x one forward) "
          "| repair time |")
    print("|---|---|---|---|---|---|---|---|")
    for to, naive, a_fast, a_seq, a_dist, r_fast, r_seq, dsec, groups in rows:
        name = {"gn": "BN -> GN", "in": "BN -> IN", "ln": "BN -> LN (GN, 1 group)", "frn": "BN -> FRN+TLU"}.get(to, to)
        if to == "gn":
            name += f" (groups auto: {sorted(set(g for g in groups if g))})"
        print(f"| {name} | {100 * base:.2f}% | {pct(naive, base)} | {pct(a_fast, base)} | {pct(a_seq, base)} | "
              f"{pct(a_dist, base)} | {r_fast:.1f}x / {r_seq:.1f}x | {dsec:.0f} s |")
    if fix is not None:
        print(f"\nOpacus ModuleValidator.fix (GroupNorm(gcd(32, C)), fresh affine): {pct(accuracy(fix, xt, yt), base)}")
    print("\n(percent in parentheses: share of the original test accuracy kept)\n", flush=True)

    if args.no_bn:
        return 0
    try:
        gn_model = load_trained("gn", args.dir)
    except (FileNotFoundError, OSError) as e:
        print(f"GN -> BN skipped: {e}")
        return 0
    gbase = accuracy(gn_model, xt, yt)
    gfwd = forward_seconds(gn_model, xc)
    naive = accuracy(naive_swap(gn_model, "bn", ("gn",)), xt, yt)
    fast, rf = convert(gn_model, "bn", (xc, yc), mode="fast")
    seq, rs = convert(gn_model, "bn", (xc, yc), mode="sequential")
    dist, rd = convert(gn_model, "bn", (xc, yc), mode="sequential", repair=True, time_budget_s=args.budget)
    a_fast, a_seq, a_dist = (accuracy(m, xt, yt) for m in (fast, seq, dist))
    best = dist if a_dist >= a_seq else seq
    try:
        from normswap.fold import fold
        folded, _ = fold(best, (xc[:2],))
        how = "normswap.fold"
    except Exception as e:  # pragma: no cover - fold builder's module missing
        folded, how = None, f"fold unavailable ({type(e).__name__})"
    a_fold = accuracy(folded, xt, yt) if folded is not None else float("nan")
    lat = {}
    for bs in (1, 64):
        xb = xt[:bs]
        lat[bs] = (latency_ms(gn_model, xb), latency_ms(best, xb),
                   latency_ms(folded, xb) if folded is not None else float("nan"))
    print("| GN-trained -> bn | original (GN) | naive swap (fresh BN) | calibrated fast | calibrated sequential | "
          f"sequential + repair | folded ({how}) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| test accuracy | {100 * gbase:.2f}% | {pct(naive, gbase)} | {pct(a_fast, gbase)} | {pct(a_seq, gbase)} | "
          f"{pct(a_dist, gbase)} | {pct(a_fold, gbase)} |")
    print(f"| calib time (x one forward) | | | {rf.calib_ratio:.1f}x | {rs.calib_ratio:.1f}x | | |")
    print("\n| CPU latency (1 thread) | GN original | BN (unfolded) | BN folded | gain vs GN |")
    print("|---|---|---|---|---|")
    for bs, (g, b, f) in lat.items():
        print(f"| batch {bs} | {g:.2f} ms | {b:.2f} ms | {f:.2f} ms | {g / f:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
