"""The program applier: carries planned folds out on a copy of a ``torch.export`` program.

The copy's graph, signature and state stay consistent: a layer's folded weight replaces its state
entry; a new bias becomes a parameter with its own placeholder and ``InputSpec``; a folded
BatchNorm's nodes are erased (its output is the producer's, taking over its name when it was a
program output) and its placeholders and state entries are dropped when nothing else uses them; a
folded LayerNorm / RMSNorm affine leaves the op with ``weight=None, bias=None``.  Each match reads
the layer's *current* weights, so folds into both sides of a layer compose.  The arithmetic is
:mod:`normswap.arith`.
"""

from __future__ import annotations

import copy

import torch
from torch import fx

from normswap import arith
from normswap.views.aten_graph import set_arg
from normswap.views.base import Match, NormSite

__all__ = ["ProgramApplier"]


def _copy_program(ep):
    """A copy of ``ep`` whose graph, signature and state can be changed without touching ``ep``
    (tensors are shared until replaced; nothing is modified in place)."""
    gm = copy.deepcopy(ep.graph_module)
    # the copy may rename nodes whose names shadow builtins ("input" -> "input_1"): the
    # signature and module call graph refer to the original names, so restore them
    for old, new in zip(ep.graph_module.graph.nodes, gm.graph.nodes):
        if new.name != old.name:
            new.name = old.name
    sig = copy.deepcopy(ep.graph_signature)
    state = dict(ep.state_dict)
    constants = dict(getattr(ep, "constants", {}) or {})
    return gm, sig, state, constants


def _rebuild(ep, gm, sig, state, constants):
    from torch.export import ExportedProgram

    gm.graph.lint()
    gm.recompile()
    kwargs = dict(root=gm, graph=gm.graph, graph_signature=sig, state_dict=state,
                  range_constraints=copy.copy(ep.range_constraints),
                  module_call_graph=copy.deepcopy(ep.module_call_graph),
                  example_inputs=ep.example_inputs, constants=constants)
    try:
        return ExportedProgram(**kwargs, verifiers=ep.verifiers)
    except TypeError:
        return ExportedProgram(**kwargs)


def _fake(like: fx.Node, t: torch.Tensor):
    v = like.meta.get("val")
    mode = getattr(v, "fake_mode", None)
    if mode is None:
        return t
    return mode.from_tensor(t, static_shapes=True)


