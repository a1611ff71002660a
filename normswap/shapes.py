"""Input-shape limits (foundation): every shape is checked before a tensor of it is allocated."""

from __future__ import annotations

from normswap.errors import NormswapError

__all__ = ["MAX_INPUT_BYTES", "check_shape_size"]

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
