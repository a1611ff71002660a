"""The in-memory data set and the facts every data module shares (a module of its own so that
:mod:`normswap.images` and :mod:`normswap.preprocess` need not import :mod:`normswap.data`,
which opens image folders through them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

__all__ = ["Dataset", "is_dataset", "IMAGE_SUFFIXES", "guess_input_shape"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Dataset:
    """An in-memory data set.  ``details``: what :meth:`to_dict` adds (e.g. how an image folder
    it was read from was preprocessed)."""

    inputs: Any  # torch.Tensor (N, ...) float32
    labels: Any = None  # torch.Tensor (N,) int64 or None
    source: str = ""
    synthetic: bool = False
    details: dict | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def batches(self, batch_size: int = 64) -> Iterator[tuple[Any, Any]]:
        n = len(self)
        for i in range(0, n, batch_size):
            y = self.labels[i : i + batch_size] if self.labels is not None else None
            yield self.inputs[i : i + batch_size], y

    def subset(self, indices) -> "Dataset":
        """The samples at ``indices`` (ints, a range or an int tensor), in that order."""
        import torch

        idx = torch.as_tensor(list(indices) if isinstance(indices, range) else indices, dtype=torch.long).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.max()) >= n or int(idx.min()) < -n):
            raise IndexError(f"sample index out of range for {n} samples")
        labels = self.labels[idx] if self.labels is not None else None
        return Dataset(self.inputs[idx], labels, self.source, self.synthetic, self.details)

    def head(self, n: int) -> "Dataset":
        """The first ``n`` samples (all of them when there are fewer)."""
        n = max(0, int(n))
        labels = self.labels[:n] if self.labels is not None else None
        return Dataset(self.inputs[:n], labels, self.source, self.synthetic, self.details)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "samples": len(self),
            "sample_shape": list(self.sample_shape),
            "labelled": self.labels is not None,
            "synthetic": self.synthetic,
            **(self.details or {}),
        }


def is_dataset(obj) -> bool:
    """True for an in-memory :class:`Dataset` or a streaming one (the same protocol)."""
    return isinstance(obj, Dataset) or all(hasattr(type(obj), a) for a in ("batches", "subset", "head", "sample_shape"))


def guess_input_shape(model) -> tuple[int, ...] | None:
    """Guess an input shape from the first parameterised layer (conv → N,C,32,32 …; linear → N,F)."""
    import torch
    import torch.nn as nn

    if isinstance(model, torch.export.ExportedProgram):
        try:
            model = model.module()
        except Exception:
            return None
    if not hasattr(model, "modules"):
        return None
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
            return (2, m.in_channels, 32)
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            return (2, m.in_channels, 32, 32)
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            return (2, m.in_channels, 8, 16, 16)
        if isinstance(m, nn.Linear):
            return (2, m.in_features)
        if isinstance(m, nn.Embedding):
            return None
    return None
