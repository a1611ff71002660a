"""Helpers shared by :mod:`normswap.export` and :mod:`normswap.check` (and the CLI's renderers).

Reading an ONNX file's inputs/outputs and op histogram, running a model in eval mode for a
while, flattening a model's outputs into tensors, turning an exporter / runtime exception into
one line, and silencing the exporters' chatter.  Nothing here knows about norm kinds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from typing import Any

from normswap.errors import NormswapError

__all__ = [
    "human_size",
    "torch_module",
    "eval_mode",
    "flatten_outputs",
    "exception_reason",
    "quiet_torch_onnx",
    "op_histogram",
    "value_info",
    "onnx_io",
]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def human_size(n: int) -> str:
    """``1536`` -> ``"1.5 KB"``."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def torch_module(model: Any, keep_program: bool = False):
    """The nn.Module behind ``model`` (nn.Module, LoadedModel or ExportedProgram).

    With ``keep_program`` a ``torch.export.ExportedProgram`` is returned as is.
    """
    import torch

    from normswap.io import as_module

    model = as_module(model)
    if isinstance(model, torch.export.ExportedProgram):
        return model if keep_program else model.module()
    if not isinstance(model, torch.nn.Module):
        raise NormswapError(f"expected a torch.nn.Module to export, got {type(model).__name__}")
    return model


@contextlib.contextmanager
def eval_mode(model, enable: bool = True):
    """Temporarily put ``model`` in eval mode; restore every module's flag after."""
    if not enable:
        yield
        return
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
    except NotImplementedError:  # modules of a torch.export program: mode fixed at capture
        pass
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def flatten_outputs(out) -> list:
    """The tensors of a model's (nested) output, in pytree order."""
    import torch
    from torch.utils._pytree import tree_flatten

    leaves, _ = tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def exception_reason(exc: BaseException, limit: int = 400) -> str:
    """One-line description of an exporter / runtime failure, including the root cause."""
    parts = []
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(parts) < 3:
        seen.add(id(e))
        msg = _ANSI.sub("", str(e)).strip()
        first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
        parts.append(f"{type(e).__name__}: {first}" if first else type(e).__name__)
        e = e.__cause__ or e.__context__
    # the outer exporter errors carry long "next steps" texts: keep the outer type and the root cause
    text = parts[0] if len(parts) == 1 else f"{parts[0].split(':')[0]} caused by {parts[-1]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def quiet_torch_onnx():
    """Silence the exporters' progress chatter and INFO/WARNING logging."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def op_histogram(proto) -> dict[str, int]:
    """``{op_type: count}`` over the graph, its subgraphs and local functions, most frequent first."""
    hist: dict[str, int] = {}

    def visit(graph):
        for node in graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            hist[key] = hist.get(key, 0) + 1
            for attr in node.attribute:
                if attr.g is not None and attr.HasField("g"):
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(proto.graph)
    for fn in proto.functions:  # local functions (if any) count as their nodes
        for node in fn.node:
            hist[node.op_type] = hist.get(node.op_type, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))


def value_info(vi) -> dict:
    """``{"name", "shape", "dtype"}`` of an ONNX ValueInfo (symbolic dims as their names)."""
    import onnx

    t = vi.type.tensor_type
    shape = []
    if t.HasField("shape"):
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                shape.append(d.dim_param)
            else:
                shape.append(None)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "unknown"
    return {"name": vi.name, "shape": shape, "dtype": dtype}


def onnx_io(proto) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of an ONNX model as dicts with name, shape, dtype (initializers excluded)."""
    inits = {i.name for i in proto.graph.initializer}
    inputs = [value_info(v) for v in proto.graph.input if v.name not in inits]
    outputs = [value_info(v) for v in proto.graph.output]
    return inputs, outputs


@contextlib.contextmanager
def no_cache(model, notes: list | None = None):
    """Hugging Face decoders return a ``DynamicCache`` (not a tensor) while ``config.use_cache``
    is true; exporters and parity checks need tensors.  Set ``use_cache=False`` for the duration
    (restored after) and say so in ``notes``."""
    cfg = getattr(model, "config", None)
    if cfg is None or not isinstance(getattr(cfg, "use_cache", None), bool) or not cfg.use_cache:
        yield
        return
    cfg.use_cache = False
    if notes is not None:
        notes.append("the model's config.use_cache was set to False while exporting/checking: a decoder "
                     "returns a key/value cache object otherwise, which is not a tensor output")
    try:
        yield
    finally:
        cfg.use_cache = True
