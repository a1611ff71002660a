"""Find the first layer where onnxruntime and PyTorch diverge.

``locate(model, onnx_path, inputs)`` returns a :class:`LocateResult`: one
:class:`LayerParity` per mapped leaf module, in execution order, with

* the **accumulated** error: the layer's output in a full onnxruntime run (the
  intermediate exposed as an extra graph output) vs the same module's output in
  PyTorch (forward hook), on the same inputs;
* the layer's **own** error: the ONNX nodes of that layer alone, run in
  onnxruntime on PyTorch's input activation to the layer, vs PyTorch's output of
  the layer.  Errors inherited from earlier layers do not enter it.

The first layer whose own error exceeds the tolerance is ``first_divergent``.

Mapping ONNX to modules (``normswap.locate_map``): the dynamo exporter (torch
>= 2.5) writes ``pkg.torch.onnx.name_scopes`` on every node (``['', 'b1',
'b1.conv', 'conv2d_1']``: the module path, then the FX node); the TorchScript
exporter names nodes ``/b1/conv/Conv``, which is used when the metadata is
missing.  A leaf module's nodes are those whose scope contains its path; its
output is the value those nodes produce for the rest of the graph, checked
against the PyTorch output's shape.  Modules without nodes of their own (Conv
folded into the following BatchNormalization by the exporter's optimiser,
Identity, eval Dropout), modules called more than once, modules whose nodes
produce no single output of the PyTorch shape are listed in ``unmapped`` with
the reason.  A layer whose input comes from an absorbed module (Conv folded into
BN) is compared as the fused pair: ``fused`` names the absorbed modules.

Tolerance per layer: ``max|onnx - torch| <= atol + rtol * max|torch|`` (the
criterion of ``normswap check``; defaults atol 1e-4, rtol 1e-3).

Providers: ``"cpu"`` and ``"cuda"`` (CUDAExecutionProvider with ``use_tf32=0``,
PyTorch on the GPU with TF32 off).  The first requested provider that really
runs (``session.get_providers()[0]``) is used; the others are reported in
``unavailable`` with the reason.  If none runs, ``status`` is ``unavailable``
and the result is falsy (nothing was shown to agree).

Caveat: exposing intermediates as graph outputs can keep onnxruntime from
fusing across them (e.g. Conv+Relu), so the instrumented full run may differ
from the plain run in the last bits; the own-error runs are unaffected.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import tempfile
from typing import Any, Sequence

from normswap.errors import NormswapError
from normswap.locate_report import LayerParity, LocateResult, locate_text  # noqa: F401  (re-exported)
from normswap.onnx_utils import torch_module
from normswap.ort import ProviderSpec, no_tf32, probe, provider_spec, short_error
from normswap.ort import session as _session

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
CRITERION = "max|onnx - torch| <= atol + rtol * max|torch| per layer output"
_TWO_GB = 2_000_000_000

__all__ = ["locate", "locate_text", "LocateResult", "LayerParity", "DEFAULT_ATOL", "DEFAULT_RTOL", "CRITERION"]


# --------------------------------------------------------------------------- metrics


def _err(ref, got, atol: float, rtol: float) -> tuple[float, float, float, float, bool]:
    """(max_abs, rel, ref_max, tol, passed) of ``got`` vs the PyTorch ``ref``."""
    import numpy as np

    r = np.asarray(ref, dtype=np.float64)
    g = np.asarray(got, dtype=np.float64)
    if r.shape != g.shape:
        return float("inf"), float("inf"), float("nan"), float("nan"), False
    if r.size == 0:
        return 0.0, 0.0, 0.0, atol, True
    fin_r, fin_g = np.isfinite(r), np.isfinite(g)
    same_nonfinite = bool(np.array_equal(fin_r, fin_g))
    m = fin_r & fin_g
    ref_max = float(np.abs(r[m]).max()) if m.any() else 0.0
    max_abs = float(np.abs(r[m] - g[m]).max()) if m.any() else (0.0 if same_nonfinite else float("inf"))
    if not same_nonfinite:
        max_abs = float("inf")
    tol = atol + rtol * ref_max
    rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, rel, ref_max, tol, bool(max_abs <= tol)


# --------------------------------------------------------------------------- providers


def _provider(label) -> ProviderSpec:
    return provider_spec(label)


# --------------------------------------------------------------------------- main entry point


def locate(
    model,
    onnx_path,
    inputs: tuple,
    *,
    providers: str | Sequence[str] = ("cpu",),
    atol: float | None = None,
    rtol: float | None = None,
) -> LocateResult:
    """Compare ``model`` (in eval mode) with ``onnx_path`` layer by layer; see the module docstring.

    ``inputs``: a tensor or a tuple of tensors, one per model input, in order.
    """
    import torch

    from normswap.locate_map import map_layers

    atol = DEFAULT_ATOL if atol is None else float(atol)
    rtol = DEFAULT_RTOL if rtol is None else float(rtol)
    if not (0 <= atol < float("inf") and 0 <= rtol < float("inf")):
        raise NormswapError(f"atol and rtol must be finite numbers >= 0 (got atol {atol:g}, rtol {rtol:g})")
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    specs = [_provider(p) for p in providers]
    if not specs:
        raise NormswapError("no providers given; use e.g. providers=('cpu',)")
    model = torch_module(model)
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    path = str(onnx_path)
    proto, graph_inputs = _load(path, inputs)
    result = LocateResult(path, None, None, "unavailable", atol, rtol, CRITERION, None, [], [])
    spec = _runnable(specs, path, result)
    if spec is None:
        return result
    device, run_model, trace = _trace(model, inputs, spec, result)
    feeds = _feeds(graph_inputs, inputs)
    mapping = map_layers(proto, trace, [gi.name for gi in graph_inputs])
    result.mapping = mapping.method
    result.unmapped = list(mapping.unmapped)
    result.notes.extend(mapping.notes)
    # a full onnxruntime run with the intermediates exposed
    wanted = []
    for lm in mapping.layers:
        for v in [lm.output, *lm.external_inputs]:
            if v not in wanted and v not in feeds:
                wanted.append(v)
    values = _run_with_outputs(proto, wanted, feeds, spec)
    values.update({k: v for k, v in feeds.items() if k not in values})
    # PyTorch tensors for ONNX values (graph inputs and mapped layer outputs)
    torch_values: dict[str, Any] = {gi.name: t.detach().cpu() for gi, t in zip(graph_inputs, inputs)}
    for lm in mapping.layers:
        torch_values.setdefault(lm.output, lm.call.output)
    for i, lm in enumerate(mapping.layers):
        result.layers.append(_layer_parity(i, lm, proto, values, torch_values, trace, spec, atol, rtol))
    _finish(result, proto, trace, values, atol, rtol)
    del values
    if device.startswith("cuda"):
        del run_model
        torch.cuda.empty_cache()
    return result


def _load(path: str, inputs: tuple):
    """The ONNX model and its graph inputs (initializers left out), checked against ``inputs``."""
    import onnx

    if not os.path.isfile(path):
        raise NormswapError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(path)
    except Exception as e:  # noqa: BLE001
        raise NormswapError(f"{path} is not an ONNX model (cannot parse it: {type(e).__name__})") from e
    graph_inputs = [i for i in proto.graph.input if i.name not in {x.name for x in proto.graph.initializer}]
    if len(graph_inputs) != len(inputs):
        raise NormswapError(
            f"the ONNX file expects {len(graph_inputs)} input(s) ({', '.join(i.name for i in graph_inputs)}) "
            f"but {len(inputs)} were given"
        )
    return proto, graph_inputs


def _runnable(specs, path: str, result: LocateResult):
    """The first provider that really runs here (the others' reasons go to ``result``), or None."""
    for s in specs:
        why = probe(s, path)
        if why is None:
            result.provider, result.ran = s.label, s.provider
            return s
        result.unavailable[s.label] = why
    result.notes.append("no requested provider could run; nothing was compared")
    return None


def _trace(model, inputs: tuple, spec, result: LocateResult):
    """The PyTorch side: every leaf module's call on ``inputs`` (eval mode, TF32 off on CUDA; the
    modules' modes are restored after).  Returns (device, the model run, the trace)."""
    import torch

    from normswap.locate_map import torch_trace

    device = spec.torch_device
    if device == "cuda" and not torch.cuda.is_available():
        result.notes.append("torch has no CUDA device: the CUDA provider is compared against PyTorch on the CPU")
        device = "cpu"
    result.torch_device = device
    flags = {m: m.training for m in model.modules()}
    run_model = model if device == "cpu" else copy.deepcopy(model).to(device)
    try:
        run_model.eval()
        ctx = no_tf32() if device.startswith("cuda") else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            try:
                trace = torch_trace(run_model, tuple(t.to(device) for t in inputs))
            except Exception as e:  # noqa: BLE001
                raise NormswapError(f"the PyTorch model does not run on the inputs (shapes "
                                    f"{[tuple(t.shape) for t in inputs]}): {short_error(e)}") from e
    finally:
        for m, f in flags.items():
            m.training = f
    if any(flags.values()):
        result.notes.append("the model was in training mode; it is compared in eval mode (its modes are restored after)")
    return device, run_model, trace


def _feeds(graph_inputs, inputs: tuple) -> dict:
    import onnx

    feeds = {}
    for gi, t in zip(graph_inputs, inputs):
        arr = t.detach().cpu().numpy()
        et = gi.type.tensor_type.elem_type
        if et:
            arr = arr.astype(onnx.helper.tensor_dtype_to_np_dtype(et), copy=False)
        feeds[gi.name] = arr
    return feeds


def _layer_parity(i: int, lm, proto, values: dict, torch_values: dict, trace, spec, atol, rtol) -> LayerParity:
    """One layer: its accumulated error, and its own (its nodes fed with PyTorch's inputs)."""
    ref = lm.call.output.float().numpy() if lm.call.output.is_floating_point() else lm.call.output.numpy()
    acc_abs, acc_rel, ref_max, tol, acc_ok = _err(ref, values.get(lm.output), atol, rtol)
    lp = LayerParity(name=lm.name, type=lm.call.type, index=i, onnx_output=lm.output,
                     onnx_nodes=[n.op_type for n in lm.nodes if n.op_type != "Constant"], shape=list(ref.shape),
                     max_abs_torch=ref_max, tolerance=tol, acc_max_abs=acc_abs, acc_rel=acc_rel,
                     acc_passed=acc_ok, fused=list(lm.fused))
    own_feeds, why = _own_feeds(lm, values, torch_values, trace)
    if why is not None:
        lp.own_reason = why
        return lp
    try:
        own = _run_subgraph(proto, lm, own_feeds, spec)
        o_abs, o_rel, _, _, o_ok = _err(ref, own, atol, rtol)
        lp.own_max_abs, lp.own_rel, lp.own_passed = o_abs, o_rel, o_ok
    except Exception as e:  # noqa: BLE001
        lp.own_reason = f"the layer's nodes do not run alone: {short_error(e)}"
    return lp


def _finish(result: LocateResult, proto, trace, values: dict, atol, rtol) -> None:
    """The final outputs' errors, the layers whose own error was not measured, the status."""
    for go, t in zip(proto.graph.output, trace.outputs):
        ref = t.float().numpy() if t.is_floating_point() else t.numpy()
        a, r, _, tol, ok = _err(ref, values.get(go.name), atol, rtol)
        result.outputs.append({"name": go.name, "max_abs": a, "rel": r, "tolerance": tol, "passed": ok})
    bad_own = [lp for lp in result.layers if lp.own_passed is None]
    if bad_own:
        result.notes.append(
            f"own error not measured for {len(bad_own)} layer(s): "
            + "; ".join(f"{lp.name}: {lp.own_reason}" for lp in bad_own[:5])
            + (" ..." if len(bad_own) > 5 else "")
        )
    result.status = "ok" if bool(dataclasses.replace(result, status="ok")) else "diverged"


# --------------------------------------------------------------------------- onnxruntime runs


def _session_for(model_proto, spec: ProviderSpec):
    """An onnxruntime session for an in-memory model (a temp file, deleted after, above 2 GB)."""
    import onnx

    if model_proto.ByteSize() < _TWO_GB:
        return _session(model_proto.SerializeToString(), spec), None
    tmpdir = tempfile.mkdtemp(prefix="normswap-locate-")
    p = os.path.join(tmpdir, "model.onnx")
    onnx.save(model_proto, p, save_as_external_data=True, location="model.onnx.data")
    return _session(p, spec), tmpdir


def _cleanup(tmpdir):
    if tmpdir:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)


