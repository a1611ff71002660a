"""The inputs of ``normswap check``: the ONNX file's inputs (names, shapes, dtypes), the given
tensors or random ones shaped like them, validated, and the batch sizes checked (the given one
and a second one, unless the ONNX batch dimension is static)."""

from __future__ import annotations

from pathlib import Path

from normswap.errors import NormswapError
from normswap.inputs import normalize_inputs
from normswap.onnx_utils import onnx_io

#: at most this many samples of a dataset are used as the first batch
MAX_SAMPLES = 64

__all__ = ["onnx_meta", "given_or_random", "batches_of", "as_tensors", "program_batch_sizes"]


def onnx_meta(onnx_path) -> tuple[str, list[dict]]:
    import onnx

    from normswap.inputs import check_input_path

    path = Path(onnx_path)
    if not path.exists():
        raise NormswapError(f"ONNX file not found: {path}")
    if path.is_dir():
        raise NormswapError(f"{path} is a folder, not an ONNX file")
    check_input_path(path, "the ONNX file", folder_ok=False)  # a FIFO would block onnx.load forever
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise NormswapError(f"{path} is not an ONNX model (cannot parse it: {type(e).__name__})") from e
    if not proto.graph.node and not proto.graph.output:
        raise NormswapError(f"{path} is not an ONNX model (no graph found)")
    inputs, _ = onnx_io(proto)
    return str(path), inputs


_FLOAT = {"float32", "float16", "float64", "bfloat16"}


def torch_dtype(name: str):
    import torch

    return {
        "float32": torch.float32, "float16": torch.float16, "float64": torch.float64,
        "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
        "uint8": torch.uint8, "bool": torch.bool,
    }.get(name)


