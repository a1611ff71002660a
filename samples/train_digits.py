"""Train the digits sample model (see samples/digits.py for architecture and preprocessing).

Usage (from the repo root; both forms give the importable class path ``samples.digits.DigitsResNet``
inside the pickled module)::

    OMP_NUM_THREADS=2 python samples/train_digits.py --arch bn      # -> digits_resnet.pt, _module.pt
    OMP_NUM_THREADS=2 python samples/train_digits.py --arch gn      # -> digits_resnet_gn.pt
    python -m samples.train_digits [--arch bn|gn] [--out samples/digits] [--epochs N] [--seed S]

Writes into --out: the state dict (``digits_resnet.pt`` / ``digits_resnet_gn.pt``), for arch bn the
pickled whole module ``digits_resnet_module.pt``, the splits ``calib.npz`` / ``test.npz`` (x float32
(N,1,32,32), y int64; compressed) and ``metrics.json`` (merged per arch: test accuracy, train time,
parameter count, seeds, hyper-parameters). Prints the test accuracy at the end.

Training: Adam (lr 3e-3, weight decay 5e-4) with a one-cycle schedule, batch 64, light augmentation
(random translation by up to 2 px of the 32x32 image, zero = background padding), fixed seeds and
``torch.use_deterministic_algorithms(True)``; 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from samples.digits import (  # noqa: E402
    DIGITS_MEAN, DIGITS_STD, GN_GROUPS, SPLIT_SEED, SPLIT_SIZES, digits_resnet, digits_resnet_gn,
    make_splits,
)

DEFAULT_OUT = _REPO / "samples" / "digits"
BACKGROUND = (0.0 - DIGITS_MEAN) / DIGITS_STD  # normalised value of a blank pixel


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2 (background padding)."""
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=BACKGROUND)
    offs = torch.randint(0, 2 * p + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy:dy + h, dx:dx + w]
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / len(x)


def train(arch: str = "bn", epochs: int = 12, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
          weight_decay: float = 5e-4, augment: bool = True, threads: int = 2, verbose: bool = True):
    """Train one variant; returns (model in eval mode, splits dict, metrics dict).

    The global torch settings it changes (threads, deterministic algorithms) are restored on return.
    """
    prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    try:
        return _train(arch, epochs, seed, batch_size, lr, weight_decay, augment, threads, verbose)
    finally:
        torch.set_num_threads(prev[0])
        torch.use_deterministic_algorithms(prev[1])


def _train(arch, epochs, seed, batch_size, lr, weight_decay, augment, threads, verbose):
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        torch.use_deterministic_algorithms(True)
        deterministic = True
    except Exception:  # pragma: no cover - depends on the build
        deterministic = False

    splits = make_splits()
    xtr, ytr = splits["train"]
    model = digits_resnet() if arch == "bn" else digits_resnet_gn()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(xtr) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.25)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(xtr), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = xtr[idx], ytr[idx]
            if augment:
                xb = _shift(xb, gen)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        if verbose:
            acc = evaluate(model, *splits["calib"])
            print(f"[{arch}] epoch {epoch + 1:2d}/{epochs}  loss {total / n:.4f}  calib acc {acc:.4f}  "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
    train_time = time.perf_counter() - t0
    model.eval()
    metrics = {
        "arch": arch,
        "test_accuracy": evaluate(model, *splits["test"]),
        "calib_accuracy": evaluate(model, *splits["calib"]),
        "train_accuracy": evaluate(model, xtr, ytr),
        "train_time_s": round(train_time, 2),
        "param_count": sum(p.numel() for p in model.parameters()),
        "seed": seed,
        "split_seed": SPLIT_SEED,
        "split_sizes": SPLIT_SIZES,
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": f"Adam(lr={lr}, weight_decay={weight_decay}) + OneCycleLR(pct_start=0.25)",
        "augmentation": "random translation +-2 px" if augment else "none",
        "norm": "BatchNorm2d" if arch == "bn" else f"GroupNorm({GN_GROUPS}, C)",
        "preprocess": {"scale": "x / 16", "upsample": "bilinear 8x8 -> 32x32, align_corners=False",
                       "mean": DIGITS_MEAN, "std": DIGITS_STD},
        "threads": threads,
        "deterministic_algorithms": deterministic,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return model, splits, metrics


def save(model, splits, metrics, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    arch = metrics["arch"]
    if arch == "bn":
        torch.save(model.state_dict(), out / "digits_resnet.pt")
        torch.save(model, out / "digits_resnet_module.pt")
    else:
        torch.save(model.state_dict(), out / "digits_resnet_gn.pt")
    for name in ("calib", "test"):
        x, y = splits[name]
        np.savez_compressed(out / f"{name}.npz", x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64))
    mpath = out / "metrics.json"
    allm = {}
    if mpath.exists():
        try:
            allm = json.loads(mpath.read_text())
        except ValueError:
            allm = {}
    allm[arch] = metrics
    mpath.write_text(json.dumps(allm, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("bn", "gn"), default="bn")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2") or 2))
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    model, splits, metrics = train(args.arch, epochs=args.epochs, seed=args.seed, threads=args.threads,
                                   augment=not args.no_augment, verbose=not args.quiet)
    save(model, splits, metrics, args.out)
    print(f"[{args.arch}] test accuracy {metrics['test_accuracy']:.4f} "
          f"({round(metrics['test_accuracy'] * SPLIT_SIZES['test'])}/{SPLIT_SIZES['test']}), "
          f"train time {metrics['train_time_s']:.1f}s, {metrics['param_count']} params -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
