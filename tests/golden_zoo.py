"""The samples zoo in three front ends, and the reports the golden tests pin.

``python -m tests.golden_zoo`` (from the repository root) rewrites ``tests/golden/*.json``;
``tests/test_golden.py`` compares the live reports with them.  A report is normalised before it
is compared: timings, file paths and memory addresses are dropped, floats rounded.

Front ends: ``eager`` (the ``nn.Module``), ``torchscript`` (``torch.jit.trace``; skipped where
tracing fails) and ``export`` (``torch.export.export(strict=False)``; skipped where it fails).
Jobs: ``audit`` (with the example inputs for the eager model), ``fold`` (with the example
inputs; a compiled front end the fold refuses records the error message) and, for the eager
models of ``samples/models.py``, ``export`` (ONNX, the report only).
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def zoo() -> dict:
    """name -> factory returning (model, example inputs tuple)."""
    from samples import hf_like, timm_like
    from samples.models import ALL_SAMPLES

    out = dict(ALL_SAMPLES)
    for name in ("timm_bnact_net", "conv2dsame_net", "frn_act_net", "evonorm_net", "stdconv_net",
                 "convnext_block"):
        out[f"timm_like.{name}"] = getattr(timm_like, name)

    def hf(cls, **kw):
        def make():
            return cls(**kw).eval(), (hf_like.example_ids(),)
        return make

    out["hf_like.bert"] = hf(hf_like.BertLikeModel)
    out["hf_like.gpt2"] = hf(hf_like.GPT2LikeLMHeadModel)
    out["hf_like.llama"] = hf(hf_like.LlamaLikeModel)
    out["hf_like.gemma"] = hf(hf_like.LlamaLikeModel, gemma_norm=True)
    return out


_HEX = re.compile(r"0x[0-9a-f]{6,}")
_SECONDS = re.compile(r"\b\d+\.\d+ ?s\b")
_TMP = re.compile(r"/tmp/[^\s'\"]*")


def normalise(obj):
    """Timings, paths, addresses and file sizes (an ONNX file embeds its staged name) dropped; floats
    rounded (7 significant digits)."""
    if isinstance(obj, dict):
        return {k: normalise(v) for k, v in obj.items()
                if k not in ("seconds", "elapsed", "time_s", "path", "timings", "file_size") and not k.endswith("_seconds")}
    if isinstance(obj, (list, tuple)):
        return [normalise(v) for v in obj]
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            return str(obj)
        return float(f"{obj:.6g}")
    if isinstance(obj, str):
        s = _HEX.sub("0x?", obj)
        s = _SECONDS.sub("? s", s)
        return _TMP.sub("<tmp>", s)
    return obj


def front_ends(model, inputs):
    """(name, object) for the front ends the model supports (with the failure of the others)."""
    import torch

    yield "eager", model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ts = torch.jit.trace(model, inputs, check_trace=False, strict=False)
        except Exception as e:  # noqa: BLE001
            ts = f"torch.jit.trace failed: {type(e).__name__}"
    yield "torchscript", ts
    try:
        ep = torch.export.export(model, inputs, strict=False)
    except Exception as e:  # noqa: BLE001
        ep = f"torch.export failed: {type(e).__name__}"
    yield "export", ep


def _job(fn):
    from normswap.errors import NormswapError

    try:
        return normalise(fn().to_dict())
    except NormswapError as e:
        return {"error": normalise(str(e))}


def reports(name: str, factory, *, onnx: bool = True) -> dict:
    """The pinned reports of one zoo entry: {front end: {job: report dict}}."""
    import copy
    import tempfile

    import torch

    import normswap

    torch.manual_seed(0)
    model, inputs = factory()
    out: dict = {}
    for fe, obj in front_ends(model, inputs):
        if isinstance(obj, str):
            out[fe] = {"unavailable": obj}
            continue
        rec: dict = {}
        rec["audit"] = _job(lambda: normswap.audit(obj, inputs if fe == "eager" else None))
        target = copy.deepcopy(obj) if fe == "eager" else obj
        rec["fold"] = _job(lambda: normswap.fold(target, inputs)[1])
        if fe == "eager" and onnx:
            with tempfile.TemporaryDirectory() as d:
                rec["export"] = _job(lambda: normswap.export(copy.deepcopy(model), f"{d}/m.onnx", inputs))
        out[fe] = rec
    return out


def golden_path(name: str) -> Path:
    return GOLDEN / f"{name}.json"


def onnx_for(name: str) -> bool:
    return "." not in name  # samples/models.py only (the library-like ones are pinned by audit/fold)


def main(argv=None) -> int:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    names = list(argv or sys.argv[1:]) or list(zoo())
    GOLDEN.mkdir(exist_ok=True)
    z = zoo()
    for name in names:
        rec = reports(name, z[name], onnx=onnx_for(name))
        golden_path(name).write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        print("wrote", golden_path(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
