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
import statistics
import time

from typing import Any, Sequence

from normswap.errors import NormswapError
from normswap.ort import (PROVIDER_NAMES, PROVIDER_OPTIONS, ProviderSpec,  # noqa: F401  (re-exported)
                          fallback_reason, no_tf32,
                          parse_providers, provider_spec, unavailable_reason)
from normswap.ort import session as _session
from normswap.onnx_utils import eval_mode, exception_reason, flatten_outputs, no_cache, torch_module
from normswap.check_inputs import (MAX_SAMPLES, as_tensors, batches_of, given_or_random, onnx_meta,  # noqa: F401
                                   program_batch_sizes)
from normswap.check_report import (BatchParity, OutputParity, ParityReport, ProviderResult,  # noqa: F401
                                   compare_arrays)

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
DEFAULT_REPEATS = 20
DEFAULT_WARMUP = 3
CRITERION = "max|onnx - torch| <= atol + rtol * max|torch| per output (NaN/Inf must match)"

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


def _run(model, path: str, specs, batches, notes: list[str], *, atol, rtol, repeats, warmup, locate):
    """Each provider's parity (and the layer map with ``locate``), the model in eval mode."""
    import torch

    if any(m.training for m in model.modules()) and not isinstance(model, torch.fx.GraphModule):
        notes.append("the model was in training mode; it is compared in eval mode (its modes are restored after)")
    results = []
    located = None
    with no_cache(model, notes), eval_mode(model, True):
        runner = _TorchRunner(model)
        for spec in specs:
            results.append(compare_provider(path, spec, batches, runner, atol=atol, rtol=rtol, repeats=repeats,
                                            warmup=warmup))
        if locate:
            from normswap.locate import locate as _locate

            ran = [r.label for r in results if r.status != "unavailable"] or [s.label for s in specs]
            located = _locate(model, path, batches[0][1], providers=ran, atol=atol, rtol=rtol)
    notes.extend(runner.notes)
    del runner
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results, located


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

    atol = DEFAULT_ATOL if atol is None else float(atol)
    rtol = DEFAULT_RTOL if rtol is None else float(rtol)
    if not (0 <= atol < float("inf") and 0 <= rtol < float("inf")):  # also refuses NaN
        raise NormswapError(f"atol and rtol must be finite numbers >= 0 (got atol {atol:g}, rtol {rtol:g})")
    specs = parse_providers(providers)
    accepted = program_batch_sizes(torch_module(model, keep_program=True))
    model = torch_module(model)
    path, meta = onnx_meta(onnx_path)
    if input_shape is not None and not isinstance(input_shape, (tuple, list)):
        from normswap.data import parse_shape

        input_shape = parse_shape(input_shape)

    if inputs is not None and input_shape is not None:
        raise NormswapError("give either inputs (--data) or input_shape (--input-shape), not both")
    notes: list[str] = []
    warning_notes: list[str] = []
    tensors, static_batch = given_or_random(meta, inputs, input_shape, notes)
    sizes, batches = batches_of(meta, tensors, static_batch, notes, warning_notes, accepted)
    results, located = _run(model, path, specs, batches, notes, atol=atol, rtol=rtol, repeats=repeats,
                            warmup=warmup, locate=locate)
    if not any(r.status != "unavailable" for r in results):
        warning_notes.append(
            "no requested provider could run, so parity was not established: "
            + "; ".join(f"{r.label}: {r.reason}" for r in results)
        )
        notes.append(warning_notes[-1])
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
    preprocess=None,
) -> ParityReport:
    """The job behind ``normswap check``: load MODEL and :func:`check` it against ``onnx_path``.

    Inputs: the first :data:`MAX_SAMPLES` samples of ``data`` ('random': ``N`` of
    ``input_shape``; with a path, ``input_shape`` says how to read an image folder and is
    checked against the data), else random inputs shaped like the ONNX inputs (the first one
    ``input_shape`` when given); see :func:`normswap.inputs.resolve_inputs`.  ``preprocess``:
    how an image folder is read (see :mod:`normswap.preprocess`).
    """
    from normswap.inputs import resolve_inputs
    from normswap.io import load_model

    if repeats < 0:
        raise NormswapError("--repeats must be >= 0")
    loaded = load_model(model_path, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports)
    resolved = resolve_inputs(loaded.module, input_shape=input_shape, data=data, limit=MAX_SAMPLES,
                              data_option="--data", example=False, preprocess=preprocess)
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
