"""How faithful the converted model is: its outputs against the original's (top-1 agreement / KL
on the first logits-like output of a classifier, relative output error otherwise; accuracy with
labels), and for EVERY output of the model (tuple / dict / dataclass outputs such as HF's
``pooler_output``) the largest absolute and the relative error.  Measured on the calibration
inputs (in-sample) and, with ``eval_data`` / ``--eval``, on held-out inputs.  Under
``torch.distributed`` the sums are all-reduced."""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Dataset
from ..errors import NormswapError
from ..onnx_utils import eval_mode  # noqa: F401  (re-exported: eval mode, every flag restored after)
from .fit import rel as _rel
from .report import Fidelity

__all__ = ["OutputCache", "fidelity", "first_tensor", "named_outputs", "is_classifier", "dist_info",
           "allreduce_floats", "eval_mode", "cat_outputs"]

#: the original outputs are cached (for fidelity and distillation) up to this size
CACHE_LIMIT_BYTES = 512 * 2**20


class _Cached(list):
    """The cached first (logits-like) output of every batch, as a list (what distillation
    concatenates), carrying every output of every batch in ``.outputs``."""

    outputs: list


class OutputCache:
    """The original model's outputs on the calibration batches, recorded during the first
    calibration pass; ``tensors`` is None once they exceed :data:`CACHE_LIMIT_BYTES` (then the
    original is run again where they are needed).  ``tensors`` is a list of the first
    logits-like output per batch; ``tensors.outputs`` holds every named output per batch."""

    def __init__(self, limit: int = CACHE_LIMIT_BYTES) -> None:
        self.tensors: _Cached | None = _Cached()
        self.tensors.outputs = []
        self.bytes = 0
        self.limit = limit

    def add(self, out) -> None:
        if self.tensors is None:
            return
        first = first_tensor(out).detach().to("cpu")
        named = [(n, t.detach().to("cpu")) for n, t in named_outputs(out)]
        self.bytes += first.numel() * first.element_size()
        self.bytes += sum(t.numel() * t.element_size() for _, t in named)
        if self.bytes > self.limit:
            self.tensors = None
        else:
            self.tensors.append(first)
            self.tensors.outputs.append(named)


