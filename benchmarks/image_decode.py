"""Decode speed of a streaming image folder (normswap.images) with 1 vs N decode threads.

    OMP_NUM_THREADS=1 python benchmarks/image_decode.py [FOLDER] [--preprocess tf-lite]
        [--image-size 240] [--workers 1,2,4] [--repeats 5] [--batch-size 32]

FOLDER defaults to /work/shared/imagenet-sample (read only).  Each repeat times one full pass
(``batches``) per worker count, interleaved so that machine load hits every setting alike;
prints the median and best images/s and the process CPU time per image, and checks that every
setting produced the same tensors.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def main(argv=None) -> None:
    import torch

    from normswap.images import open_image_folder
    from normswap.preprocess import Preprocess

    ap = argparse.ArgumentParser()
    ap.add_argument("folder", nargs="?", default="/work/shared/imagenet-sample")
    ap.add_argument("--preprocess", default="tf-lite")
    ap.add_argument("--image-size", default="240")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args(argv)
    spec = Preprocess.from_options(a.preprocess, image_size=a.image_size)
    workers = [int(w) for w in a.workers.split(",")]
    wall = {w: [] for w in workers}
    cpu = {w: [] for w in workers}
    sums = {}
    n = 0
    for _ in range(a.repeats):
        for w in workers:
            ds = open_image_folder(a.folder, spec, workers=w)
            t, c = time.perf_counter(), time.process_time()
            total, n = 0.0, 0
            for x, _ in ds.batches(a.batch_size):
                total += float(x.double().sum())
                n += x.shape[0]
            wall[w].append(time.perf_counter() - t)
            cpu[w].append(time.process_time() - c)
            sums.setdefault(w, total)
    same = len({round(v, 6) for v in sums.values()}) == 1
    print(f"{n} images from {a.folder}, {spec.preset} {a.image_size}, batch {a.batch_size}, "
          f"{a.repeats} interleaved repeats, torch threads {torch.get_num_threads()}")
    print("| decode threads | median img/s | best img/s | CPU ms / image |")
    print("|---:|---:|---:|---:|")
    for w in workers:
        print(f"| {w} | {n / statistics.median(wall[w]):.0f} | {n / min(wall[w]):.0f} | "
              f"{1000 * statistics.median(cpu[w]) / n:.2f} |")
    print(f"identical tensors for every thread count: {same}")


if __name__ == "__main__":
    main()
