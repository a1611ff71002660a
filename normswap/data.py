"""Calibration / evaluation data and example inputs.

``load_data`` accepts

* a path: ``.npy`` (one array), ``.npz`` (arrays named ``x``/``inputs``/``X``/``data``
  and optionally ``y``/``labels``/``Y``/``targets``; otherwise the first array),
  ``.pt``/``.pth`` (a tensor, a ``(x, y)`` tuple or a dict with the names above,
  loaded with ``weights_only=True``) or a folder of images;
* a tensor or numpy array shaped ``(N, ...)``;
* an iterable of tensors or of ``(inputs, labels)`` batches (e.g. a DataLoader);
* the string ``"random"`` (standard-normal data; needs ``input_shape``).

Image folders (needs pillow): files ending in .png/.jpg/.jpeg/.bmp/.gif/.tif(f)/.webp,
found recursively in sorted order; if the folder has sub-folders, their sorted names
are the class labels (ImageFolder convention). Each image is converted to grayscale
when the model takes 1 channel, RGB otherwise, resized to the input's H×W (bilinear),
scaled to [0, 1] and laid out as C×H×W; no mean/std normalisation is applied, so
normalise in the model or pass arrays instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from normswap.errors import NormswapError

X_NAMES = ("x", "inputs", "X", "data", "images")
Y_NAMES = ("y", "labels", "Y", "targets", "target")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Dataset:
    inputs: Any  # torch.Tensor (N, ...) float32
    labels: Any = None  # torch.Tensor (N,) int64 or None
    source: str = ""
    synthetic: bool = False

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

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "samples": len(self),
            "sample_shape": list(self.sample_shape),
            "labelled": self.labels is not None,
            "synthetic": self.synthetic,
        }


def parse_shape(text: str | tuple | list) -> tuple[int, ...]:
    """Parse ``"1,3,32,32"`` (or ``1x3x32x32``) into a tuple of positive ints; a shape whose float32
    tensor would exceed :data:`normswap.inputs.MAX_INPUT_BYTES` is refused (NormswapError with
    the size)."""
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        parts = [p for p in str(text).replace("x", ",").replace(" ", "").split(",") if p != ""]
    try:
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise NormswapError(f"--input-shape {text!r}: expected comma-separated integers like 1,3,32,32") from None
    if not shape or any(d <= 0 for d in shape):
        raise NormswapError(f"--input-shape {text!r}: expected positive integers like 1,3,32,32")
    from normswap.shapes import check_shape_size

    check_shape_size(shape)  # every shape is checked before anything of that size is allocated
    return shape


def _as_tensor(a, what: str):
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    if isinstance(a, np.ndarray):
        if a.dtype == object:
            raise NormswapError(f"{what}: object arrays are not supported")
        return torch.from_numpy(np.ascontiguousarray(a))
    raise NormswapError(f"{what}: expected an array or tensor, got {type(a).__name__}")


def _finish(x, y, source: str, limit: int | None, input_shape=None) -> Dataset:
    import torch

    x = _as_tensor(x, source)
    if x.dim() == 0:
        raise NormswapError(f"{source}: expected data shaped (N, ...), got a scalar")
    if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise NormswapError(f"{source}: unsupported dtype {x.dtype}")
    x = x.float() if x.is_floating_point() or x.dtype == torch.uint8 else x
    if y is not None:
        y = _as_tensor(y, source).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise NormswapError(f"{source}: {x.shape[0]} inputs but {y.shape[0]} labels")
        y = y.long()
    if limit is not None:
        x = x[:limit]
        y = y[:limit] if y is not None else None
    if x.shape[0] == 0:
        raise NormswapError(f"{source}: holds no samples")
    if input_shape is not None:
        expected = tuple(input_shape[1:])
        if tuple(x.shape[1:]) != expected:
            raise NormswapError(
                f"{source}: samples are shaped {tuple(x.shape[1:])} but the model expects {expected} "
                f"(input shape (N, {', '.join(map(str, expected))}))"
            )
    return Dataset(x, y, source)


def _pick(named: dict, names) -> Any:
    for n in names:
        if n in named:
            return named[n]
    return None


def _load_images(folder: Path, input_shape) -> tuple[Any, Any]:
    import numpy as np

    try:
        from PIL import Image
    except ImportError:
        raise NormswapError("reading an image folder needs pillow: pip install pillow") from None
    if input_shape is None or len(input_shape) != 4:
        raise NormswapError(f"{folder}: an image folder needs --input-shape N,C,H,W to know the size and channels")
    _, c, h, w = input_shape
    if c not in (1, 3):
        raise NormswapError(f"{folder}: images can feed 1- or 3-channel inputs, the model takes {c}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise NormswapError(f"{folder}: no image files found")
    xs, ys = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / 255.0
        except Exception as e:
            raise NormswapError(f"{f}: cannot read image ({type(e).__name__}: {e})") from None
        xs.append(a[None] if c == 1 else a.transpose(2, 0, 1))
        if classes:
            ys.append(classes.index(f.relative_to(folder).parts[0]) if len(f.relative_to(folder).parts) > 1 else -1)
    y = np.asarray(ys, dtype=np.int64) if classes and all(v >= 0 for v in ys) else None
    return np.stack(xs), y


def load_data(spec, *, limit: int | None = None, input_shape=None, seed: int = 0, random_samples: int = 64) -> Dataset:
    """Load calibration/evaluation data from any supported source (see module docstring)."""
    import numpy as np
    import torch

    if isinstance(spec, Dataset):
        return _finish(spec.inputs, spec.labels, spec.source, limit, input_shape)
    if isinstance(spec, str) and spec == "random":
        if input_shape is None:
            raise NormswapError("--calib random needs --input-shape to know what to generate")
        g = torch.Generator().manual_seed(seed)
        n = limit or random_samples
        ds = Dataset(torch.randn((n, *input_shape[1:]), generator=g), None, "random", synthetic=True)
        return ds
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.exists():
            raise NormswapError(f"{path}: no such file or folder")
        if path.is_dir():
            x, y = _load_images(path, input_shape)
            return _finish(x, y, str(path), limit, input_shape)
        if path.stat().st_size == 0:
            raise NormswapError(f"{path}: file is empty")
        with open(path, "rb") as f:
            head = f.read(8)
        try:
            if head.startswith(b"\x93NUMPY"):
                return _finish(np.load(path, allow_pickle=False), None, str(path), limit, input_shape)
            if head.startswith(b"PK") and path.suffix == ".npz" or (head.startswith(b"PK") and _is_npz(path)):
                with np.load(path, allow_pickle=False) as z:
                    named = {k: z[k] for k in z.files}
                if not named:
                    raise NormswapError(f"{path}: the .npz archive holds no arrays")
                x = _pick(named, X_NAMES)
                x = x if x is not None else next(iter(named.values()))
                return _finish(x, _pick(named, Y_NAMES), str(path), limit, input_shape)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except NormswapError:
            raise
        except Exception as e:
            raise NormswapError(f"{path}: cannot read data ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if isinstance(obj, torch.Tensor):
            return _finish(obj, None, str(path), limit, input_shape)
        if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
            return _finish(obj[0], obj[1], str(path), limit, input_shape)
        if isinstance(obj, (tuple, list)) and len(obj) == 1 and isinstance(obj[0], torch.Tensor):
            return _finish(obj[0], None, str(path), limit, input_shape)  # (x,): saved example inputs
        if isinstance(obj, dict):
            x = _pick(obj, X_NAMES)
            if isinstance(x, torch.Tensor):
                return _finish(x, _pick(obj, Y_NAMES), str(path), limit, input_shape)
        raise NormswapError(f"{path}: expected a tensor, an (x, y) pair or a dict with 'x' (and 'y')")
    if isinstance(spec, (torch.Tensor, np.ndarray)):
        return _finish(spec, None, "tensor", limit, input_shape)
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in spec) and _as_tensor(spec[1], "labels").dim() == 1 and _as_tensor(spec[0], "inputs").dim() > 1:
        return _finish(spec[0], spec[1], "tensors", limit, input_shape)
    # an iterable of batches (DataLoader, list of tensors, generator)
    try:
        iterator = iter(spec)
    except TypeError:
        raise NormswapError(f"calibration data: unsupported type {type(spec).__name__}") from None
    xs, ys, count = [], [], 0
    for batch in iterator:
        if isinstance(batch, (tuple, list)):
            if not batch:
                continue
            x = _as_tensor(batch[0], "calibration batch")
            y = _as_tensor(batch[1], "calibration labels") if len(batch) > 1 else None
        elif isinstance(batch, dict):
            x = _as_tensor(_pick(batch, X_NAMES), "calibration batch")
            y = _pick(batch, Y_NAMES)
            y = _as_tensor(y, "calibration labels") if y is not None else None
        else:
            x, y = _as_tensor(batch, "calibration batch"), None
        xs.append(x)
        ys.append(y)
        count += x.shape[0]
        if limit is not None and count >= limit:
            break
    if not xs:
        raise NormswapError("calibration data: the iterable yielded no batches")
    x = torch.cat(xs)
    y = torch.cat(ys) if all(v is not None for v in ys) else None
    return _finish(x, y, type(spec).__name__, limit, input_shape)


def _is_npz(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except Exception:
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


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


def example_inputs(model=None, *, input_shape=None, data: Dataset | None = None, batch: int = 2, seed: int = 0):
    """A tuple of example inputs: the first ``batch`` samples of ``data``, else
    seeded random data of ``input_shape``, else a shape guessed from the model's
    first layer (raises NormswapError if none can be found)."""
    import torch

    if data is not None:
        return (data.inputs[:batch],)
    if input_shape is None and isinstance(model, torch.export.ExportedProgram):
        args, kwargs = getattr(model, "example_inputs", None) or ((), {})
        if args and not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            return tuple(args)  # the inputs the program was captured with
    if input_shape is None and model is not None:
        input_shape = guess_input_shape(model)
    if input_shape is None:
        raise NormswapError("cannot tell the model's input shape; pass --input-shape N,C,H,W (or --calib DATA)")
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(input_shape), generator=g),)
