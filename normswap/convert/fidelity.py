"""How faithful the converted model is: its outputs against the original's on the calibration
inputs (top-1 agreement / KL for classifiers, relative output error otherwise; accuracy with
labels).  Under ``torch.distributed`` the sums are all-reduced."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Dataset
from ..errors import NormswapError
from .fit import rel as _rel
from .report import Fidelity

__all__ = ["OutputCache", "fidelity", "first_tensor", "is_classifier", "dist_info", "allreduce_floats",
           "eval_mode"]

#: the original outputs are cached (for fidelity and distillation) up to this size
CACHE_LIMIT_BYTES = 512 * 2**20


class OutputCache:
    """The original model's outputs on the calibration batches, recorded during the first
    calibration pass; ``tensors`` is None once they exceed :data:`CACHE_LIMIT_BYTES` (then the
    original is run again where they are needed)."""

    def __init__(self, limit: int = CACHE_LIMIT_BYTES) -> None:
        self.tensors: list[Tensor] | None = []
        self.bytes = 0
        self.limit = limit

    def add(self, out) -> None:
        if self.tensors is None:
            return
        t = first_tensor(out).detach().to("cpu")
        self.bytes += t.numel() * t.element_size()
        if self.bytes > self.limit:
            self.tensors = None
        else:
            self.tensors.append(t)


def first_tensor(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        for k in ("logits", "out", "output"):
            if isinstance(out.get(k), Tensor):
                return out[k]
        for v in out.values():
            if isinstance(v, Tensor):
                return v
    if hasattr(out, "logits") and isinstance(out.logits, Tensor):
        return out.logits
    if isinstance(out, (tuple, list)):
        for v in out:
            try:
                return first_tensor(v)
            except NormswapError:
                pass
    raise NormswapError(f"cannot find a tensor in the model output of type {type(out).__name__}")


def is_classifier(out: Tensor) -> bool:
    return out.dim() == 2 and out.shape[1] > 1 and out.is_floating_point()


def dist_info() -> tuple[bool, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1, dist.get_world_size()
    return False, 1


def allreduce_floats(values: list[float]) -> list[float]:
    on, _ = dist_info()
    if not on:
        return values
    import torch.distributed as dist
    dev = torch.device("cuda", torch.cuda.current_device()) if str(dist.get_backend()) == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


@contextmanager
def eval_mode(m: nn.Module):
    flags = [(mod, mod.training) for mod in m.modules()]
    m.eval()
    try:
        yield m
    finally:
        for mod, flag in flags:
            mod.training = flag


@torch.no_grad()
def fidelity(work: nn.Module, original: nn.Module, data: Dataset, batch_size: int, to_dev, cache):
    n = agree = kl = sse = ssy = 0.0
    correct_o = correct_c = 0.0
    bad = 0.0  # samples whose original output is not finite: no meaningful comparison
    oob = 0.0  # labels outside the model's classes
    classifier = None
    fwd = 0.0
    for i, (x, y) in enumerate(data.batches(batch_size)):
        xb = to_dev(x)
        t0 = time.perf_counter()
        out = first_tensor(work(xb)).float()
        fwd += time.perf_counter() - t0
        ref = cache[i].to(out.device).float() if cache is not None else first_tensor(original(xb)).float()
        if classifier is None:
            classifier = is_classifier(ref)
        fin = torch.isfinite(ref.reshape(ref.shape[0], -1)).all(1) if ref.dim() else torch.isfinite(ref).reshape(1)
        if not bool(fin.all()):
            bad += float((~fin).sum())
            out, ref = out[fin], ref[fin]
            y = y[fin.to(y.device)] if y is not None else None
        n += out.shape[0]
        sse += float(((out - ref) ** 2).sum())
        ssy += float((ref ** 2).sum())
        if classifier:
            agree += float((out.argmax(1) == ref.argmax(1)).sum())
            lp, lq = F.log_softmax(ref, 1), F.log_softmax(out, 1)
            kl += float((lp.exp() * (lp - lq)).sum())
            if y is not None:
                yb = y.to(out.device).reshape(-1)
                oob += float(((yb < 0) | (yb >= ref.shape[1])).sum())
                correct_o += float((ref.argmax(1) == yb).sum())
                correct_c += float((out.argmax(1) == yb).sum())
    n, agree, kl, sse, ssy, correct_o, correct_c, bad, oob = allreduce_floats(
        [n, agree, kl, sse, ssy, correct_o, correct_c, bad, oob])
    fid = Fidelity(samples=int(n), classifier=bool(classifier), rel_output_error=_rel(sse, ssy) if n else None)
    fid._nonfinite = int(bad)  # not a field: the caller turns it into a warning
    if classifier and n:
        fid.top1_agreement = agree / max(n, 1)
        fid.kl = kl / max(n, 1)
        fid._labels_out_of_range = int(oob)
        if data.labels is not None and not oob:
            fid.accuracy_original = correct_o / max(n, 1)
            fid.accuracy_converted = correct_c / max(n, 1)
    return fid, fwd


