"""Calibration / evaluation data and example inputs.

``load_data`` accepts

* a path: ``.npy`` (one array), ``.npz`` (arrays named ``x``/``inputs``/``X``/``data``
  and optionally ``y``/``labels``/``Y``/``targets``; otherwise the first array),
  ``.pt``/``.pth`` (a tensor, a ``(x, y)`` tuple or a dict with the names above,
  loaded with ``weights_only=True``) or a folder of images;
* a tensor or numpy array shaped ``(N, ...)``;
* an iterable of tensors or of ``(inputs, labels)`` batches (e.g. a DataLoader);
* the string ``"random"`` (standard-normal data; needs ``input_shape``).

Image folders (needs pillow) are read by :func:`normswap.images.open_image_folder` into a
*streaming* :class:`normswap.images.ImageFolder` (decoded one batch at a time), with the
preprocessing of :mod:`normswap.preprocess` (``preprocess=``: a preset name or a
:class:`~normswap.preprocess.Preprocess`; the model's ``pretrained_cfg`` when none is given).
Every data set has the same protocol: ``len``, ``sample_shape``, ``labels``, ``source``,
``synthetic``, ``batches(n)``, ``subset(indices)``, ``head(n)`` and ``to_dict()``; only the
in-memory :class:`Dataset` has ``inputs``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from normswap.errors import NormswapError

X_NAMES = ("x", "inputs", "X", "data", "images")
Y_NAMES = ("y", "labels", "Y", "targets", "target")
from normswap.dataset import IMAGE_SUFFIXES, Dataset, guess_input_shape, is_dataset  # noqa: F401 (re-exported)


def materialize(data):
    """An in-memory :class:`Dataset` of all of ``data`` (a streaming set is decoded whole; its
    size is checked first).  For code that still needs ``.inputs``."""
    if data is None or isinstance(data, Dataset):
        return data
    from normswap.shapes import check_shape_size

    try:
        check_shape_size((len(data), *data.sample_shape), what=f"{data.source}: all {len(data)} samples at once, shaped")
    except NormswapError as e:
        raise NormswapError(f"{e} (read fewer samples, e.g. --calib-samples N)") from None
    return data.head(len(data))


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
    notes = []
    if y is not None:
        y = label_vector(_as_tensor(y, source), source)
        if y.shape[0] != x.shape[0]:
            raise NormswapError(f"{source}: {x.shape[0]} inputs but {y.shape[0]} labels")
        y, note = integer_labels(y, source)
        notes += [note] if note else []
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
    return Dataset(x, y, source, details={"notes": notes} if notes else None)


def label_vector(y, source: str):
    """Labels as a vector of one class index per sample: (N,) or (N, 1); one-hot or score rows
    are refused (they are not class indices)."""
    if y.dim() > 1 and not (y.dim() == 2 and y.shape[1] == 1):
        raise NormswapError(f"{source}: labels shaped {tuple(y.shape)}; expected one class index per sample, "
                            f"shaped (N,) (one-hot or score rows: pass their argmax)")
    return y.reshape(-1)


def integer_labels(y, source: str):
    """Class labels as int64: float labels must hold whole numbers (refused otherwise, never
    truncated).  Returns ``(labels, note or None)``."""
    import torch

    if y.is_floating_point():
        whole = torch.isfinite(y) & (y == torch.round(y))
        if not bool(whole.all()):
            idx = int((~whole).nonzero()[0, 0])
            raise NormswapError(
                f"{source}: float labels that are not whole numbers (label {idx} is {float(y[idx])!r}): "
                "class labels must be integers (refused, not truncated)")
        return y.long(), f"{source}: float labels hold whole numbers; used as integer class labels"
    return y.long(), None


def _pick(named: dict, names) -> Any:
    for n in names:
        if n in named:
            return named[n]
    return None


def load_data(spec, *, limit: int | None = None, input_shape=None, seed: int = 0, random_samples: int = 64,
              preprocess=None, model=None):
    """Load calibration/evaluation data from any supported source (see module docstring).

    An image folder gives a streaming :class:`normswap.images.ImageFolder` read with
    ``preprocess`` (a preset name or a :class:`normswap.preprocess.Preprocess`; with neither,
    ``model``'s ``pretrained_cfg``, else 'none' with a warning), sized by the preset,
    ``--image-size`` or ``input_shape``; ``model`` also gives the channel count."""
    import numpy as np
    import torch

    if isinstance(spec, Dataset):
        return _finish(spec.inputs, spec.labels, spec.source, limit, input_shape)
    if is_dataset(spec):  # a streaming data set: kept streaming
        return spec.subset(range(min(limit, len(spec)))) if limit is not None else spec
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
            from normswap.images import open_image_folder

            if limit is not None and limit < 1:
                raise NormswapError(f"{path}: a sample limit must be positive, got {limit}")
            return open_image_folder(path, preprocess, model=model, input_shape=input_shape, limit=limit)
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
        except pickle.UnpicklingError as e:
            text = str(e)
            if "Unsupported global" not in text and "Unsupported class" not in text:
                why = " ".join(text[text.find("WeightsUnpickler"):].split()[:5]) if "WeightsUnpickler" in text else ""
                raise NormswapError(f"{path}: cannot read data (corrupt, or not a file torch.save wrote"
                                    + (f": {why}" if why else "") + ")") from None
            # torch's weights-only loader met an object it will not build
            raise NormswapError(f"{path}: holds pickled Python objects, not only tensors; data files are read "
                                "without running their code: save tensors (an (x, y) pair or a dict) "
                                "or an .npz") from None
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
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(t, (torch.Tensor, np.ndarray))
                                                                  for t in spec):
        a, b = _as_tensor(spec[0], "inputs"), _as_tensor(spec[1], "labels")
        # an (inputs, labels) pair, not two batches: labels as a vector, or as rows (one-hot: they get
        # their own error) beside image-like inputs or of another dtype; else two batches
        if a.dim() > 1 and (b.dim() == 1 or (b.dim() == 2 and b.shape[0] == a.shape[0] and (
                a.dim() > 2 or b.is_floating_point() != a.is_floating_point()))):
            return _finish(a, b, "tensors", limit, input_shape)
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
        if x.dim() == 0:
            raise NormswapError(f"calibration data: batch {len(xs)} is a scalar; expected batches shaped (N, ...)")
        xs.append(x)
        ys.append(y)
        count += x.shape[0]
        if limit is not None and count >= limit:
            break
    if not xs:
        raise NormswapError("calibration data: the iterable yielded no batches")
    for i, b in enumerate(xs):  # (float batches of different precisions are fine: they become float32)
        if tuple(b.shape[1:]) != tuple(xs[0].shape[1:]) or b.is_floating_point() != xs[0].is_floating_point():
            raise NormswapError(f"calibration data: batch {i} holds samples shaped {tuple(b.shape[1:])} ({b.dtype}) "
                                f"but batch 0 samples shaped {tuple(xs[0].shape[1:])} ({xs[0].dtype}); every batch "
                                "needs the same sample shape, and floats or integers throughout")
    x = torch.cat(xs)
    y = (torch.cat([label_vector(v, f"calibration labels of batch {i}") for i, v in enumerate(ys)])
         if all(v is not None for v in ys) else None)
    return _finish(x, y, type(spec).__name__, limit, input_shape)


def _is_npz(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except Exception:
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def example_inputs(model=None, *, input_shape=None, data: Dataset | None = None, batch: int = 2, seed: int = 0):
    """A tuple of example inputs: the first ``batch`` samples of ``data``, else
    seeded random data of ``input_shape``, else a shape guessed from the model's
    first layer (raises NormswapError if none can be found)."""
    import torch

    if data is not None:
        return (data.head(batch).inputs,)
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