def _new_param(gm: fx.GraphModule, sig, state: dict, key: str, value: torch.Tensor,
               like: fx.Node) -> fx.Node:
    """A new parameter: placeholder after the last parameter placeholder, InputSpec, state."""
    from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

    g = gm.graph
    phs = [n for n in g.nodes if n.op == "placeholder"]
    kinds = {s.arg.name: s.kind for s in sig.input_specs if hasattr(s.arg, "name")}
    last_param = None
    for n in phs:
        if kinds.get(n.name) == InputKind.PARAMETER:
            last_param = n
    names = {n.name for n in g.nodes}
    base = "p_" + "".join(ch if ch.isalnum() else "_" for ch in key)
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    if last_param is not None:
        with g.inserting_after(last_param):
            ph = g.placeholder(name)
    else:
        with g.inserting_before(phs[0] if phs else None):
            ph = g.placeholder(name)
    ph.meta.update({k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace")})
    ph.meta["val"] = _fake(like, value)
    spec = InputSpec(kind=InputKind.PARAMETER, arg=TensorArgument(name=ph.name), target=key, persistent=None)
    specs = list(sig.input_specs)
    idx = 0
    for i, s in enumerate(specs):
        if s.kind == InputKind.PARAMETER:
            idx = i + 1
    specs.insert(idx, spec)
    sig.input_specs[:] = specs if isinstance(sig.input_specs, list) else specs
    if not isinstance(sig.input_specs, list):
        sig.input_specs = specs
    state[key] = torch.nn.Parameter(value, requires_grad=False)
    return ph


def _unique_key(state: dict, constants: dict, key: str) -> str:
    if key not in state and key not in constants:
        return key
    i = 1
    while f"{key}_{i}" in state or f"{key}_{i}" in constants:
        i += 1
    return f"{key}_{i}"


def _drop_unused_state(gm, sig, state, constants, candidates: set[str]) -> list[str]:
    """Remove placeholders (and their specs / state) whose target is in ``candidates`` and that
    no node uses any more; a state key is removed only when no spec refers to it any more."""
    from torch.export.graph_signature import InputKind

    g = gm.graph
    removed = []
    keep_specs = []
    by_name = {n.name: n for n in g.nodes if n.op == "placeholder"}
    for s in sig.input_specs:
        name = getattr(s.arg, "name", None)
        n = by_name.get(name)
        if (s.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
                and s.target in candidates and n is not None and not n.users):
            g.erase_node(n)
            removed.append(s.target)
            continue
        keep_specs.append(s)
    sig.input_specs[:] = keep_specs
    still = {s.target for s in keep_specs if s.target is not None}
    still |= {s.target for s in sig.output_specs if getattr(s, "target", None) is not None}
    for k in removed:
        if k not in still:
            state.pop(k, None)
            constants.pop(k, None)
    return removed


class ProgramApplier:
    """Applies matches to a working copy of ``ep``; :meth:`finish` returns the new program."""

    def __init__(self, ep):
        self.ep = ep
        self.gm, self.sig, self.state, self.constants = _copy_program(ep)
        self.nodes = {n.name: n for n in self.gm.graph.nodes}
        self.target = {getattr(s.arg, "name", None): s.target for s in self.sig.input_specs if s.target is not None}
        self.touched: set[str] = set()
        self.applied = 0

    def tensor(self, ph: fx.Node | None):
        if ph is None:
            return None
        key = self.target.get(ph.name)
        t = self.state.get(key)
        return t if t is not None else self.constants.get(key)

    def _new_bias(self, wph: fx.Node, value: torch.Tensor, like: torch.Tensor) -> fx.Node:
        wkey = self.target[wph.name]
        base = wkey[:-len(".weight")] + ".bias" if wkey.endswith(".weight") else wkey + "_bias"
        bkey = _unique_key(self.state, self.constants, base)
        ph = _new_param(self.gm, self.sig, self.state, bkey, arith.cast_like(value, like), self.nodes[wph.name])
        self.state[bkey].requires_grad_(like.requires_grad)
        self.nodes[ph.name] = ph
        self.target[ph.name] = bkey
        return ph

    def _set(self, ph: fx.Node, value: torch.Tensor, like: torch.Tensor) -> None:
        self.state[self.target[ph.name]] = torch.nn.Parameter(arith.cast_like(value, like),
                                                              requires_grad=like.requires_grad)

    def _rewrite(self, layer, w2, b2, w) -> None:
        """New weight / bias of a layer, and every op node of it reading the bias."""
        p = layer.handle
        self._set(p.weight, w2, w)
        if p.bias is not None:
            self._set(p.bias, b2, self.tensor(p.bias))
            bias = self.nodes[p.bias.name]
        else:
            bias = self._new_bias(p.weight, b2, w)
            p.bias = bias
        for node in p.nodes:
            n = self.nodes[node.name]
            if p.op in ("conv", "convt", "linear"):
                set_arg(n, "bias", bias)
            elif p.op == "addmm":
                set_arg(n, "self", bias)
            else:  # mm -> addmm(bias, x, w.t())
                g = self.gm.graph
                with g.inserting_after(n):
                    add = g.call_function(torch.ops.aten.addmm.default, (bias, *n.args))
                add.meta = dict(n.meta)
                n.replace_all_uses_with(add)
                add.args = (bias, *n.args)
                g.erase_node(n)
                add.name = node.name
                self.nodes[node.name] = add
        if p.op == "mm":
            p.op = "addmm"

    def _after(self, layer, s, t) -> None:
        p = layer.handle
        w, b = self.tensor(p.weight), self.tensor(p.bias)
        if p.op == "convt":
            w2, b2 = arith.fold_affine_after_conv_transpose(w, b, s, t, layer.groups)
        elif p.op == "conv":
            w2, b2 = arith.fold_affine_after_conv(w, b, s, t)
        else:
            w2, b2 = arith.fold_affine_after_linear(w, b, s, t)
        self._rewrite(layer, w2, b2, w)

    def _before(self, layer, s, t) -> None:
        p = layer.handle
        w, b = self.tensor(p.weight), self.tensor(p.bias)
        if p.op == "linear":
            w2, b2 = arith.fold_affine_before_linear(w, b, s, t)
        else:
            w2, b2 = arith.fold_affine_before_conv(w, b, s, t, layer.groups)
        self._rewrite(layer, w2, b2, w)

    def _erase_norm(self, site: NormSite, into) -> None:
        """Erase the norm's nodes; its output becomes ``into(call)`` (the producer, or its input)."""
        for c in site.calls:
            bn = self.nodes[c["node"].name]
            out = self.nodes[c["out"].name] if isinstance(c["out"], fx.Node) else None
            new = into(c)
            is_output = out is not None and any(u.op == "output" for u in out.users)
            if out is not None:
                out.replace_all_uses_with(new)
            for u in list(bn.users):
                self.gm.graph.erase_node(u)
            self.gm.graph.erase_node(bn)
            if is_output:  # the signature names the program's outputs: take over the output's name
                new.name = out.name
            self._touch(c["roles"], ("weight", "bias", "running_mean", "running_var"))
        if site.functional is None and site.facts.get("op_kind", site.kind) == "bn":
            self.touched.add(f"{site.name}.num_batches_tracked")

    def _touch(self, roles: dict, names) -> None:
        for role in names:
            v = roles.get(role)
            if isinstance(v, fx.Node) and v.name in self.target:
                self.touched.add(self.target[v.name])

    def apply(self, site: NormSite, m: Match) -> None:
        d = m.data
        s, t = d["s"], d["t"]
        self.applied += 1
        if "producer" in d:
            prod = d["producer"]
            self._after(prod, s, t)
            by_call = {id(c["node"]): n for c, n in zip(site.calls, prod.handle.nodes)}
            self._erase_norm(site, lambda c: self.nodes[by_call.get(id(c["node"]), prod.handle.nodes[0]).name])
            return
        for layer in d.get("consumers", ()):
            self._before(layer, s, t)
        if d["norm"] == "reset_affine":
            for c in site.calls:
                n = self.nodes[c["node"].name]
                for role in ("weight", "bias"):
                    if c["roles"].get(role) is not None:
                        set_arg(n, role, None)
                self._touch(c["roles"], ("weight", "bias"))
        else:
            self._erase_norm(site, lambda c: self.nodes[c["node"].name].args[0])

    def finish(self):
        """(the rewritten program, the state keys removed) -- ``(ep, [])`` when nothing was applied."""
        if not self.applied:
            return self.ep, []
        removed = _drop_unused_state(self.gm, self.sig, self.state, self.constants, self.touched)
        return _rebuild(self.ep, self.gm, self.sig, self.state, self.constants), removed
