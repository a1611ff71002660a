"""Architecture recipes: how a saved state dict differs from its ``--arch`` factory's model.

A state dict holds tensors, not constructor arguments: after ``convert`` (BatchNorm →
GroupNorm(G, C)) or ``fold`` (BatchNorm → Identity, a new conv bias) the factory's model no
longer matches, and ``load_state_dict`` into it either fails or — worse — loads with a few
"unexpected keys" ignored and computes something else (a dropped fold bias, a GroupNorm with
another group count: the weights have the same shape whatever G is).

So when normswap saves a state dict of a changed model, it stores a *recipe* beside the
tensors: for every module whose type differs from the factory's, its type and constructor
arguments, and for same-type modules the parameters that were added (a conv bias created by a
fold).  ``load_model(path, arch=...)`` applies the recipe to the factory's model before
loading the tensors.  Only an allowlist of module types can be built from a recipe — a
recipe never imports or calls arbitrary code.
"""

from __future__ import annotations

import json
from typing import Any

from normswap.errors import NormswapError

RECIPE_KEY = "_normswap_recipe"  # key in a torch.save state dict; metadata key in safetensors
VERSION = 1


def _builders() -> dict[str, tuple[type, Any]]:
    """type name -> (class, function returning the constructor kwargs of a module)."""
    import torch.nn as nn

    from normswap.layers.affine import ChannelAffine
    from normswap.layers import BatchGroupNorm2d, FilterResponseNorm2d, PowerNorm2d

    def bn_like(m):
        return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
                "track_running_stats": m.track_running_stats}

    def conv(m):
        return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
                "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode}

    def convt(m):
        d = conv(m)
        d["output_padding"] = list(m.output_padding)
        return d

    table: dict[str, tuple[type, Any]] = {
        "Identity": (nn.Identity, lambda m: {}),
        "GroupNorm": (nn.GroupNorm, lambda m: {"num_groups": m.num_groups, "num_channels": m.num_channels,
                                               "eps": m.eps, "affine": m.affine}),
        "LayerNorm": (nn.LayerNorm, lambda m: {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
                                               "elementwise_affine": m.elementwise_affine,
                                               "bias": getattr(m, "bias", None) is not None}),
        "RMSNorm": (nn.RMSNorm, lambda m: {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
                                           "elementwise_affine": m.elementwise_affine}),
        "Linear": (nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                                         "bias": m.bias is not None}),
        "FilterResponseNorm2d": (FilterResponseNorm2d, lambda m: {"num_features": m.num_features,
                                                                  "eps": float(m.eps.detach().reshape(-1)[0]),
                                                                  "learnable_eps": m.learnable_eps}),
        "BatchGroupNorm2d": (BatchGroupNorm2d, lambda m: {"num_features": m.num_features, "num_groups": m.num_groups,
                                                          "eps": m.eps, "momentum": m.momentum, "affine": m.affine}),
        "PowerNorm2d": (PowerNorm2d, lambda m: {"num_features": m.num_features, "eps": m.eps,
                                                "momentum": m.momentum, "affine": m.affine}),
        "ChannelAffine": (ChannelAffine, lambda m: {"num_features": m.num_features}),
    }
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        table[cls.__name__] = (cls, bn_like)
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        table[cls.__name__] = (cls, conv)
    for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        table[cls.__name__] = (cls, convt)
    return table


def module_spec(module) -> dict:
    """``{"type": name, "args": {...}}`` for an allowlisted module type (exact type).  A
    :class:`normswap.layers.PostOps` (what a fold leaves of timm's BatchNormAct2d) is
    ``{"type": "PostOps", "keep": [child names]}``: rebuilt from the factory model's own
    children at that name, so no activation class ever has to be built from a recipe."""
    from normswap.layers import PostOps

    if type(module) is PostOps:
        # children of allowlisted types (the norm a convert put before a BatchNormAct2d's act) are
        # built from their own spec; the others (drop, act) are the factory model's children
        table = _builders()
        build = {n: module_spec(c) for n, c in module.named_children()
                 if any(type(c) is cls for cls, _ in table.values())}
        spec = {"type": "PostOps", "keep": [n for n, _ in module.named_children()]}
        return {**spec, "build": build} if build else spec
    for name, (cls, args) in _builders().items():
        if type(module) is cls:
            return {"type": name, "args": args(module)}
    raise NormswapError(
        f"a {type(module).__module__}.{type(module).__name__} cannot be described in a state dict recipe; "
        "save the model as a pickled module instead"
    )


#: the most elements one module of a recipe may allocate (a crafted recipe cannot exhaust memory)
MAX_RECIPE_ELEMENTS = 1 << 28  # 268M float32 values = 1 GiB