def resize_batch(t, n: int):
    import torch

    if t.shape[0] >= n:
        return t[:n]
    reps = -(-n // t.shape[0])
    return torch.cat([t] * reps, 0)[:n]


def synth_inputs(meta: list[dict], input_shape, batch: int):
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for i, m in enumerate(meta):
        if i == 0 and input_shape is not None:
            shape = tuple(input_shape)
        else:
            shape = []
            for j, d in enumerate(m["shape"]):
                if isinstance(d, int):
                    shape.append(d)
                elif j == 0:
                    shape.append(batch)
                else:
                    raise NormswapError(
                        f"ONNX input {m['name']} has a symbolic dimension {d!r} at axis {j}; "
                        "pass inputs (--data DATA) or --input-shape"
                    )
            shape = tuple(shape)
        from normswap.shapes import check_shape_size

        check_shape_size(shape, what=f"ONNX input {m['name']} shape" if not (i == 0 and input_shape is not None)
                         else "--input-shape")
        dt = m["dtype"]
        if dt in _FLOAT:
            out.append(torch.randn(shape, generator=g))
        elif torch_dtype(dt) is not None:
            out.append(torch.zeros(shape, dtype=torch_dtype(dt)))
        else:
            raise NormswapError(f"ONNX input {m['name']} has unsupported type {dt}; pass inputs explicitly")
    return tuple(out)


def validate_inputs(meta: list[dict], tensors: tuple) -> None:
    names = ", ".join(f"{m['name']} {m['shape']}" for m in meta)
    if len(tensors) != len(meta):
        raise NormswapError(
            f"the ONNX file expects {len(meta)} input(s) ({names}) but {len(tensors)} were given; "
            "pass one tensor per model input, in order"
        )
    for m, t in zip(meta, tensors):
        shape = m["shape"]
        if len(shape) != t.dim():
            raise NormswapError(
                f"ONNX input {m['name']} has rank {len(shape)} (shape {shape}) but the given tensor has shape "
                f"{tuple(t.shape)}; check --input-shape / the data, or that the file belongs to this model"
            )
        for j, d in enumerate(shape):
            if j == 0:
                continue
            if isinstance(d, int) and d != t.shape[j]:
                raise NormswapError(
                    f"ONNX input {m['name']} needs shape {shape} but the given tensor has shape {tuple(t.shape)} "
                    f"(axis {j}: {d} vs {t.shape[j]}); was the file exported from this model?"
                )
        if m["dtype"] not in _FLOAT and t.is_floating_point() and torch_dtype(m["dtype"]) is not None:
            raise NormswapError(
                f"ONNX input {m['name']} is {m['dtype']} but a floating-point tensor was given"
            )


def as_tensors(inputs) -> tuple:
    from normswap.data import is_dataset

    if is_dataset(inputs):  # normswap.data.Dataset or a streaming one: its first samples
        inputs = inputs.head(MAX_SAMPLES).inputs
    return normalize_inputs(inputs)


def feeds(meta: list[dict], tensors: tuple) -> dict:
    import numpy as np

    feeds = {}
    for m, t in zip(meta, tensors):
        arr = t.detach().cpu().numpy()
        target = np.dtype(m["dtype"]) if m["dtype"] not in ("unknown", "bfloat16") else arr.dtype
        feeds[m["name"]] = arr.astype(target, copy=False)
    return feeds


def second_batch(n: int) -> int:
    return 1 if n > 1 else 3


def program_batch_sizes(model) -> tuple[int, int | None] | None:
    """The batch sizes a ``torch.export`` program accepts, as ``(lo, hi)`` (``hi`` None: no upper
    bound; ``lo == hi``: a static batch), from its first input's dimension 0; None for an eager
    model or when the program does not say."""
    import torch

    if not isinstance(model, torch.export.ExportedProgram):
        return None
    try:
        user = set(model.graph_signature.user_inputs)
        for node in model.graph.nodes:
            if node.op != "placeholder" or node.name not in user:
                continue
            val = node.meta.get("val")
            shape = getattr(val, "shape", None)
            if shape is None or len(shape) == 0:
                return None
            d = shape[0]
            if isinstance(d, int):
                return int(d), int(d)
            vr = model.range_constraints.get(d.node.expr)
            if vr is None:
                return None
            lo = int(vr.lower) if vr.lower.is_finite else 0
            hi = int(vr.upper) if vr.upper.is_finite else None
            return lo, hi
    except Exception:  # noqa: BLE001 - a program we cannot read: the check says what fails
        return None
    return None


def _check_program_batches(accepted, sizes, static_onnx: bool) -> None:
    """A torch.export program runs only on the batch sizes it was captured for: refuse, in one
    line, a check whose batch sizes it does not accept (instead of its raw guard message)."""
    if accepted is None:
        return
    lo, hi = accepted
    bad = [s for s in sizes if s < lo or (hi is not None and s > hi)]
    if not bad:
        return
    takes = f"only batch size {lo}" if lo == hi else (f"batch sizes {lo} to {hi}" if hi is not None
                                                      else f"batch sizes {lo} and up")
    if static_onnx:
        why = f"the ONNX file's static batch is {sizes[0]}"
    else:
        why = ("the ONNX file has a dynamic batch, so the check compares batch sizes "
               + " and ".join(str(s) for s in sizes))
    fix = (f"pass inputs of batch {lo} (--input-shape {lo},... or --data with {lo} samples)" if lo == hi and
           static_onnx else "check the ONNX file against the eager model (a state dict with --arch, or a "
                            "pickled module with --trust), or capture the program with a dynamic batch "
                            "(torch.export.Dim)")
    raise NormswapError(f"the torch.export program accepts {takes} (it was captured that way), but {why}; {fix}")


# --------------------------------------------------------------------------- main entry point


def given_or_random(meta: list[dict], inputs, input_shape, notes: list[str]):
    """The inputs as tensors (random ones shaped like the ONNX inputs when none are given), and
    whether the ONNX batch dimension is static."""
    first_dim = meta[0]["shape"][0] if meta and meta[0]["shape"] else None
    static_batch = isinstance(first_dim, int)
    if inputs is None:
        batch = input_shape[0] if input_shape is not None else (first_dim if static_batch else 2)
        tensors = synth_inputs(meta, input_shape, batch)
        notes.append(f"random inputs (seed 0) of shape {tuple(input_shape)}" if input_shape is not None
                     else "random inputs (seed 0) shaped like the ONNX inputs")
    else:
        tensors = as_tensors(inputs)
    validate_inputs(meta, tensors)
    return tensors, static_batch


def batches_of(meta: list[dict], tensors: tuple, static_batch: bool, notes: list[str], warning_notes: list[str],
               accepted: tuple[int, int | None] | None = None):
    """The batch sizes checked (the given one and a second one, or the static one) and, per size,
    (onnxruntime feeds, torch inputs).  ``accepted``: the batch sizes a torch.export program
    accepts (:func:`program_batch_sizes`): the second size is one it accepts, and sizes it does
    not accept are one-line errors."""
    first_dim = meta[0]["shape"][0] if meta and meta[0]["shape"] else None
    n = int(tensors[0].shape[0]) if tensors[0].dim() else 1
    batched = [
        t.dim() >= 1 and t.shape[0] == n and m["shape"] and not (isinstance(m["shape"][0], int) and m["shape"][0] != n)
        for m, t in zip(meta, tensors)
    ]
    if static_batch:
        sizes = [first_dim]
        warning_notes.append(f"the ONNX batch dimension is static ({first_dim}); only that batch size is checked")
        notes.append(warning_notes[-1])
        batched = [t.dim() >= 1 and t.shape[0] == n for t in tensors]
    elif tensors[0].dim() == 0:
        sizes = [1]
        batched = [False] * len(tensors)
    else:
        sizes = [n, second_batch(n)]
    if accepted is not None and len(sizes) == 2:  # a second size the program accepts, if it has one
        lo, hi = accepted
        fits = [s for s in (sizes[1], sizes[0] + 1, sizes[0] - 1, lo)
                if s >= 1 and s != sizes[0] and s >= lo and (hi is None or s <= hi)]
        if fits:
            sizes[1] = fits[0]
    _check_program_batches(accepted, sizes, static_batch)
    batches = []
    for size in sizes:
        tin = tuple(resize_batch(t, size) if b else t for t, b in zip(tensors, batched))
        for m, t in zip(meta, tin):
            d0 = m["shape"][0] if m["shape"] else None
            if isinstance(d0, int) and t.dim() and t.shape[0] != d0:
                raise NormswapError(
                    f"ONNX input {m['name']} needs shape {m['shape']} but the given tensor has shape {tuple(t.shape)}"
                )
        batches.append((feeds(meta, tin), tin))
    return sizes, batches
