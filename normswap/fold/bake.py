"""Weight reparametrisations baked into plain weights: spectral norm (``W / sigma``, legacy hook or
parametrization) and weight standardisation (timm's ``StdConv2d`` / ``ScaledStdConv2d`` become a
plain ``nn.Conv2d``).  :func:`reparam_decisions` is what ``plan`` / ``fold`` report for them."""

from __future__ import annotations

import torch
from torch import nn

from normswap.norms import iter_weight_reparams
from normswap.reasons import code_of
from normswap.reasons import reason as reason_

from .report import FoldDecision, FoldReport

__all__ = ["reparam_decisions", "bake", "bake_weight_std"]


def reparam_decisions(model: nn.Module, bake: bool, bake_ws: bool = False) -> list[FoldDecision]:
    out = []
    for site_name, mod, r in iter_weight_reparams(model):
        owner = site_name.rsplit(".", 1)[0] if "." in site_name else ""
        if r.kind == "spectral":
            if not bake:
                reason = reason_("spectral_not_baked")
            elif mod.training:
                reason = reason_("spectral_training")
            elif r.api == "parametrization" and len(mod.parametrizations[r.param]) != 1:
                reason = reason_("spectral_other")
            else:
                reason = None
        elif r.kind == "weight_std":
            if not bake_ws:
                reason = reason_("weight_std_not_baked")
            elif type(mod).__name__.endswith("Same") or getattr(mod, "pad", None) is not None:
                reason = reason_("weight_std_same", type=type(mod).__name__)
            elif mod._forward_hooks or mod._forward_pre_hooks:
                reason = reason_("weight_std_hooks")
            else:
                reason = None
        else:
            reason = reason_("reparam_not_baked", kind=r.kind)
        pattern = "bake_weight_std" if r.kind == "weight_std" else "bake_spectral_norm"
        out.append(FoldDecision(site_name, r.kind, owner if reason is None else None,
                                pattern if reason is None else None, reason, code_of(reason)))
    return out



def bake_weight_std(work: nn.Module, mod: nn.Module) -> None:
    """Replace a weight-standardised conv (timm StdConv2d / ScaledStdConv2d) by an ``nn.Conv2d``
    holding the standardised weight, computed in float64 exactly as its forward does
    (per output channel: biased variance, ``eps``; times ``gain * scale`` when scaled)."""
    w = mod.weight.detach().to(torch.float64)
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    std_w = (flat - mean) / torch.sqrt(var + float(mod.eps))
    gain = getattr(mod, "gain", None)
    if isinstance(gain, torch.Tensor):
        std_w = std_w * (gain.detach().to(torch.float64).reshape(-1, 1) * float(mod.scale))
    new = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                    dilation=mod.dilation, groups=mod.groups, bias=mod.bias is not None,
                    padding_mode=mod.padding_mode, device=mod.weight.device, dtype=mod.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(std_w.reshape(w.shape).to(mod.weight.dtype))
        if mod.bias is not None:
            new.bias.copy_(mod.bias.detach())
    new.train(mod.training)
    for name, m in list(work.named_modules(remove_duplicate=False)):
        if m is mod and name:
            parent_name, _, leaf = name.rpartition(".")
            setattr(work.get_submodule(parent_name) if parent_name else work, leaf, new)



def bake(work: nn.Module, report: FoldReport | None, spectral: bool = True, weight_std: bool = False) -> None:
    from torch.nn.utils import parametrize

    for d in reparam_decisions(work, spectral, weight_std):
        if d.reason is not None or (d.kind == "spectral" and not spectral):
            continue
        owner, _, pname = d.norm.rpartition(".")
        mod = work.get_submodule(owner) if owner else work
        api = None
        if d.kind == "weight_std":
            bake_weight_std(work, mod)
            if report is not None:
                report.baked.append({"norm": d.norm, "into": d.into, "api": "forward"})
            continue
        if getattr(mod, "parametrizations", None) is not None and pname in mod.parametrizations:
            api = "parametrization"
            mod.parametrizations[pname].eval()  # no power-iteration step while removing
            # remove_parametrizations deletes the property from the module's class, which a
            # deepcopy shares with the user's model: give this module a class of its own
            cls = type(mod)
            mod.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            parametrize.remove_parametrizations(mod, pname, leave_parametrized=True)
        else:
            api = "hook"
            torch.nn.utils.remove_spectral_norm(mod, pname)
        if report is not None:
            report.baked.append({"norm": d.norm, "into": d.into, "api": api})
