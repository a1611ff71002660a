"""The norm sites of a model being converted, and the calibration wrapper that stands in for each.

Every selected norm module is replaced *in its parent* (``parent._modules[name]``) by a
:class:`CalibSite` holding the original norm and its replacement, so user module classes and
names are kept and no FX tracing is needed.  What a wrapper does when the model runs is ONE
explicit :class:`Mode`, set for all sites by the context manager :func:`calibration_mode`::

    with calibration_mode(sites, Mode.FIT):
        model(x)
"""

from __future__ import annotations

import copy
import enum
from collections import deque
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from ..errors import NormswapError
from ..norms import NORMS, iter_norms
from . import kinds as K

__all__ = ["Mode", "CalibSite", "Site", "calibration_mode", "find_sites", "replace_in_parents",
           "param_like", "default_ndim", "detach_nonleaf_attrs", "norm_only", "subclass_reasons"]


class Mode(enum.Enum):
    """What a :class:`CalibSite` computes for an input ``x``."""

    #: pass the original norm's output on (the working model computes the original model)
    ORIGINAL = "original"
    #: pass the original output on and record it (the error-correcting target of the next run)
    RECORD = "record"
    #: add (x, target) to the site's statistics and pass the target on; the target is the
    #: recorded original activation when there is one, else ``original(x)``
    FIT = "fit"
    #: as FIT, but pass the replacement's output on (each site sees the converted model's input)
    FIT_REPLACED = "fit_replaced"


class CalibSite(nn.Module):
    """Stand-in for one norm during calibration (replaced by the fitted module at the end).

    ``orig`` computes the norm only; ``post`` (a :class:`normswap.layers.PostOps` or None) holds
    what a library norm applies after normalising (timm BatchNormAct2d's ``drop`` and ``act``).
    Statistics are taken on the normalised output, and ``post`` is applied to whatever the
    wrapper passes on, so the replacement is fitted to the norm and followed by the same ops.
    """

    def __init__(self, orig: nn.Module, post: nn.Module | None = None) -> None:
        super().__init__()
        self.orig = orig
        self.post = post
        self.new: nn.Module | None = None
        self.mode = Mode.ORIGINAL
        self.stats = None  # the site's sufficient statistics while fitting
        self.shape_seen: tuple[int, ...] | None = None
        self.recorded: deque[Tensor] = deque()
        #: per-channel (scale, shift) folded into the producer by channel reweighting
        #: (:mod:`normswap.convert.reweight`): undone in front of the original norm
        self.undo: tuple[Tensor, Tensor] | None = None

    def set_undo(self, a: Tensor | None, b: Tensor | None) -> None:
        self.undo = None if a is None else (a.detach().clone(), b.detach().clone())

    def undone(self, x: Tensor) -> Tensor:
        """The input the original norm saw before reweighting: ``(x - b) / a`` per channel (dim 1)."""
        if self.undo is None:
            return x
        a, b = self.undo
        shape = (1, -1) + (1,) * (x.dim() - 2)
        a = a.to(device=x.device, dtype=x.dtype).reshape(shape)
        b = b.to(device=x.device, dtype=x.dtype).reshape(shape)
        return (x - b) / a

    def replacement(self) -> nn.Module:
        """What takes the wrapper's place: the fitted module, followed by the post ops if any
        (``PostOps(norm=new, drop=..., act=...)``: the post-op children keep their names)."""
        if self.post is None:
            return self.new
        from ..layers import PostOps

        kids = dict(self.post.named_children())
        return PostOps(norm=self.new, **kids).train(self.new.training)

    def _after(self, y: Tensor) -> Tensor:
        return self.post(y) if self.post is not None else y

    def forward(self, x, *args, **kwargs):
        if args or kwargs:
            raise NormswapError(
                f"norm layer {type(self.orig).__name__} is called with extra arguments; only norms "
                "called as norm(x) can be converted (use --from to pick other layers)")
        if self.shape_seen is None:
            self.shape_seen = tuple(x.shape)
        mode = self.mode
        xo = self.undone(x)  # what the original norm saw (x itself unless reweighted)
        if mode is Mode.RECORD:
            y = self.orig(xo)
            self.recorded.append(y)
            # an in-place activation (ReLU(inplace=True)) must not change the recorded tensor
            return self._after(y.clone() if self.post is not None else y)
        if mode is Mode.FIT or mode is Mode.FIT_REPLACED:
            rec = self.recorded.popleft() if self.recorded else None
            y = rec if rec is not None and rec.shape == x.shape else self.orig(xo)
            self.stats.update(x, y)
            if mode is Mode.FIT_REPLACED and self.new is not None:
                return self._after(self.new(x))
            return self._after(y)
        return self._after(self.orig(xo))


@contextmanager
def calibration_mode(sites: list["Site"], mode: Mode) -> Iterator[None]:
    """Run the model with every site's wrapper in ``mode`` (restored afterwards)."""
    before = [s.wrapper.mode for s in sites]
    for s in sites:
        s.wrapper.mode = mode
    try:
        yield
    finally:
        for s, m in zip(sites, before):
            s.wrapper.mode = m


