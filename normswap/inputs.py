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

__all__ = ["ResolvedInputs", "resolve_inputs", "check_shape_size", "MAX_INPUT_BYTES"]

#: the largest example/random input normswap allocates (float32 bytes)
MAX_INPUT_BYTES = 2 * 1024 ** 3


def check_shape_size(shape: tuple[int, ...], what: str = "--input-shape", itemsize: int = 4) -> None:
    """Refuse a shape whose tensor would exceed :data:`MAX_INPUT_BYTES` (before allocating)."""
    n = 1
    for d in shape:
        n *= int(d)
    size = n * itemsize
    if size > MAX_INPUT_BYTES:
        text = ",".join(str(d) for d in shape)
        raise NormswapError(f"{what} {text}: a float32 tensor of this shape needs {size / 1024 ** 3:.3g} GiB "
                            f"(limit {MAX_INPUT_BYTES / 1024 ** 3:.3g} GiB); use a smaller batch or size")


@dataclass
class ResolvedInputs:
    """What the options resolved to: ``example`` inputs (a tuple of tensors, or None when the
    options asked for none), the loaded ``data`` set (or None), the parsed ``shape`` and notes."""

    example: tuple | None
    data: Any = None
    shape: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)


def resolve_inputs(model=None, *, input_shape=None, data=None, limit: int | None = 8, batch: int = 2,
                   required: bool = False, seed: int = 0, data_option: str = "--data") -> ResolvedInputs:
    """Resolve ``--input-shape`` / ``--data`` (``--calib``) into inputs.

    * ``input_shape``: ``"N,C,H,W"`` text (or a tuple); random data of that shape (seeded), or,
      with ``data``, the size to read an image folder at.  An empty string is an error, not
      "no shape".
    * ``data``: a path / array / tensor / 'random' (see :func:`normswap.data.load_data`); at most
      ``limit`` samples are loaded ('random' makes ``N`` of ``input_shape`` samples).
    * ``example``: the first ``batch`` samples of ``data``, else random data of ``input_shape``,
      else (``required=True``) a shape guessed from the model, else None.
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
            ds = load_data(data, limit=limit, input_shape=shape, seed=seed)
    if ds is None and shape is None and not required:
        return ResolvedInputs(None, None, None)
    example = example_inputs(model, input_shape=shape, data=ds, batch=batch, seed=seed)
    return ResolvedInputs(tuple(example), ds, shape)
