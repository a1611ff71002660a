"""The one verification of a fold (eager model or exported program): the folded model's outputs
against the original's on the example inputs."""

from __future__ import annotations

import torch

__all__ = ["compare_outputs", "flat"]


def flat(out) -> list[torch.Tensor]:
    from normswap.onnx_utils import flatten_outputs  # the tensors of a (nested) output, one definition

    return flatten_outputs(out)


def compare_outputs(ref: list[torch.Tensor], out: list[torch.Tensor]) -> dict:
    """The verification of a fold: ``{"max_abs_error", "max_abs_output", "ok"}`` (+ ``"reason"``).
    Floating outputs agree within ``1e-4 * (1 + max|y|)`` (``2e-2`` below float32), with NaN/Inf in
    the same places; other outputs exactly.  Nothing finite to compare is a failure, never 0."""
    err, scale = 0.0, 0.0
    compared, floating = 0, 0
    ok = len(out) == len(ref)
    for a, b in zip(ref, out):
        if a.shape != b.shape:
            ok = False
            continue
        if a.is_floating_point():
            low_precision = a.dtype not in (torch.float32, torch.float64)
            a, b = a.double(), b.double()
            fin = torch.isfinite(a)
            if not torch.equal(fin, torch.isfinite(b)) or not torch.equal(a[~fin].nan_to_num(), b[~fin].nan_to_num()):
                ok = False  # NaN / Inf in different places
            a, b = a[fin], b[fin]
            floating += 1
            compared += a.numel()
            err = max(err, float((a - b).abs().max()) if a.numel() else 0.0)
            scale = max(scale, float(a.abs().max()) if a.numel() else 0.0)
            ok = ok and err <= (2e-2 if low_precision else 1e-4) * (1 + scale)
        else:
            ok = ok and bool((a == b).all())
    if floating and not compared:  # all NaN/Inf: nothing was proven
        return {"max_abs_error": float("nan"), "max_abs_output": float("nan"), "ok": False,
                "reason": "no finite values to compare"}
    return {"max_abs_error": err, "max_abs_output": scale, "ok": ok}