class Site:
    """One norm being converted: the original, its wrapper, and what calibration found."""

    def __init__(self, name: str, kind: str, module: nn.Module, layout: str) -> None:
        self.name = name
        self.kind = kind
        self.orig = module
        self.layout = layout
        self.channels = _channels_of(module)
        #: what the library norm applies after normalising ((name, module), in order)
        self.post_ops = _post_ops(module, kind)
        self.wrapper = CalibSite(norm_only(module, kind) if self.post_ops else module,
                                 _post_module(self.post_ops))
        self.stats = None
        self.groups: int | None = None
        self.err_naive: float | None = None
        self.err_fitted: float | None = None
        self.group_errors: dict | None = None
        self.method = "fitted"
        self.note: str | None = None
        self.calibrated = False
        #: channel reweighting folded into the producer (normswap.convert.reweight), or None
        self.reweight = None
        self.reweight_name: str | None = None
        #: the naive replacement's error on the original activations (set by reweighting, which
        #: changes the activations calibration sees)
        self.naive_original: float | None = None


def find_sites(work: nn.Module, to: str, sources: tuple[str, ...]) -> tuple[list[Site], dict[str, int]]:
    """The norms of ``sources`` kinds in ``work`` (``normswap.norms.iter_norms``); returns
    ``(sites, skipped)`` with the count of norms of other kinds, by kind."""
    sites: list[Site] = []
    skipped: dict[str, int] = {}
    for name, m, kind in iter_norms(work):
        if kind not in sources:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        K.check_pair(kind, to, m)
        layout = NORMS[kind].convert_layout(m)
        if layout is None:
            raise NormswapError(f"{name} ({type(m).__name__}) cannot be converted to {to} "
                                f"(valid pairs: {K.valid_pairs_text()})")
        sites.append(Site(name or type(m).__name__, kind, m, layout))
    return sites, skipped


def _post_ops(module: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    from ..norms import post_op_children

    return post_op_children(module, kind)


def _post_module(post_ops: list[tuple[str, nn.Module]]) -> nn.Module | None:
    if not post_ops:
        return None
    from ..layers import PostOps

    return PostOps(**dict(post_ops))


def norm_only(module: nn.Module, kind: str) -> nn.Module:
    """A shallow copy of ``module`` (same parameters and buffers) whose post-op children
    (``NORMS[kind].post_ops``, e.g. timm's ``drop`` / ``act``) are ``nn.Identity``: its forward
    is the normalisation alone."""
    names = NORMS[kind].post_ops if kind in NORMS else ()
    if not names:
        return module
    m = copy.copy(module)
    m._modules = dict(module._modules)
    for n in names:
        if n in m._modules:
            m._modules[n] = nn.Identity()
    return m


def subclass_reasons(work: nn.Module, limit: int = 3) -> str:
    """Why the norm subclasses of ``work`` that no recogniser knows are left alone, e.g.
    ``"MyBN (subclass of BatchNorm2d; children: gate)"``."""
    from ..norms import known_base

    seen: dict[str, str] = {}
    for name, m, kind in iter_norms(work):
        if kind != "unsupported_subclass" or type(m).__name__ in seen:
            continue
        base = known_base(m)
        extra = [n for n, _ in m.named_children()]
        own = [n for n, _ in m.named_parameters(recurse=False)
               if base is None or n not in {"weight", "bias"}]
        bits = [f"subclass of {base.__name__ if base is not None else 'a known norm'}"]
        if extra:
            bits.append("children: " + ", ".join(extra))
        if own:
            bits.append("own parameters: " + ", ".join(own))
        seen[type(m).__name__] = f"{type(m).__name__} at {name or '<root>'} ({'; '.join(bits)})"
    items = list(seen.values())
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _channels_of(m: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        v = getattr(m, attr, None)
        if isinstance(v, int):
            return v
    shape = getattr(m, "normalized_shape", None)
    if shape is not None:
        return int(tuple(shape)[-1])
    w = getattr(m, "weight", None)
    if isinstance(w, Tensor) and w.dim() >= 1:
        return int(w.shape[0])
    raise NormswapError(f"cannot tell the channel count of {type(m).__name__}")


def param_like(m: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a module's tensors (cpu / float32 when it has none)."""
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device, torch.float32
    return torch.device("cpu"), torch.float32


def replace_in_parents(model: nn.Module, mapping: dict[int, nn.Module]) -> int:
    """Replace every child slot holding a module whose id is in ``mapping``; returns slots changed."""
    changed = 0
    for parent in list(model.modules()):
        if isinstance(parent, CalibSite):
            continue
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in mapping:
                parent._modules[key] = mapping[id(child)]
                changed += 1
    return changed


def default_ndim(site: Site) -> int:
    """The input rank the site saw, else guessed from the class name (``...2d`` -> 4)."""
    if site.wrapper.shape_seen is not None:
        return len(site.wrapper.shape_seen)
    name = type(site.orig).__name__
    for suffix, nd in (("1d", 3), ("2d", 4), ("3d", 5)):
        if name.lower().endswith(suffix):
            return nd
    return 4


def detach_nonleaf_attrs(model: nn.Module) -> None:
    """Detach plain tensor attributes that carry autograd history (e.g. the ``weight`` that the
    legacy weight-norm / spectral-norm hooks recompute on every forward), which deepcopy refuses.
    The values are unchanged and are recomputed by the hooks anyway."""
    for m in model.modules():
        for key, val in list(vars(m).items()):
            if isinstance(val, Tensor) and not isinstance(val, nn.Parameter) and val.grad_fn is not None:
                setattr(m, key, val.detach())
