"""Map ONNX nodes and values back to PyTorch leaf modules (helper of :mod:`normswap.locate`).

* :func:`torch_trace` runs the model once with hooks on every leaf module and
  records, per module, its first call's input and output (cloned at hook time, so
  in-place ops later cannot change them), the number of calls, and which module
  produced each input tensor (tensor identity), so that modules without ONNX
  nodes of their own can be walked through.
* :func:`map_layers` groups the ONNX nodes by module path (dynamo metadata
  ``pkg.torch.onnx.name_scopes``; else TorchScript-style node names
  ``/b1/conv/Conv``), picks each leaf's output value (the value its nodes produce
  for the rest of the graph, of the PyTorch output's shape), its external inputs,
  and the Constant nodes it needs from outside.

Size (issue 19): ``map_layers`` is about 150 lines: one pass over the ONNX graph (group by scope,
pick outputs, external inputs, constants) whose steps share its indexes; left in one piece.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

_CALL_SUFFIX = re.compile(r"@\d+$")


@dataclass
class Call:
    name: str
    type: str
    order: int  # position in execution order (post-hook order)
    inputs: list  # cloned tensor inputs (CPU)
    producers: list  # name of the leaf module that produced each input, None if not a leaf output
    output: Any = None  # cloned tensor output (CPU) or None
    output_kind: str = "tensor"  # "tensor" | "other"
    calls: int = 0


@dataclass
class Trace:
    calls: dict  # name -> Call (first call)
    order: list  # names in execution order
    outputs: list  # model outputs (flattened tensors, CPU)


def torch_trace(model, inputs: tuple) -> Trace:
    import torch
    from torch.utils._pytree import tree_flatten

    calls: dict[str, Call] = {}
    order: list[str] = []
    last_producer: dict[int, str] = {}
    keepalive: list = []
    handles = []

    def clone(t):
        return t.detach().clone().cpu()

    def pre(name, typ):
        def hook(mod, args):
            c = calls.get(name)
            if c is not None:
                c.calls += 1
                return
            flat, _ = tree_flatten(args)
            tens = [a for a in flat if isinstance(a, torch.Tensor)]
            calls[name] = Call(name, typ, -1, [clone(a) for a in tens], [last_producer.get(id(a)) for a in tens], calls=1)

        return hook

    def post(name):
        def hook(mod, args, out):
            c = calls[name]
            if c.order >= 0:
                return
            c.order = len(order)
            order.append(name)
            if isinstance(out, torch.Tensor):
                c.output = clone(out)
                last_producer[id(out)] = name
                keepalive.append(out)
            else:
                c.output_kind = "other"

        return hook

    for name, mod in model.named_modules():
        if name and not any(True for _ in mod.children()):
            handles.append(mod.register_forward_pre_hook(pre(name, type(mod).__name__)))
            handles.append(mod.register_forward_hook(post(name)))
    try:
        out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    flat, _ = tree_flatten(out)
    outs = [clone(t) for t in flat if isinstance(t, torch.Tensor)]
    keepalive.clear()
    return Trace(calls, order, outs)


# --------------------------------------------------------------------------- ONNX side


@dataclass
class LayerMap:
    name: str
    call: Call
    nodes: list  # NodeProto in graph order
    output: str
    external_inputs: list  # values consumed by the nodes, produced outside them (not initializers)
    constants: list = field(default_factory=list)  # outside Constant nodes the nodes need
    torch_inputs: dict = field(default_factory=dict)  # ONNX value -> PyTorch tensor to feed
    fused: list = field(default_factory=list)


@dataclass
class Mapping:
    method: str
    layers: list
    unmapped: list
    notes: list = field(default_factory=list)


def _scope_names_metadata(node) -> list[str] | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            if isinstance(scopes, (list, tuple)) and scopes:
                return [_CALL_SUFFIX.sub("", str(s)) for s in scopes[1:-1] if s]
    return None


def _scope_names_nodename(name: str) -> list[str] | None:
    if not name.startswith("/"):
        return None
    segs = [s for s in name.split("/")[1:-1] if s]
    out, cur = [], ""
    for s in segs:
        cur = s if (not cur or s.startswith(cur + ".")) else f"{cur}.{s}"
        out.append(cur)
    return out


def _deepest(scopes: list[str] | None) -> str:
    return scopes[-1] if scopes else ""


def _static_shape(vi) -> list | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _shape_ok(static, shape) -> bool:
    if static is None:
        return True
    return len(static) == len(shape) and all(s is None or s == d for s, d in zip(static, shape))


def map_layers(proto, trace: Trace, graph_inputs: list[str]) -> Mapping:
    import torch

    nodes = list(proto.graph.node)
    by_meta = [_scope_names_metadata(n) for n in nodes]
    if any(s is not None for s in by_meta):
        method = "name_scopes"
        scopes = by_meta
    else:
        by_name = [_scope_names_nodename(n.name) for n in nodes]
        method = "node_names" if any(s for s in by_name) else "none"
        scopes = by_name
    deepest = [_deepest(s) for s in scopes]

    inits = {t.name for t in proto.graph.initializer}
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            producer[o] = i
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for v in n.input:
            consumers.setdefault(v, []).append(i)
    graph_outputs = {o.name for o in proto.graph.output}
    vinfo = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input)}

    def is_float(v: str) -> bool | None:
        vi = vinfo.get(v)
        if vi is None or not vi.type.tensor_type.elem_type:
            return None
        return vi.type.tensor_type.elem_type in (1, 10, 11, 16)  # float, float16, double, bfloat16

    groups: dict[str, list[int]] = {}
    for i, d in enumerate(deepest):
        if d:
            groups.setdefault(d, []).append(i)

    unmapped: list[str] = []
    notes: list[str] = []
    if method == "none":
        notes.append("the ONNX nodes carry no module scopes (neither dynamo metadata nor scoped node names)")
    if method == "node_names":
        notes.append("mapped by node names (/module/path/Op): the file carries no dynamo scope metadata")

    nodeless: dict[str, str] = {}  # leaf -> "identity" | "absorbed"
    mapped: dict[str, LayerMap] = {}
    for name in trace.order:
        call = trace.calls[name]
        idx = sorted(set(groups.get(name, [])) | {i for k, v in groups.items() if k.startswith(name + ".") for i in v})
        if call.calls > 1:
            unmapped.append(f"{name} ({call.type}): called {call.calls} times; a shared module is not compared per call")
            continue
        if call.output_kind != "tensor" or call.output is None:
            unmapped.append(f"{name} ({call.type}): its output is not a single tensor")
            continue
        if not idx:
            same = (
                len(call.inputs) == 1
                and call.inputs[0].shape == call.output.shape
                and call.inputs[0].dtype == call.output.dtype
                and torch.equal(call.inputs[0], call.output)
            )
            if same:
                nodeless[name] = "identity"
                unmapped.append(f"{name} ({call.type}): no ONNX nodes (identity at eval)")
            else:
                nodeless[name] = "absorbed"
                unmapped.append(
                    f"{name} ({call.type}): no ONNX nodes of its own (folded into a neighbour by the exporter, "
                    "e.g. Conv+BatchNormalization; export with --keep-norms to keep it)"
                )
            continue
        inside = set(idx)
        outs = []
        for i in idx:
            for o in nodes[i].output:
                if not o:
                    continue
                if o in graph_outputs or any(c not in inside for c in consumers.get(o, [])):
                    outs.append((i, o))
        shape = list(call.output.shape)
        fitting = [(i, o) for i, o in outs if _shape_ok(_static_shape(vinfo[o]) if o in vinfo else None, shape)]
        if not fitting:
            unmapped.append(
                f"{name} ({call.type}): none of its {len(idx)} ONNX node(s) produces a value of the PyTorch "
                f"output shape {tuple(shape)}"
            )
            continue
        out = max(fitting)[1]  # produced by the last node
        # the nodes the output depends on (within the scope); the rest (e.g. a second output) is dropped
        need, stack = set(), [producer[out]]
        while stack:
            j = stack.pop()
            if j in need or j not in inside:
                continue
            need.add(j)
            stack.extend(producer[v] for v in nodes[j].input if v in producer)
        sel = [nodes[j] for j in sorted(need)]
        ext, consts, seen = [], [], set()
        for n in sel:
            for v in n.input:
                if not v or v in seen or v in inits:
                    continue
                seen.add(v)
                p = producer.get(v)
                if p is not None and p in need:
                    continue
                if p is not None and nodes[p].op_type == "Constant" and not nodes[p].input:
                    consts.append(nodes[p])
                    continue
                ext.append(v)
        mapped[name] = LayerMap(name, call, sel, out, ext, consts)

    # PyTorch activations for each layer's float inputs
    mapped_outputs = {lm.output: lm.name for lm in mapped.values()}
    for name, lm in mapped.items():
        call = lm.call
        # walk back through modules without nodes of their own
        src_name, src_tensor, fused = call.producers[0] if call.producers else None, call.inputs[0] if call.inputs else None, []
        while src_name in nodeless:
            c = trace.calls[src_name]
            if nodeless[src_name] == "absorbed":
                fused.insert(0, src_name)
            src_tensor = c.inputs[0] if c.inputs else None
            src_name = c.producers[0] if c.producers else None
        lm.fused = fused
        free = [
            v for v in lm.external_inputs
            if v not in graph_inputs and v not in mapped_outputs and is_float(v) is not False
        ]
        if len(free) == 1 and len(call.inputs) == 1 and src_tensor is not None:
            lm.torch_inputs[free[0]] = src_tensor
        elif len(free) == len(call.inputs) and not fused and len(free) > 1:
            # several inputs: the nodes' order of first use follows the forward's argument order
            # only by convention; accept it where the shapes pair up one to one
            for v, t in zip(free, call.inputs):
                lm.torch_inputs[v] = t
    absorbed_into = {f: lm.name for lm in mapped.values() for f in lm.fused}
    for k, u in enumerate(unmapped):
        nm = u.split(" ", 1)[0]
        if nm in absorbed_into:
            typ = trace.calls[nm].type
            unmapped[k] = (
                f"{nm} ({typ}): no ONNX nodes of its own: folded by the exporter into {absorbed_into[nm]}, "
                "compared together with it (export with --keep-norms to keep it separate)"
            )
    layers = [mapped[n] for n in trace.order if n in mapped]
    unmapped_named = {u.split(" ", 1)[0] for u in unmapped}
    for name, call in trace.calls.items():
        if name not in mapped and name not in unmapped_named:  # pragma: no cover - defensive
            unmapped.append(f"{name} ({call.type}): not mapped")
    return Mapping(method, layers, unmapped, notes)
