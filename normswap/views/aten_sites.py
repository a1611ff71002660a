"""The sites of an ATen graph: norm ops (one site per module, with all its calls; a functional call
is ``<module>.<node>``) and norm modules lowered to primitive ops, found from ``nn_module_stack``."""

from __future__ import annotations

from torch import fx

from normswap.norm_ops import bind, op_signature
from normswap.norms import NORMS, classify_type, looks_like_norm_name

from .aten_graph import bn_output, module_of
from .base import NormSite

__all__ = ["qual_type_kind", "site_name", "op_sites", "lowered_sites"]


def qual_type_kind(type_str: str) -> str | None:
    """'torch.nn.modules.batchnorm.BatchNorm2d' -> 'bn': exact qualified names of registry types,
    else the class looked up among already-imported modules (never imported) and classified."""
    import sys

    for k, nk in NORMS.items():
        for t in nk.types:
            if f"{t.__module__}.{t.__qualname__}" == type_str:
                return k
    mod_name, _, cls_name = str(type_str).rpartition(".")
    mod = sys.modules.get(mod_name)
    cls = getattr(mod, cls_name, None) if mod is not None else None
    return classify_type(cls) if isinstance(cls, type) else None



def site_name(view, node: fx.Node, roles: dict) -> tuple[str, bool, str]:
    """(site name, functional?, module type) of a norm op node: the module's qualified name when
    the op reads that module's own parameters/buffers, else ``<module>.<node name>``."""
    path, typ = module_of(node, view.prefix)
    for role in ("running_mean", "weight", "bias"):
        v = roles.get(role)
        key = view.state.target.get(v.name) if isinstance(v, fx.Node) else None
        if key is not None:
            if path and key.rsplit(".", 1)[0] == path:
                return path, False, typ
            break
    else:
        if path and not any(isinstance(roles.get(r), fx.Node) for r in ("running_mean", "weight", "bias")) \
                and qual_type_kind(typ) is not None:
            return path, False, typ  # a module norm without affine / statistics
    return (f"{path}.{node.name}" if path else node.name), True, typ

def op_sites(view) -> list[NormSite]:
    """One site per norm module (all its calls) or functional call of the program."""
    by_name: dict[str, NormSite] = {}
    for node in view.graph.nodes:
        if node.op != "call_function":
            continue
        sig = op_signature(node.target)
        if sig is None:
            continue
        roles = bind(sig, node.args, node.kwargs)
        name, functional, typ = site_name(view, node, roles)
        site = by_name.get(name)
        if site is None:
            # a library class the registry knows (timm's BatchNormAct2d, LayerNorm2d) keeps its kind
            # when the op folds like it; otherwise the op is what this graph computes
            tk = qual_type_kind(typ) if typ and not functional else None
            kind = tk if tk and tk not in ("unsupported_subclass", "custom") and \
                NORMS[tk].fold_family == NORMS[sig.kind].fold_family else sig.kind
            site = NormSite(name, kind, None, [], functional=node if functional else None,
                            type_name=typ.rsplit(".", 1)[-1] if typ and not functional else None,
                            facts={"op": sig.name, "module_type": typ, "op_kind": sig.kind})
            by_name[name] = site
        site.calls.append({"node": node, "roles": roles, "out": bn_output(node)})
    return list(by_name.values())

def lowered_sites(view, known: set) -> list[NormSite]:
    """Norm modules lowered to primitive ops (frozen BN, PowerNorm, custom norms, ...)."""
    modules: dict[str, str] = {}
    for node in view.graph.nodes:
        for path, typ in (node.meta.get("nn_module_stack") or {}).values():
            modules.setdefault(str(path), typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}")
    out = []
    params = {k for n, k in view.state.target.items() if view.state.is_param(view.state.node_of.get(k))}
    state_keys = set(view.state.target.values())
    for path, typ in modules.items():
        if not path or path in known or any(path.startswith(k + ".") for k in known if k):
            continue
        if any(p.startswith(path + ".") for p in modules):
            continue  # not a leaf
        cls_name = typ.rsplit(".", 1)[-1]
        kind = qual_type_kind(typ)
        own = {k[len(path) + 1:] for k in state_keys if k.startswith(path + ".") and "." not in k[len(path) + 1:]}
        if kind is None:
            if not looks_like_norm_name(cls_name) and "frozen" not in cls_name.lower():
                continue
            own_params = [k for k in own if f"{path}.{k}" in params]
            if not own_params and all(n in own for n in ("weight", "bias", "running_mean", "running_var")):
                kind = "frozen_bn"
            elif "running_var" in own or "running_mean" in own:
                kind = "unsupported_subclass"
            elif "weight" in own:
                kind = "custom"
            else:
                continue
        out.append(NormSite(path, kind, None, [], type_name=cls_name,
                            facts={"lowered": True, "module_type": typ, "own": own}))
    return out