def _positive_int(name: str, value, what: str, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        raise NormswapError(f"recipe for a {what}: {name} must be an integer >= {0 if zero_ok else 1}, got {value!r}")
    return value


def _check_elements(n: int, what: str) -> None:
    if n > MAX_RECIPE_ELEMENTS:
        raise NormswapError(f"recipe for a {what}: it would allocate {n:,} parameters ({n * 4 / 1024 ** 3:.3g} GiB), "
                            f"more than the {MAX_RECIPE_ELEMENTS:,} allowed; the file's recipe is corrupt or crafted")


def validate_spec(spec: dict) -> None:
    """Check a recipe entry's constructor arguments before anything is built (clear errors,
    no allocation of absurd sizes)."""
    if not isinstance(spec, dict):
        raise NormswapError("recipe entry is not an object")
    what = str(spec.get("type"))
    args = spec.get("args", {})
    if not isinstance(args, dict):
        raise NormswapError(f"recipe for a {what}: args must be an object")
    if what == "GroupNorm" or what == "BatchGroupNorm2d":
        c = _positive_int("num_channels" if what == "GroupNorm" else "num_features",
                          args.get("num_channels", args.get("num_features")), what)
        g = _positive_int("num_groups", args.get("num_groups"), what)
        if c % g:
            raise NormswapError(f"recipe for a {what}: num_groups {g} does not divide the {c} channels")
        _check_elements(2 * c, what)
    elif what == "Linear":
        i = _positive_int("in_features", args.get("in_features"), what, zero_ok=True)
        o = _positive_int("out_features", args.get("out_features"), what, zero_ok=True)
        _check_elements(i * o + o, what)
    elif what.startswith(("Conv", "ConvTranspose")):
        i = _positive_int("in_channels", args.get("in_channels"), what)
        o = _positive_int("out_channels", args.get("out_channels"), what)
        g = _positive_int("groups", args.get("groups", 1), what)
        if i % g or o % g:
            raise NormswapError(f"recipe for a {what}: groups {g} must divide in_channels {i} and out_channels {o}")
        k = args.get("kernel_size", 1)
        ks = k if isinstance(k, (list, tuple)) else [k]
        n = i * o // g
        for d in ks:
            n *= _positive_int("kernel_size", d, what)
        _check_elements(n, what)
    elif what in ("LayerNorm", "RMSNorm"):
        shape = args.get("normalized_shape")
        dims = shape if isinstance(shape, (list, tuple)) else [shape]
        n = 1
        for d in dims:
            n *= _positive_int("normalized_shape", d, what)
        _check_elements(2 * n, what)
    elif "num_features" in args:
        _check_elements(4 * _positive_int("num_features", args.get("num_features"), what), what)


def build_module(spec: dict):
    table = _builders()
    try:
        cls, _ = table[spec["type"]]
        validate_spec(spec)
        return cls(**spec.get("args", {}))
    except KeyError:
        raise NormswapError(f"recipe names an unknown module type {spec.get('type')!r}") from None
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise NormswapError(f"recipe for a {spec.get('type')}: bad arguments ({e})") from None


def make_recipe(saved, reference) -> list[dict]:
    """The changes that turn ``reference`` (the factory's model) into ``saved``'s architecture."""
    ref = dict(reference.named_modules())
    entries: list[dict] = []
    replaced: set[str] = set()
    for name, m in saved.named_modules():
        if not name or any(name.startswith(p + ".") for p in replaced):
            continue
        r = ref.get(name)
        if r is None or type(r) is not type(m):
            entries.append({"name": name, **module_spec(m)})
            replaced.add(name)
            continue
        for pname, p in m.named_parameters(recurse=False):
            if getattr(r, pname, None) is None:
                entries.append({"name": name, "add_param": pname, "shape": list(p.shape)})
    return entries


def apply_recipe(model, entries: list[dict]) -> int:
    """Apply recipe entries to ``model`` in place; returns the number of changes."""
    import torch
    import torch.nn as nn

    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("name", ""), str):
            raise NormswapError("the file's normswap recipe is unreadable (an entry is not an object with a name)")
        name = e.get("name", "")
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            raise NormswapError(f"recipe: the model has no module {parent_name!r}; wrong --arch?") from None
        if "add_param" in e:
            shape = e.get("shape")
            if not isinstance(shape, list):
                raise NormswapError(f"recipe: added parameter {name}.{e['add_param']}: shape must be a list")
            n = 1
            for d in shape:
                n *= _positive_int("shape", d, f"parameter {name}.{e['add_param']}", zero_ok=True)
            _check_elements(n, f"parameter {name}.{e['add_param']}")
            target = getattr(parent, leaf, None)
            if not isinstance(target, nn.Module):
                raise NormswapError(f"recipe: the model has no module {name!r}; wrong --arch?")
            setattr(target, e["add_param"], nn.Parameter(torch.zeros(e["shape"])))
        elif e.get("type") == "PostOps":
            from normswap.layers import PostOps

            existing = getattr(parent, leaf, None)
            keep = e.get("keep")
            if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
                raise NormswapError(f"recipe for {name!r}: bad PostOps entry")
            build = e.get("build") or {}
            if not isinstance(build, dict):
                raise NormswapError(f"recipe for {name!r}: bad PostOps entry")
            kids = {k: build_module(build[k]) if k in build else getattr(existing, k, None) for k in keep}
            if not isinstance(existing, nn.Module) or not all(isinstance(v, nn.Module) for v in kids.values()):
                raise NormswapError(f"recipe: the model's {name!r} has no children {keep}; wrong --arch?")
            setattr(parent, leaf, PostOps(**kids).train(model.training))
        else:
            if not hasattr(parent, leaf):
                raise NormswapError(f"recipe: the model has no module {name!r}; wrong --arch?")
            setattr(parent, leaf, build_module(e).train(model.training))  # keep the model's mode
    return len(entries)


def dumps(entries: list[dict]) -> str:
    return json.dumps({"version": VERSION, "changes": entries})


def loads(text: str) -> list[dict]:
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("changes"), list):
            raise ValueError("unsupported recipe")
        return data["changes"]
    except (ValueError, TypeError) as e:
        raise NormswapError(f"the file's normswap recipe is unreadable ({e})") from None
