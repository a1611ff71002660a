"""Peak memory and time of `normswap convert` calibration (issue 10 item 9).

Each measurement runs in a fresh subprocess and reports its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus the resident memory just before
``convert`` (model + data), so the figure is what calibration itself adds.

    python benchmarks/convert_memory.py peak --width 16 --spatial 224 --samples 64 --batch 64 [--budget-mb 0]
    python benchmarks/convert_memory.py scale --width 8 --spatial 64 --samples 64,128,256

``--budget-mb 0`` disables the chunking (the behaviour before the cap: every site's activation
of the whole batch is recorded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(args) -> None:
    import resource
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(args.threads)
    from normswap.convert import bounded, convert
    from samples.models import resnet50_like

    if args.budget_mb is not None:
        bounded.RECORD_BUDGET_BYTES = (1 << 62) if args.budget_mb == 0 else int(args.budget_mb * 2**20)
    m, _ = resnet50_like(width=args.width, spatial=args.spatial)
    x = torch.randn(args.samples, 3, args.spatial, args.spatial, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m(x[:2])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    _, rep = convert(m, "gn", x, batch_size=args.batch, groups=args.groups, mode=args.mode)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"width": args.width, "spatial": args.spatial, "samples": args.samples, "batch": args.batch,
                      "budget_mb": args.budget_mb, "sites": rep.sites, "calib_seconds": rep.calib_seconds,
                      "convert_seconds": wall, "convert_cpu_seconds": cpu, "forward_seconds": rep.forward_seconds,
                      "peak_rss_mb": peak / 1024, "added_rss_mb": (peak - base) / 1024,
                      "agreement": rep.fidelity.top1_agreement}))


def _run(ns, **over) -> dict:
    argv = [sys.executable, __file__, "child"]
    d = {**vars(ns), **over}
    for k in ("width", "spatial", "samples", "batch", "groups", "threads", "mode"):
        argv += [f"--{k}", str(d[k])]
    if d.get("budget_mb") is not None:
        argv += ["--budget-mb", str(d["budget_mb"])]
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    out = res.stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("peak", "scale", "child"))
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--spatial", type=int, default=224)
    p.add_argument("--samples", default="64")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--groups", default="8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", default="sequential")
    p.add_argument("--budget-mb", type=float, default=None)
    ns = p.parse_args()
    if ns.what == "child":
        ns.samples = int(ns.samples)
        ns.groups = ns.groups if ns.groups == "auto" else int(ns.groups)
        _child(ns)
        return
    if ns.what == "peak":
        print(json.dumps(_run(ns, samples=int(ns.samples))))
        return
    rows = [_run(ns, samples=int(n)) for n in ns.samples.split(",")]
    for r in rows:
        print(json.dumps(r))
    base = rows[0]
    for r in rows[1:]:
        print(f"{r['samples']} samples: {r['calib_seconds'] / base['calib_seconds']:.2f}x the calibration wall time, "
              f"{r['convert_cpu_seconds'] / base['convert_cpu_seconds']:.2f}x the CPU time of {base['samples']} "
              f"({r['samples'] / base['samples']:.0f}x the samples)")


if __name__ == "__main__":
    main()
