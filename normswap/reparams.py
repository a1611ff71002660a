"""Weight reparametrisations: spectral norm, weight norm and weight standardisation sit on a
producer's weight, not in a module of their own (:func:`weight_reparams`,
:func:`iter_weight_reparams`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

__all__ = ["WeightReparam", "weight_reparams", "weight_reparam", "iter_weight_reparams", "is_weight_std_conv"]


@dataclass(frozen=True)
class WeightReparam:
    """A spectral/weight norm on a module's parameter."""

    param: str  # the reparametrised parameter's name, e.g. "weight"
    kind: str  # "spectral" | "weight_norm" | "weight_std"
    api: str  # "hook" (torch.nn.utils.spectral_norm / weight_norm), "parametrization", or "forward"
    details: dict = field(default_factory=dict, compare=False, hash=False)


#: timm's weight-standardised convs (BiT, NFNet): ``forward`` standardises ``self.weight`` per
#: output channel with ``F.batch_norm(w.reshape(1, out, -1), None, None, training=True, ...)``
_WEIGHT_STD_CONVS = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame",
                     "WeightStandardizedConv2d")


def _is_weight_std_conv(module: nn.Module) -> bool:
    # Hugging Face's WeightStandardizedConv2d (BiT, ViT-hybrid, DPT-hybrid) standardises like timm's
    # StdConv2d after its optional `pad` child (DynamicPad2d, TF 'same' padding, or None)
    if not (type(module).__name__ in _WEIGHT_STD_CONVS and isinstance(module, nn.Conv2d)
            and isinstance(getattr(module, "eps", None), float)):
        return False
    if type(module).__name__ == "WeightStandardizedConv2d":  # HF: only its `pad` child, no own parameters
        kids = dict(module.named_children())
        own = {n for n, _ in module.named_parameters(recurse=False)}
        return set(kids) <= {"pad"} and own <= {"weight", "bias"}
    return True


def is_weight_std_conv(module: nn.Module) -> bool:
    """Is ``module`` a weight-standardised conv (timm StdConv2d / ScaledStdConv2d ...)?"""
    return _is_weight_std_conv(module)


def weight_reparams(module: nn.Module) -> list[WeightReparam]:
    """All spectral / weight norm reparametrisations sitting directly on ``module``."""
    out: list[WeightReparam] = []
    try:
        from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySN
    except Exception:  # pragma: no cover
        _LegacySN = ()
    try:
        from torch.nn.utils.weight_norm import WeightNorm as _LegacyWN
    except Exception:  # pragma: no cover
        _LegacyWN = ()
    for hook in list(getattr(module, "_forward_pre_hooks", {}).values()):
        if _LegacySN and isinstance(hook, _LegacySN):
            out.append(WeightReparam(hook.name, "spectral", "hook", {
                "n_power_iterations": hook.n_power_iterations, "dim": hook.dim, "eps": hook.eps}))
        elif _LegacyWN and isinstance(hook, _LegacyWN):
            out.append(WeightReparam(hook.name, "weight_norm", "hook", {"dim": hook.dim}))
    if _is_weight_std_conv(module):
        out.append(WeightReparam("weight", "weight_std", "forward", {
            "eps": getattr(module, "eps", None), "scaled": hasattr(module, "gain"),
            "class": type(module).__name__}))
    plist = getattr(module, "parametrizations", None)
    if isinstance(plist, nn.ModuleDict):
        for pname, chain in plist.items():
            for p in chain:
                cname = type(p).__name__
                if cname == "_SpectralNorm":
                    out.append(WeightReparam(pname, "spectral", "parametrization", {
                        "n_power_iterations": getattr(p, "n_power_iterations", None),
                        "dim": getattr(p, "dim", None), "eps": getattr(p, "eps", None)}))
                elif cname == "_WeightNorm":
                    out.append(WeightReparam(pname, "weight_norm", "parametrization",
                                             {"dim": getattr(p, "dim", None)}))
    return out


def weight_reparam(module: nn.Module) -> str | None:
    """'spectral' / 'weight_norm' when the module's weight is reparametrised, else None."""
    r = weight_reparams(module)
    return r[0].kind if r else None


def iter_weight_reparams(model: nn.Module) -> Iterator[tuple[str, nn.Module, WeightReparam]]:
    """Yield (site name like ``conv1.weight``, owner module, WeightReparam)."""
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        for r in weight_reparams(mod):
            yield (f"{name}.{r.param}" if name else r.param), mod, r


# --------------------------------------------------------------------------- per-module facts
