"""One input-resolution function for every job: ``--input-shape``, ``--calib``/``--data`` and
sample limits become example inputs (or a data set) the same way in audit, fold, convert,
export and check.

Sizes are checked before anything is allocated: a shape whose tensor would not fit in memory
is a one-line :class:`NormswapError` naming the size, never an allocation failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from normswap.errors import NormswapError

__all__ = ["ResolvedInputs", "resolve_inputs", "normalize_inputs", "check_shape_size", "check_input_path",
           "MAX_INPUT_BYTES"]

from normswap.shapes import MAX_INPUT_BYTES, check_shape_size  # noqa: E402,F401  (one definition)


def check_input_path(path, what: str = "input", *, folder_ok: bool = True) -> None:
    """Refuse, before anything opens it, an input path that is not a regular file (or, with
    ``folder_ok``, a folder): a FIFO, a socket or a device would block or never end.  A path
    that does not exist is left to the loader (which says so); a path too long for the system
    is a one-line error.  Symbolic links are followed."""
    import errno
    import os
    import stat

    from normswap.outputs import check_path_length, show_path

    if path is None or not isinstance(path, (str, os.PathLike)) or str(path) in ("", "random", "-"):
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            check_path_length(path, what)
            raise NormswapError(f"{show_path(path)}: {what}: the path is too long for this system") from None
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise NormswapError(f"{show_path(path)}: {what}: {e.strerror}") from None
        raise NormswapError(f"{show_path(path)}: cannot read {what} ({e.strerror or e})") from None
    if stat.S_ISREG(st.st_mode) or (folder_ok and stat.S_ISDIR(st.st_mode)):
        return
    if stat.S_ISDIR(st.st_mode):
        raise NormswapError(f"{show_path(path)}: is a directory, expected a file ({what})")
    from normswap.outputs import _kind_of

    expected = "a regular file or a folder" if folder_ok else "a regular file"
    raise NormswapError(f"{show_path(path)}: {what} is a {_kind_of(st)}, not {expected}; normswap does not "
                        f"read from pipes or devices (it would wait forever); save it to a file first")


@dataclass
class ResolvedInputs:
    """What the options resolved to: ``example`` inputs (a tuple of tensors, or None when the
    options asked for none), the loaded ``data`` set (or None), the parsed ``shape`` and notes."""

    example: tuple | None
    data: Any = None
    shape: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)


def resolve_inputs(model=None, *, input_shape=None, data=None, limit: int | None = 8, batch: int = 2,
                   required: bool = False, seed: int = 0, data_option: str = "--data",
                   example: bool = True, preprocess=None) -> ResolvedInputs:
    """Resolve ``--input-shape`` / ``--data`` (``--calib``) into inputs.

    * ``input_shape``: ``"N,C,H,W"`` text (or a tuple); random data of that shape (seeded), or,
      with ``data``, the size to read an image folder at.  An empty string is an error, not
      "no shape".
    * ``data``: a path / array / tensor / 'random' (see :func:`normswap.data.load_data`); at most
      ``limit`` samples are loaded ('random' makes ``N`` of ``input_shape`` samples).
    * ``example``: the first ``batch`` samples of ``data``, else random data of ``input_shape``,
      else (``required=True``) a shape guessed from the model, else None.  With
      ``example=False`` none is built (a job that makes its own inputs from ``data`` /
      ``shape``, like ``check``, which shapes random inputs after the ONNX file).
    * ``preprocess``: how an image folder is read (a preset name or a
      :class:`normswap.preprocess.Preprocess`; None: the model's ``pretrained_cfg``, else 'none'
      with a warning).  An image folder stays a streaming data set: ``data`` then has
      ``batches``/``subset``/``head`` but no ``inputs``.
    """
    from normswap.data import example_inputs, load_data, parse_shape

    if input_shape is not None and not isinstance(input_shape, (tuple, list)) and str(input_shape).strip() == "":
        raise NormswapError("--input-shape '': expected comma-separated integers like 1,3,32,32")
    shape = parse_shape(input_shape) if input_shape is not None else None
    if shape is not None:
        check_shape_size(shape)
    ds = None
    if data is not None:
        if isinstance(data, str) and data == "random":
            if shape is None:
                raise NormswapError(f"{data_option} random needs --input-shape N,C,H,W to know what to generate")
            ds = load_data("random", limit=shape[0], input_shape=shape, seed=seed)
        else:
            ds = load_data(data, limit=limit, input_shape=shape, seed=seed, preprocess=preprocess, model=model)
    if not example or (ds is None and shape is None and not required):
        return ResolvedInputs(None, ds, shape)
    example = example_inputs(model, input_shape=shape, data=ds, batch=batch, seed=seed)
    return ResolvedInputs(tuple(example), ds, shape)


def normalize_inputs(example_inputs: Any, model=None) -> tuple:
    """Turn a tensor / tuple / list / Dataset / ndarray into a tuple of tensors (None: inputs
    guessed from ``model``, see :func:`normswap.data.example_inputs`)."""
    import numpy as np
    import torch

    if example_inputs is None:
        from normswap.data import example_inputs as guessed_inputs

        example_inputs = guessed_inputs(model)
    from normswap.data import is_dataset, materialize

    if is_dataset(example_inputs):  # normswap.data.Dataset, or a streaming one (decoded whole)
        example_inputs = (materialize(example_inputs).inputs,)
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise NormswapError(
            f"example inputs must be a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}"
        )
    out = []
    for i, t in enumerate(example_inputs):
        if isinstance(t, np.ndarray):
            t = torch.from_numpy(t)
        elif isinstance(t, (int, float, bool)) and not isinstance(t, torch.Tensor):
            t = torch.tensor(t)
        if not isinstance(t, torch.Tensor):
            raise NormswapError(f"example input {i} is a {type(t).__name__}, expected a tensor")
        out.append(t.detach())
    return tuple(out)