def _run_with_outputs(proto, names: list[str], feeds: dict, spec: ProviderSpec) -> dict:
    """Values of the graph outputs and of ``names`` in one run of ``proto`` with those names exposed."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    have = {o.name for o in m.graph.output}
    vi = {v.name: v for v in m.graph.value_info}
    for n in names:
        if n in have:
            continue
        if n in vi:
            m.graph.output.append(vi[n])
        else:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
        have.add(n)
    sess, tmp = _session_for(m, spec)
    try:
        outs = [o.name for o in sess.get_outputs()]
        vals = sess.run(outs, feeds)
    finally:
        del sess
        _cleanup(tmp)
    return dict(zip(outs, vals))


def _own_feeds(lm, values: dict, torch_values: dict, trace) -> tuple[dict | None, str | None]:
    """Feeds for the layer's nodes alone: PyTorch activations for its float inputs, and the
    full run's values for integer side inputs (shapes computed elsewhere in the graph)."""
    import numpy as np

    feeds = {}
    floats = [v for v in lm.external_inputs if v in values and np.issubdtype(np.asarray(values[v]).dtype, np.floating)]
    for v in lm.external_inputs:
        if v not in values:
            return None, f"input {v} of the layer's nodes is not available"
        if v not in floats:
            feeds[v] = values[v]
    for v in floats:
        t = lm.torch_inputs.get(v)
        if t is None:
            t = torch_values.get(v)
        if t is None:
            return None, f"no PyTorch activation corresponds to the ONNX input {v} of the layer"
        arr = t.detach().cpu()
        arr = arr.float().numpy() if arr.is_floating_point() else arr.numpy()
        want = np.asarray(values[v])
        if tuple(arr.shape) != tuple(want.shape):
            return None, f"PyTorch input {tuple(arr.shape)} does not match ONNX input {v} {tuple(want.shape)}"
        feeds[v] = arr.astype(want.dtype, copy=False)
    return feeds, None


def _run_subgraph(proto, lm, feeds: dict, spec: ProviderSpec):
    import numpy as np
    import onnx
    from onnx import helper

    init = {t.name: t for t in proto.graph.initializer}
    vi = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.output)}
    used_inits = []
    seen = set()
    for n in lm.nodes:
        for i in n.input:
            if i in init and i not in seen:
                used_inits.append(init[i])
                seen.add(i)
    ginputs = []
    for name, arr in feeds.items():
        arr = np.asarray(arr)
        ginputs.append(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
        )
    out = vi.get(lm.output) or onnx.ValueInfoProto(name=lm.output)
    graph = helper.make_graph(list(lm.nodes) + list(lm.constants), f"layer_{lm.name}", ginputs, [out], initializer=used_inits)
    # constants first: keep the topological order
    del graph.node[:]
    graph.node.extend(list(lm.constants) + list(lm.nodes))
    sub = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    sub.functions.extend(proto.functions)
    sess, tmp = _session_for(sub, spec)
    try:
        return sess.run([lm.output], feeds)[0]
    finally:
        del sess
        _cleanup(tmp)
