"""What a model's forward needs and what to say when it raises on the user's data (shared by
calibration, fidelity and repair)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

__all__ = ["expected_input_text", "forward_error"]


def _first_layer(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding,
                          nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            return m
    return None


def expected_input_text(model: nn.Module) -> str:
    m = _first_layer(model)
    if m is None:
        return "unknown (no Conv/Linear/Embedding layer found)"
    if isinstance(m, nn.Embedding):
        return f"integer token ids (N, L) < {m.num_embeddings} (first layer {m})"
    if isinstance(m, nn.Linear):
        return f"(N, ..., {m.in_features}) (first layer {m})"
    nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2,
          nn.ConvTranspose3d: 3}[type(m)]
    spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[nd]
    return f"(N, {m.in_channels}, {spatial}) (first layer {type(m).__name__}({m.in_channels}, {m.out_channels}, ...))"


def forward_error(e: Exception, x, module: nn.Module, what: str = "a calibration batch") -> str:
    """One line for a model forward that raised on user data: what raised and where (``what``:
    the batch it ran on), and the input shape the model expects when it looks like a shape
    problem."""
    import traceback

    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename.replace("\\", "/")]
    where = f" in {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    shape = tuple(x.shape) if hasattr(x, "shape") else "?"
    text = f"the model's forward raised {type(e).__name__}{where} on {what} of shape {shape}: {first}"
    if isinstance(e, (RuntimeError, ValueError)) and any(w in first.lower() for w in ("shape", "size", "channels",
                                                                                       "dimension", "expected")):
        text += f" (the model expects inputs of shape {expected_input_text(module)})"
    return text
