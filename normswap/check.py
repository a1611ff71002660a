"""ONNX parity: run the PyTorch model and onnxruntime on the same inputs and compare.

``check(model, onnx_path)`` returns a :class:`ParityReport`; ``bool(report)`` is
True when parity holds.

Decisions (documented here and in ``normswap check --help``):

* **Criterion.** Per output, parity holds iff
  ``max|onnx - torch| <= atol + rtol * max|torch|`` (over all elements), and
  both sides have NaN/Inf at the same places.  The tolerance scales with the
  output's magnitude rather than with each element, because float rounding
  errors of a whole network scale with the size of the activations; an
  elementwise ``allclose`` would fail on outputs that merely cross zero.
  Defaults (fp32): ``atol=1e-4``, ``rtol=1e-3``.
* **Metrics.** max/mean absolute error, max relative error (``|a-b|/|ref|``
  over the elements with ``|ref| > atol``, so near-zero elements do not
  dominate), cosine similarity, and top-1 agreement for classifier-like outputs
  (2-D ``(N, K>1)``).
* **Two batch sizes.** The given batch (N samples) and a second size (1, or 3
  when N == 1) built from the same samples, which verifies the dynamic batch
  dimension.  If the ONNX batch dimension is static, the report says so and
  only that size is used.
* **Providers.** ``cpu`` (CPUExecutionProvider) and ``cuda``
  (CUDAExecutionProvider with ``use_tf32=0``; compared against PyTorch on the
  GPU, TF32 off, when ``torch.cuda.is_available()``).  A provider that is not
  installed (plain ``onnxruntime`` has no CUDA provider) or that silently fell
  back to CPU (``onnxruntime-gpu`` without a usable GPU; detected from
  ``session.get_providers()``) is reported ``unavailable`` with the reason and
  never as passed.  An unavailable provider does not fail the check, but a
  check in which *no* requested provider ran fails (``bool`` False, CLI exit
  1): ``--providers cuda`` on a machine without CUDA proves nothing.
* **Latency.** Median over ``repeats`` runs (default 20) after ``warmup`` runs,
  at the first batch size, for PyTorch on each device and for each provider.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from normswap.errors import NormswapError
from normswap.inputs import normalize_inputs
from normswap.ort import (PROVIDER_NAMES, PROVIDER_OPTIONS, ProviderSpec, fallback_reason, no_tf32,
                          parse_providers, provider_spec, unavailable_reason)
from normswap.ort import session as _session
from normswap.onnx_utils import eval_mode, exception_reason, flatten_outputs, no_cache, onnx_io, torch_module
from normswap.report import Report

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
DEFAULT_REPEATS = 20
DEFAULT_WARMUP = 3
#: at most this many samples of a dataset are used as the first batch
MAX_SAMPLES = 64
CRITERION = "max|onnx - torch| <= atol + rtol * max|torch| per output (NaN/Inf must match)"

# --------------------------------------------------------------------------- report types


@dataclass
class OutputParity:
    name: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    top1_agreement: float | None
    tolerance: float
    passed: bool
    reason: str | None = None


@dataclass
class BatchParity:
    batch_size: int
    outputs: list[OutputParity]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "passed": self.passed,
            "outputs": [dataclasses.asdict(o) for o in self.outputs],
        }


@dataclass
class ProviderResult:
    label: str
    provider: str
    ran: str | None  # the provider onnxruntime actually used (session.get_providers()[0])
    status: str  # "passed" | "failed" | "unavailable" | "error"
    reason: str | None = None
    torch_device: str | None = None
    batches: list[BatchParity] = field(default_factory=list)
    latency_ms: float | None = None
    torch_latency_ms: float | None = None

    @property
    def max_abs(self) -> float | None:
        vals = [o.max_abs for b in self.batches for o in b.outputs]
        return max(vals) if vals else None

    def to_dict(self) -> dict:
        from normswap.report import jsonable

        return {
            "label": self.label,
            "provider": self.provider,
            "ran": self.ran,
            "status": self.status,
            "reason": self.reason,
            "torch_device": self.torch_device,
            "max_abs": self.max_abs,
            "latency_ms": self.latency_ms,
            "torch_latency_ms": self.torch_latency_ms,
            "batches": [jsonable(b.to_dict()) for b in self.batches],
        }


@dataclass
class ParityReport(Report):
    """ONNX vs PyTorch parity per provider, batch size and output."""

    job = "check"

    onnx_path: str
    atol: float
    rtol: float
    criterion: str
    inputs: list[dict]
    batch_sizes: list[int]
    dynamic_batch: bool
    providers: list[ProviderResult]
    notes: list[str] = field(default_factory=list)
    #: the notes that are warnings (a static ONNX batch, no provider ran): shown highlighted
    warning_notes: list[str] = field(default_factory=list, repr=False)
    #: with ``locate=True``: the per-layer divergence (:class:`normswap.locate.LocateResult`)
    locate: Any = None

    @property
    def passed(self) -> bool:
        ran = [p for p in self.providers if p.status != "unavailable"]
        return bool(ran) and all(p.status == "passed" for p in ran)

    def provider(self, label: str) -> ProviderResult | None:
        return next((p for p in self.providers if p.label == label), None)

    def to_dict(self) -> dict:
        from normswap.report import jsonable

        return {
            "job": self.job,
            "passed": self.passed,
            "onnx_path": self.onnx_path,
            "atol": self.atol,
            "rtol": self.rtol,
            "criterion": self.criterion,
            "inputs": jsonable(self.inputs),
            "batch_sizes": self.batch_sizes,
            "dynamic_batch": self.dynamic_batch,
            "providers": [jsonable(p.to_dict()) for p in self.providers],
            "notes": list(self.notes),
            "load": getattr(self, "load", None),
            "locate": self.locate.to_dict() if self.locate is not None else None,
        }

    def summary_text(self) -> str:
        parts = []
        for p in self.providers:
            if p.status in ("passed", "failed") and p.max_abs is not None:
                parts.append(f"{p.label} {p.status} (max abs err {p.max_abs:.2g})")
            else:
                parts.append(f"{p.label} {p.status}")
        if not any(p.status != "unavailable" for p in self.providers):
            parts.append("no requested provider ran")
        sizes = ", ".join(str(b) for b in self.batch_sizes)
        text = f"{Path(self.onnx_path).name}: " + ", ".join(parts) + f" | batch {sizes}"
        if self.locate is not None:
            first = getattr(self.locate, "first_divergent", None)
            text += (f" | diverges first at {first.name}" if first is not None else " | no layer diverges")
        return text


# --------------------------------------------------------------------------- metrics


def compare_arrays(name: str, ref, got, atol: float, rtol: float) -> OutputParity:
    """Compare one output (numpy arrays): PyTorch ``ref`` vs onnxruntime ``got``."""
    import numpy as np

    ref = np.asarray(ref)
    got = np.asarray(got)
    shape = list(ref.shape)
    if ref.shape != got.shape:
        return OutputParity(
            name, shape, float("inf"), float("inf"), float("inf"), 0.0, None, 0.0, False,
            f"shape mismatch: torch {tuple(ref.shape)} vs onnx {tuple(got.shape)}",
        )
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    fin_r, fin_g = np.isfinite(r), np.isfinite(g)
    reason = None
    nonfinite_ok = bool(np.array_equal(fin_r, fin_g))
    if nonfinite_ok:  # same places; each one the same value (NaN matches NaN, +Inf matches +Inf)
        nr_, ng_ = r[~fin_r], g[~fin_g]
        nonfinite_ok = bool(np.all((nr_ == ng_) | (np.isnan(nr_) & np.isnan(ng_))))
    if not nonfinite_ok:
        reason = "NaN/Inf at different places"
    elif r.size and not fin_r.any():
        # nothing was compared: an all-NaN/Inf output "matching" says nothing about parity
        nonfinite_ok = False
        reason = "no finite values to compare: the PyTorch output is all NaN/Inf"
    mask = fin_r & fin_g
    rf, gf = r[mask], g[mask]
    if rf.size:
        diff = np.abs(rf - gf)
        max_abs = float(diff.max())
        mean_abs = float(diff.mean())
        ref_max = float(np.abs(rf).max())
        big = np.abs(rf) > atol
        max_rel = float((diff[big] / np.abs(rf[big])).max()) if big.any() else 0.0
        nr, ng = float(np.linalg.norm(rf)), float(np.linalg.norm(gf))
        if nr == 0.0 and ng == 0.0:
            cosine = 1.0
        elif nr == 0.0 or ng == 0.0:
            cosine = 0.0
        else:
            cosine = float(np.dot(rf.ravel(), gf.ravel()) / (nr * ng))
    elif r.size:  # no finite element on either side: nothing was measured
        max_abs = mean_abs = max_rel = cosine = float("nan")
        ref_max = 0.0
    else:
        max_abs = mean_abs = max_rel = ref_max = 0.0
        cosine = 1.0
    tol = atol + rtol * ref_max
    top1 = None
    if rf.size and ref.ndim == 2 and ref.shape[1] > 1 and ref.shape[0] > 0 and np.issubdtype(ref.dtype, np.floating):
        top1 = float(np.mean(np.argmax(r, axis=1) == np.argmax(g, axis=1)))
    passed = nonfinite_ok and max_abs <= tol
    if reason is None and not passed:
        reason = f"max abs error {max_abs:.3g} > tolerance {tol:.3g}"
    return OutputParity(name, shape, max_abs, mean_abs, max_rel, cosine, top1, tol, passed, reason)


# --------------------------------------------------------------------------- providers


def _median_ms(fn, repeats: int, warmup: int, sync=None) -> float | None:
    if repeats <= 0:
        return None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t) * 1e3)
    return float(statistics.median(times))


class _TorchRunner:
    """Runs the PyTorch model per device (a copy on the GPU), caching reference outputs."""

    def __init__(self, model):
        self.model = model
        self.copies: dict[str, Any] = {"cpu": model}
        self.cache: dict[tuple[str, int], list] = {}
        self.latency: dict[str, float | None] = {}
        self.notes: list[str] = []

    def device_for(self, wanted: str) -> str:
        import torch

        if wanted == "cuda" and not torch.cuda.is_available():
            note = "torch has no CUDA device: the CUDA provider is compared against PyTorch on the CPU"
            if note not in self.notes:
                self.notes.append(note)
            return "cpu"
        return wanted

    def _module(self, device: str):
        if device not in self.copies:
            self.copies[device] = copy.deepcopy(self.model).to(device).eval()
        return self.copies[device]

    def _call(self, device: str, inputs: tuple):
        import torch

        m = self._module(device)
        args = tuple(t.to(device) for t in inputs)
        ctx = no_tf32() if device.startswith("cuda") else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return flatten_outputs(m(*args))

    def outputs(self, device: str, index: int, inputs: tuple) -> list:
        key = (device, index)
        if key not in self.cache:
            try:
                outs = self._call(device, inputs)
            except NormswapError:
                raise
            except Exception as e:  # noqa: BLE001
                raise NormswapError(
                    f"the PyTorch model does not run on the check inputs "
                    f"(shapes {[tuple(t.shape) for t in inputs]}): {exception_reason(e, 300)}"
                ) from e
            self.cache[key] = [o.detach().float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in outs]
        return self.cache[key]

    def latency_ms(self, device: str, inputs: tuple, repeats: int, warmup: int) -> float | None:
        import torch

        if device not in self.latency:
            sync = torch.cuda.synchronize if device.startswith("cuda") else None
            self.latency[device] = _median_ms(lambda: self._call(device, inputs), repeats, warmup, sync)
        return self.latency[device]


def compare_provider(
    onnx_path: str,
    spec: ProviderSpec,
    batches: list[tuple[dict, tuple]],
    runner: _TorchRunner,
    *,
    atol: float,
    rtol: float,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
) -> ProviderResult:
    """Check one provider: ``batches`` are (onnx feeds, torch inputs) pairs, one per batch size.

    The provider that actually ran is read from ``session.get_providers()[0]``;
    if it is not ``spec.provider`` the result is ``unavailable`` (silent fallback).
    """
    result = ProviderResult(spec.label, spec.provider, None, "unavailable")
    reason = unavailable_reason(spec)
    if reason:
        result.reason = reason
        return result
    try:
        sess = _session(onnx_path, spec)
    except Exception as e:  # noqa: BLE001
        # an accelerator that cannot start (no device, missing libraries) is unavailable;
        # a model that the CPU provider cannot load is an error
        result.status = "error" if spec.provider == "CPUExecutionProvider" else "unavailable"
        result.reason = f"onnxruntime could not build a {spec.provider} session: {exception_reason(e, 300)}"
        return result
    session_providers = sess.get_providers()
    result.ran = session_providers[0] if session_providers else None
    reason = fallback_reason(spec, session_providers)
    if reason:
        result.reason = reason
        return result
    device = runner.device_for(spec.torch_device)
    result.torch_device = device
    names = [o.name for o in sess.get_outputs()]
    for i, (feeds, tin) in enumerate(batches):
        bs = int(tin[0].shape[0]) if tin[0].dim() else 1
        try:
            got = sess.run(None, feeds)
        except Exception as e:  # noqa: BLE001
            result.status = "error"
            result.reason = f"onnxruntime failed at batch size {bs}: {exception_reason(e, 300)}"
            return result
        ref = runner.outputs(device, i, tin)
        if len(ref) != len(got):
            raise NormswapError(
                f"the ONNX file has {len(got)} output(s) ({', '.join(names)}) but the model returns {len(ref)} tensor(s); "
                "was it exported from this model?"
            )
        result.batches.append(
            BatchParity(bs, [compare_arrays(n, r, g, atol, rtol) for n, r, g in zip(names, ref, got)])
        )
    result.status = "passed" if all(b.passed for b in result.batches) else "failed"
    if result.status == "failed":
        bad = next(o for b in result.batches for o in b.outputs if not o.passed)
        bsz = next(b.batch_size for b in result.batches if not b.passed)
        result.reason = f"output {bad.name} at batch size {bsz}: {bad.reason}"
    feeds0, tin0 = batches[0]
    result.latency_ms = _median_ms(lambda: sess.run(None, feeds0), repeats, warmup)
    result.torch_latency_ms = runner.latency_ms(device, tin0, repeats, warmup)
    return result


# --------------------------------------------------------------------------- inputs


def _onnx_meta(onnx_path) -> tuple[str, list[dict]]:
    import onnx

    path = Path(onnx_path)
    if not path.exists():
        raise NormswapError(f"ONNX file not found: {path}")
    if path.is_dir():
        raise NormswapError(f"{path} is a folder, not an ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise NormswapError(f"{path} is not an ONNX model (cannot parse it: {type(e).__name__})") from e
    if not proto.graph.node and not proto.graph.output:
        raise NormswapError(f"{path} is not an ONNX model (no graph found)")
    inputs, _ = onnx_io(proto)
    return str(path), inputs


_FLOAT = {"float32", "float16", "float64", "bfloat16"}


def _torch_dtype(name: str):
    import torch

    return {
        "float32": torch.float32, "float16": torch.float16, "float64": torch.float64,
        "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
        "uint8": torch.uint8, "bool": torch.bool,
    }.get(name)


def _resize_batch(t, n: int):
    import torch

    if t.shape[0] >= n:
        return t[:n]
    reps = -(-n // t.shape[0])
    return torch.cat([t] * reps, 0)[:n]


def _synth_inputs(meta: list[dict], input_shape, batch: int):
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for i, m in enumerate(meta):
        if i == 0 and input_shape is not None:
            shape = tuple(input_shape)
        else:
            shape = []
            for j, d in enumerate(m["shape"]):
                if isinstance(d, int):
                    shape.append(d)
                elif j == 0:
                    shape.append(batch)
                else:
                    raise NormswapError(
                        f"ONNX input {m['name']} has a symbolic dimension {d!r} at axis {j}; "
                        "pass inputs (--calib DATA) or --input-shape"
                    )
            shape = tuple(shape)
        from normswap.shapes import check_shape_size

        check_shape_size(shape, what=f"ONNX input {m['name']} shape" if not (i == 0 and input_shape is not None)
                         else "--input-shape")
        dt = m["dtype"]
        if dt in _FLOAT:
            out.append(torch.randn(shape, generator=g))
        elif _torch_dtype(dt) is not None:
            out.append(torch.zeros(shape, dtype=_torch_dtype(dt)))
        else:
            raise NormswapError(f"ONNX input {m['name']} has unsupported type {dt}; pass inputs explicitly")
    return tuple(out)


def _validate(meta: list[dict], tensors: tuple) -> None:
    names = ", ".join(f"{m['name']} {m['shape']}" for m in meta)
    if len(tensors) != len(meta):
        raise NormswapError(
            f"the ONNX file expects {len(meta)} input(s) ({names}) but {len(tensors)} were given; "
            "pass one tensor per model input, in order"
        )
    for m, t in zip(meta, tensors):
        shape = m["shape"]
        if len(shape) != t.dim():
            raise NormswapError(
                f"ONNX input {m['name']} has rank {len(shape)} (shape {shape}) but the given tensor has shape "
                f"{tuple(t.shape)}; check --input-shape / the data, or that the file belongs to this model"
            )
        for j, d in enumerate(shape):
            if j == 0:
                continue
            if isinstance(d, int) and d != t.shape[j]:
                raise NormswapError(
                    f"ONNX input {m['name']} needs shape {shape} but the given tensor has shape {tuple(t.shape)} "
                    f"(axis {j}: {d} vs {t.shape[j]}); was the file exported from this model?"
                )
        if m["dtype"] not in _FLOAT and t.is_floating_point() and _torch_dtype(m["dtype"]) is not None:
            raise NormswapError(
                f"ONNX input {m['name']} is {m['dtype']} but a floating-point tensor was given"
            )


def _as_tensors(inputs) -> tuple:
    if hasattr(inputs, "inputs") and hasattr(inputs, "source"):  # normswap.data.Dataset
        inputs = inputs.inputs[:MAX_SAMPLES]
    return normalize_inputs(inputs)


def _feeds(meta: list[dict], tensors: tuple) -> dict:
    import numpy as np

    feeds = {}
    for m, t in zip(meta, tensors):
        arr = t.detach().cpu().numpy()
        target = np.dtype(m["dtype"]) if m["dtype"] not in ("unknown", "bfloat16") else arr.dtype
        feeds[m["name"]] = arr.astype(target, copy=False)
    return feeds


def _second_batch(n: int) -> int:
    return 1 if n > 1 else 3


# --------------------------------------------------------------------------- main entry point


def check(
    model,
    onnx_path,
    inputs=None,
    *,
    providers: str | Sequence[str] = ("cpu", "cuda"),
    atol: float | None = None,
    rtol: float | None = None,
    input_shape=None,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    locate: bool = False,
) -> ParityReport:
    """Compare ``model`` (run in eval mode) with the ONNX file under onnxruntime.

    ``locate=True`` also maps the ONNX tensors back to the model's layers and reports, per
    layer, the accumulated error and the layer's *own* error (its ONNX subgraph fed with
    PyTorch's input activation), naming the first layer whose own error exceeds the tolerance
    (:func:`normswap.locate.locate`; ``report.locate``).

    ``inputs``: a tensor, a tuple of tensors (one per model input, in order), a
    ``normswap.data.Dataset`` or None (random inputs shaped like the ONNX
    inputs; ``input_shape`` gives the first input's shape).  ``providers``:
    labels ("cpu", "cuda") or ``ProviderSpec`` objects.  See the module docstring
    for the criterion and the provider rules.
    """
    import torch

    atol = DEFAULT_ATOL if atol is None else float(atol)
    rtol = DEFAULT_RTOL if rtol is None else float(rtol)
    if not (0 <= atol < float("inf") and 0 <= rtol < float("inf")):  # also refuses NaN
        raise NormswapError(f"atol and rtol must be finite numbers >= 0 (got atol {atol:g}, rtol {rtol:g})")
    specs = parse_providers(providers)
    model = torch_module(model)
    path, meta = _onnx_meta(onnx_path)
    if input_shape is not None and not isinstance(input_shape, (tuple, list)):
        from normswap.data import parse_shape

        input_shape = parse_shape(input_shape)

    if inputs is not None and input_shape is not None:
        raise NormswapError("give either inputs (--calib) or input_shape (--input-shape), not both")
    notes: list[str] = []
    first_dim = meta[0]["shape"][0] if meta and meta[0]["shape"] else None
    static_batch = isinstance(first_dim, int)
    if inputs is None:
        batch = input_shape[0] if input_shape is not None else (first_dim if static_batch else 2)
        tensors = _synth_inputs(meta, input_shape, batch)
        notes.append(f"random inputs (seed 0) of shape {tuple(input_shape)}" if input_shape is not None
                     else "random inputs (seed 0) shaped like the ONNX inputs")
    else:
        tensors = _as_tensors(inputs)
    _validate(meta, tensors)

    n = int(tensors[0].shape[0]) if tensors[0].dim() else 1
    batched = [
        t.dim() >= 1 and t.shape[0] == n and m["shape"] and not (isinstance(m["shape"][0], int) and m["shape"][0] != n)
        for m, t in zip(meta, tensors)
    ]
    warning_notes: list[str] = []
    if static_batch:
        sizes = [first_dim]
        warning_notes.append(f"the ONNX batch dimension is static ({first_dim}); only that batch size is checked")
        notes.append(warning_notes[-1])
        batched = [t.dim() >= 1 and t.shape[0] == n for t in tensors]
    elif tensors[0].dim() == 0:
        sizes = [1]
        batched = [False] * len(tensors)
    else:
        sizes = [n, _second_batch(n)]
    batches = []
    for size in sizes:
        tin = tuple(_resize_batch(t, size) if b else t for t, b in zip(tensors, batched))
        for m, t in zip(meta, tin):
            d0 = m["shape"][0] if m["shape"] else None
            if isinstance(d0, int) and t.dim() and t.shape[0] != d0:
                raise NormswapError(
                    f"ONNX input {m['name']} needs shape {m['shape']} but the given tensor has shape {tuple(t.shape)}"
                )
        batches.append((_feeds(meta, tin), tin))

    if any(m.training for m in model.modules()) and not isinstance(model, torch.fx.GraphModule):
        notes.append("the model was in training mode; it is compared in eval mode (its modes are restored after)")
    results = []
    with no_cache(model, notes), eval_mode(model, True):
        runner = _TorchRunner(model)
        for spec in specs:
            results.append(compare_provider(path, spec, batches, runner, atol=atol, rtol=rtol, repeats=repeats, warmup=warmup))
        located = None
        if locate:
            from normswap.locate import locate as _locate

            ran = [r.label for r in results if r.status != "unavailable"] or [s.label for s in specs]
            located = _locate(model, path, batches[0][1], providers=ran, atol=atol, rtol=rtol)
    notes.extend(runner.notes)
    if not any(r.status != "unavailable" for r in results):
        warning_notes.append(
            "no requested provider could run, so parity was not established: "
            + "; ".join(f"{r.label}: {r.reason}" for r in results)
        )
        notes.append(warning_notes[-1])
    del runner
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    return ParityReport(
        onnx_path=path,
        atol=atol,
        rtol=rtol,
        criterion=CRITERION,
        inputs=[
            {"name": m["name"], "onnx_shape": m["shape"], "dtype": m["dtype"], "given_shape": list(t.shape)}
            for m, t in zip(meta, tensors)
        ],
        batch_sizes=[int(s) for s in sizes],
        dynamic_batch=not static_batch,
        providers=results,
        notes=notes,
        warning_notes=warning_notes,
        locate=located,
    )


def check_file(
    model_path,
    onnx_path,
    *,
    providers: str | Sequence[str] = ("cpu", "cuda"),
    atol: float | None = None,
    rtol: float | None = None,
    data=None,
    input_shape=None,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    locate: bool = False,
    arch: str | None = None,
    arch_kwargs=None,
    trust: bool = False,
    imports=(),
) -> ParityReport:
    """The job behind ``normswap check``: load MODEL and :func:`check` it against ``onnx_path``.

    Inputs: the first :data:`MAX_SAMPLES` samples of ``data`` ('random': ``N`` of
    ``input_shape``; with a path, ``input_shape`` says how to read an image folder and is
    checked against the data), else random inputs shaped like the ONNX inputs (the first one
    ``input_shape`` when given); see :func:`normswap.inputs.resolve_inputs`.
    """
    from normswap.inputs import resolve_inputs
    from normswap.io import load_model

    if repeats < 0:
        raise NormswapError("--repeats must be >= 0")
    loaded = load_model(model_path, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports)
    resolved = resolve_inputs(input_shape=input_shape, data=data, limit=MAX_SAMPLES, data_option="--calib",
                              example=False)
    from normswap.report import attach_load

    if resolved.data is not None:  # the data set is the inputs; its shape was only for reading it
        report = check(loaded, onnx_path, resolved.data, providers=providers, atol=atol, rtol=rtol,
                       repeats=repeats, warmup=warmup, locate=locate)
    else:
        report = check(loaded, onnx_path, None, providers=providers, atol=atol, rtol=rtol,
                       input_shape=resolved.shape, repeats=repeats, warmup=warmup, locate=locate)
    attach_load(report, loaded)
    for n in report.notes:
        if n in (loaded.notes or []) and n not in report.warning_notes:
            report.warning_notes.append(n)
    return report


__all__ = [
    "check_file",
    "MAX_SAMPLES",
    "check",
    "ParityReport",
    "ProviderResult",
    "ProviderSpec",
    "OutputParity",
    "BatchParity",
    "compare_arrays",
    "compare_provider",
    "provider_spec",
    "parse_providers",
    "unavailable_reason",
    "fallback_reason",
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "CRITERION",
]