def named_outputs(out, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor of a model output, with a name: ``output`` for a plain tensor, the key for
    dicts (HF ``ModelOutput``) and dataclasses, the index for tuples/lists (``0``, ``1.logits``)."""
    if isinstance(out, Tensor):
        return [(prefix or "output", out)]
    items: list = []
    if isinstance(out, dict):
        items = list(out.items())
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    elif isinstance(out, (tuple, list)):
        fields = getattr(out, "_fields", None)  # namedtuple
        items = list(zip(fields, out)) if fields else [(str(i), v) for i, v in enumerate(out)]
    res: list[tuple[str, Tensor]] = []
    for k, v in items:
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (Tensor, dict, tuple, list)) or (dataclasses.is_dataclass(v) and not isinstance(v, type)):
            res.extend(named_outputs(v, name))
    return res


def first_tensor(out) -> Tensor:
    """The output fidelity's agreement / KL and distillation use: a plain tensor; for dicts
    ``logits`` / ``out`` / ``output`` else the first tensor, else the first tensor nested in a value
    (HF ``BackboneOutput(feature_maps=(t0, t1, ...))``: ``t0``); for tuples the first
    classifier-shaped (N, classes) tensor, else the first tensor."""
    if isinstance(out, Tensor):
        return out
    nested: list = []  # a dict's / dataclass's values that hold tensors in turn (HF BackboneOutput.feature_maps)
    if isinstance(out, dict):
        for k in ("logits", "out", "output"):
            if isinstance(out.get(k), Tensor):
                return out[k]
        for v in out.values():
            if isinstance(v, Tensor):
                return v
        nested = list(out.values())
    if hasattr(out, "logits") and isinstance(out.logits, Tensor):
        return out.logits
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        for f in dataclasses.fields(out):
            if isinstance(getattr(out, f.name), Tensor):
                return getattr(out, f.name)
        nested = nested or [getattr(out, f.name) for f in dataclasses.fields(out)]
    for v in nested:
        if isinstance(v, (dict, tuple, list)) or (dataclasses.is_dataclass(v) and not isinstance(v, type)):
            try:
                return first_tensor(v)
            except NormswapError:
                pass
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, Tensor) and is_classifier(v):
                return v
        for v in out:
            try:
                return first_tensor(v)
            except NormswapError:
                pass
    raise NormswapError(f"cannot find a tensor in the model output of type {type(out).__name__}")


def _first_name(out, named: list[tuple[str, Tensor]]) -> str | None:
    t = first_tensor(out)
    for n, v in named:
        if v is t:
            return n
    return None


def cat_outputs(outs: list):
    """Concatenate the outputs of consecutive chunks of one batch along dim 0 (tensors, and
    dicts / tuples / lists / dataclasses of them); anything else is taken from the first chunk."""
    first = outs[0]
    if len(outs) == 1:
        return first
    if isinstance(first, Tensor):
        if first.dim() == 0:
            return first
        return torch.cat(outs)
    if isinstance(first, dict):
        vals = {k: cat_outputs([o[k] for o in outs]) for k in first}
        try:
            return type(first)(**vals) if type(first) is not dict else vals
        except TypeError:
            return vals
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: cat_outputs([getattr(o, f.name) for o in outs])
                                             for f in dataclasses.fields(first) if f.init})
    if isinstance(first, (tuple, list)):
        vals = [cat_outputs([o[i] for o in outs]) for i in range(len(first))]
        if getattr(first, "_fields", None):
            return type(first)(*vals)
        return type(first)(vals)
    return first


def is_classifier(out: Tensor) -> bool:
    return out.dim() == 2 and out.shape[1] > 1 and out.is_floating_point()


def dist_info() -> tuple[bool, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1, dist.get_world_size()
    return False, 1


def _allreduce(values: list[float], op_name: str) -> list[float]:
    on, _ = dist_info()
    if not on:
        return values
    import torch.distributed as dist
    from .stats import comm_device

    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op_name))
    return t.tolist()


def allreduce_floats(values: list[float]) -> list[float]:
    """Sum over the processes of a torch.distributed run (unchanged in a single process)."""
    return _allreduce(values, "SUM")


def allreduce_max(values: list[float]) -> list[float]:
    """Maximum over the processes of a torch.distributed run."""
    return _allreduce(values, "MAX")


def _chunked(model: nn.Module, x: Tensor, chunk: int | None, where: str = "calibration"):
    """``model(x)`` in chunks; a forward that raises on the user's data is one NormswapError."""
    try:
        if not chunk or chunk >= x.shape[0]:
            return model(x)
        return cat_outputs([model(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])
    except NormswapError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's model raised on the user's data (e.g. --eval)
        from .forward import forward_error

        raise NormswapError(forward_error(e, x, model, what=f"a {where} batch")) from None


class _OutputErrors:
    """Per named output: sum of squared errors, of squared reference values, largest |error|."""

    def __init__(self) -> None:
        self.acc: dict[str, list] = {}  # name -> [sse, ssy, maxabs, shape, nonfinite]

    def add(self, name: str, out: Tensor, ref: Tensor, rows) -> None:
        out, ref = out.detach().float(), ref.detach().to(out.device).float()
        if out.shape != ref.shape:
            raise NormswapError(f"the converted model's output {name} has shape {tuple(out.shape)}, "
                                f"the original's {tuple(ref.shape)}")
        if rows is not None and ref.dim() and ref.shape[0] == rows.shape[0]:
            out, ref = out[rows.to(out.device)], ref[rows.to(ref.device)]
        ok = torch.isfinite(ref) & torch.isfinite(out)
        d = torch.where(ok, out - ref, torch.zeros_like(out))
        r = torch.where(ok, ref, torch.zeros_like(ref))
        a = self.acc.setdefault(name, [0.0, 0.0, 0.0, list(ref.shape[1:]) if ref.dim() else [], 0.0, 0.0])
        a[0] += float((d ** 2).sum())
        a[1] += float((r ** 2).sum())
        a[2] = max(a[2], float(d.abs().max())) if d.numel() else a[2]
        a[4] += float((~ok).sum())
        a[5] += float((~torch.isfinite(out) & torch.isfinite(ref)).sum())

    def results(self) -> list[dict]:
        names = sorted(self.acc)
        sums = allreduce_floats([v for n in names for v in (self.acc[n][0], self.acc[n][1], self.acc[n][4],
                                                            self.acc[n][5])])
        mx = allreduce_max([self.acc[n][2] for n in names])
        out = []
        for i, n in enumerate(names):
            sse, ssy, bad, conv_bad = sums[4 * i: 4 * i + 4]
            out.append({"name": n, "shape": self.acc[n][3], "max_abs_error": mx[i], "rel_error": _rel(sse, ssy),
                        "nonfinite": int(bad), "converted_nonfinite": int(conv_bad)})
        order = {n: k for k, n in enumerate(self.acc)}  # the model's output order
        return sorted(out, key=lambda d: order[d["name"]])


@torch.no_grad()
def fidelity(work: nn.Module, original: nn.Module, data: Dataset, batch_size: int, to_dev, cache,
             *, where: str = "calibration"):
    """Fidelity of ``work`` against ``original`` on ``data``; ``cache``: the original's outputs
    per batch (:class:`OutputCache`'s ``tensors``) or None (the original is run).  ``where``:
    "calibration" (in-sample) or "held-out".  Returns ``(Fidelity, converted forward seconds)``."""
    n = agree = kl = sse = ssy = top5 = 0.0
    correct_o = correct_c = 0.0
    bad = 0.0  # samples whose original output is not finite: no meaningful comparison
    oob = 0.0  # labels outside the model's classes
    classifier = None
    primary = None
    fwd = 0.0
    errors = _OutputErrors()
    all_cached = getattr(cache, "outputs", None) if cache is not None else None
    # the calibration batches' memory cap (normswap.convert.bounded) applies here too
    owner = getattr(to_dev, "__self__", None)
    chunk = owner.chunk_size() if hasattr(owner, "chunk_size") else None
    for i, (x, y) in enumerate(data.batches(batch_size)):
        xb = to_dev(x)
        t0 = time.perf_counter()
        raw = _chunked(work, xb, chunk, where)
        fwd += time.perf_counter() - t0
        out = first_tensor(raw).float()
        named = named_outputs(raw)
        if primary is None:
            primary = _first_name(raw, named)
        if cache is not None and all_cached is not None:
            ref = cache[i].to(out.device).float()
            ref_named = dict(all_cached[i])
        elif cache is not None:
            ref = cache[i].to(out.device).float()
            ref_named = None
        else:
            raw_ref = _chunked(original, xb, chunk, where)
            ref = first_tensor(raw_ref).float()
            ref_named = dict(named_outputs(raw_ref))
        if classifier is None:
            classifier = is_classifier(ref)
        fin = torch.isfinite(ref.reshape(ref.shape[0], -1)).all(1) if ref.dim() else torch.isfinite(ref).reshape(1)
        if ref_named is None:  # only the first output cached: run the original for the others
            ref_named = dict(named_outputs(_chunked(original, xb, chunk, where))) if len(named) > 1 else {primary or "output": ref}
        for name, t in named:
            if name in ref_named:
                errors.add(name, t, ref_named[name], fin if ref.dim() else None)
        if not bool(fin.all()):
            bad += float((~fin).sum())
            out, ref = out[fin], ref[fin]
            y = y[fin.to(y.device)] if y is not None else None
        n += out.shape[0]
        sse += float(((out - ref) ** 2).sum())
        ssy += float((ref ** 2).sum())
        if classifier:
            agree += float((out.argmax(1) == ref.argmax(1)).sum())
            k = min(5, ref.shape[1])
            to, tr = out.topk(k, 1).indices, ref.topk(k, 1).indices
            top5 += float((to.unsqueeze(2) == tr.unsqueeze(1)).any(2).sum()) / k
            lp, lq = F.log_softmax(ref, 1), F.log_softmax(out, 1)
            kl += float((lp.exp() * (lp - lq)).sum())
            if y is not None:
                yb = y.to(out.device).reshape(-1)
                oob += float(((yb < 0) | (yb >= ref.shape[1])).sum())
                correct_o += float((ref.argmax(1) == yb).sum())
                correct_c += float((out.argmax(1) == yb).sum())
    n, agree, kl, sse, ssy, correct_o, correct_c, bad, oob, top5 = allreduce_floats(
        [n, agree, kl, sse, ssy, correct_o, correct_c, bad, oob, top5])
    fid = Fidelity(samples=int(n), classifier=bool(classifier), rel_output_error=_rel(sse, ssy) if n else None,
                   data=where, in_sample=(where == "calibration"), output=primary, outputs=errors.results())
    fid._nonfinite = int(bad)  # not a field: the caller turns it into a warning
    if classifier and n:
        fid.top1_agreement = agree / max(n, 1)
        fid.kl = max(0.0, kl / max(n, 1))  # a rounding artefact is never printed as -0.0000
        fid.top5_overlap = top5 / max(n, 1)
        fid._labels_out_of_range = int(oob)
        if data.labels is not None and not oob:
            fid.accuracy_original = correct_o / max(n, 1)
            fid.accuracy_converted = correct_c / max(n, 1)
            fid._classes = int(ref.shape[1])
    return fid, fwd


def chance_warning(fid, what: str) -> str | None:
    """A warning when the *original* model is no better than chance on labelled data (at most 1.5x
    1/classes, on 20 samples or more): the data is then most likely not read the way the model was
    trained, and every fidelity number is about the wrong inputs."""
    classes = getattr(fid, "_classes", 0)
    acc = fid.accuracy_original if fid is not None else None
    if acc is None or classes < 2 or fid.samples < 20 or acc > 1.5 / classes:
        return None
    return (f"the original model itself is at chance on the {what} ({100 * acc:.1f}% accuracy, {classes} classes): "
            "are the inputs read the way it was trained (--preprocess, --mean/--std, --image-size) and are "
            "these its labels?")


def heldout_fidelity(work: nn.Module, original: nn.Module, data: Dataset, batch_size: int, to_dev,
                     report) -> Fidelity:
    """Fidelity on held-out data (``eval_data`` / ``--eval``): stored in ``report.fidelity_eval``,
    with its warnings."""
    with eval_mode(original):
        was = work.training
        work.eval()
        try:
            fid, _ = fidelity(work, original, data, batch_size, to_dev, None, where="held-out")
        finally:
            work.train(was)
    report.fidelity_eval = fid
    report.eval_source = str(getattr(data, "source", "") or "eval data")
    if getattr(fid, "_labels_out_of_range", 0):
        report.warnings.append(f"{fid._labels_out_of_range} held-out labels are outside the model's output "
                               "classes: no held-out accuracy reported")
    chance = chance_warning(fid, "held-out data")
    if chance:
        report.warnings.append(chance)
    if getattr(fid, "_nonfinite", 0):
        report.warnings.append(f"the original model's output is not finite for {fid._nonfinite} held-out "
                               f"samples: held-out fidelity uses the other {fid.samples}")
    return fid
