"""The one onnxruntime layer: provider specs, sessions (TF32 off on CUDA, CPU only as the
fallback for nodes an accelerator does not take), CPU-fallback detection, and TF32 off for the
PyTorch reference.  ``check``, ``locate`` and ``export`` build their sessions here.

Facts (shared/REFERENCE.md): plain ``onnxruntime`` offers only CPU; ``onnxruntime-gpu`` lists
CUDA even without a GPU and then silently builds a CPU session (``session.get_providers()[0]``
shows it); the CUDA provider uses TF32 unless ``use_tf32=0``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

from normswap.errors import NormswapError

__all__ = ["PROVIDER_NAMES", "PROVIDER_OPTIONS", "ProviderSpec", "provider_spec", "parse_providers",
           "unavailable_reason", "fallback_reason", "session", "probe", "no_tf32", "short_error"]

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}
PROVIDER_OPTIONS = {
    "CUDAExecutionProvider": {"use_tf32": "0"},
}


@dataclass
class ProviderSpec:
    """What to run: ``label`` as shown ("cpu", "cuda"), the onnxruntime provider that
    must actually run, its options, and the device of the PyTorch reference."""

    label: str
    provider: str
    options: dict = field(default_factory=dict)
    torch_device: str = "cpu"


def provider_spec(label) -> ProviderSpec:
    """ProviderSpec for "cpu", "cuda", a full onnxruntime provider name (or a ProviderSpec)."""
    if isinstance(label, ProviderSpec):
        return label
    key = str(label).strip()
    provider = PROVIDER_NAMES.get(key.lower(), key)
    if provider not in PROVIDER_NAMES.values() and not provider.endswith("ExecutionProvider"):
        raise NormswapError(f"unknown provider {label!r}; use cpu, cuda or an onnxruntime provider name")
    short = next((k for k, v in PROVIDER_NAMES.items() if v == provider), provider)
    device = "cuda" if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
    return ProviderSpec(short, provider, dict(PROVIDER_OPTIONS.get(provider, {})), device)


def parse_providers(providers: str | Sequence, *, hint: str = "use e.g. --providers cpu,cuda") -> list[ProviderSpec]:
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    specs: list[ProviderSpec] = []
    for p in providers:
        spec = provider_spec(p)
        if spec.label not in [s.label for s in specs]:
            specs.append(spec)
    if not specs:
        raise NormswapError(f"no providers given; {hint}")
    return specs


def unavailable_reason(spec: ProviderSpec) -> str | None:
    """Why ``spec`` cannot run in this onnxruntime build (None if it is listed)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if spec.provider in available:
        return None
    hint = ""
    if spec.provider == "CUDAExecutionProvider":
        hint = "; the plain 'onnxruntime' package is CPU-only, install 'onnxruntime-gpu' (normswap[gpu])"
    return f"not installed: onnxruntime {ort.__version__} offers only {', '.join(available)}{hint}"


def fallback_reason(spec: ProviderSpec, session_providers: Sequence[str]) -> str | None:
    """Why the session did not get ``spec.provider`` (None if it did)."""
    ran = session_providers[0] if session_providers else None
    if ran == spec.provider:
        return None
    return (f"fell back to {ran}: onnxruntime lists {spec.provider} but could not use it "
            "(no GPU, or CUDA/cuDNN libraries missing)")


def session(model, spec: ProviderSpec):
    """An InferenceSession for a path or serialized model bytes on ``spec`` (CPU as the fallback
    for the nodes an accelerator does not take)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    providers: list[Any] = [(spec.provider, spec.options) if spec.options else spec.provider]
    if spec.provider != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    return ort.InferenceSession(model, sess_options=so, providers=providers)


def probe(spec: ProviderSpec, onnx_path: str) -> str | None:
    """None if ``spec`` really runs here (a session is built on the ONNX file), else why not."""
    r = unavailable_reason(spec)
    if r:
        return r
    try:
        sess = session(onnx_path, spec)
    except Exception as e:  # noqa: BLE001
        return f"onnxruntime could not build a {spec.provider} session: {short_error(e)}"
    return fallback_reason(spec, sess.get_providers())


def short_error(e: BaseException, limit: int = 300) -> str:
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def no_tf32():
    """TF32 off (cuDNN and matmul) for the duration: the PyTorch reference of a CUDA parity check."""
    import torch

    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cuda.matmul.allow_tf32 = matmul
