"""Export a sample model and check ONNX parity on CPU and CUDA; print the report as JSON.

Prepared to run on a GPU machine (needs ``onnxruntime-gpu`` and a CUDA build of
torch; it trains nothing)::

    python benchmarks/gpu_check.py [--out DIR] [--samples 64]

Model: the trained digits sample (``samples/digits/digits_resnet.pt`` built with
``samples.digits:digits_resnet``) when present, else ``samples.models``'
``resnet_style``, else a small built-in CNN.  Inputs: ``samples/digits/test.npz``
when present, else seeded random data.  Also exports a GroupNorm variant at opset
18 and 21 and checks it on inputs with a +100 offset (GroupNormalization-21
precision on CUDA).  Exit code 0 when the main parity check holds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _model_and_inputs(samples: int):
    import torch
    import torch.nn as nn

    digits = ROOT / "samples" / "digits"
    if (digits / "digits_resnet.pt").exists():
        try:
            from samples.digits import digits_resnet

            model = digits_resnet()
            model.load_state_dict(torch.load(digits / "digits_resnet.pt", map_location="cpu", weights_only=True))
            if (digits / "test.npz").exists():
                import numpy as np

                with np.load(digits / "test.npz") as z:
                    x = torch.from_numpy(z["x"][:samples].astype(np.float32))
            else:
                x = torch.randn(samples, 1, 32, 32, generator=torch.Generator().manual_seed(0))
            return "digits_resnet", model.eval(), (x,)
        except Exception as e:  # noqa: BLE001 - fall through to a smaller sample
            print(f"# digits sample unusable ({type(e).__name__}: {e}); using a small sample", file=sys.stderr)
    try:
        from samples.models import ALL_SAMPLES

        model, inputs = ALL_SAMPLES["resnet_style"]()
        return "resnet_style", model.eval(), tuple(inputs)
    except Exception as e:  # noqa: BLE001
        print(f"# samples.models unusable ({type(e).__name__}: {e}); using a built-in CNN", file=sys.stderr)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    return "builtin_cnn", model.eval(), (torch.randn(samples, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for the .onnx files (default: a temp folder)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        return _run(args, out)
    # the default temp folder is removed afterwards, whatever happens
    with tempfile.TemporaryDirectory(prefix="normswap_gpu_") as tmp:
        return _run(args, Path(tmp))


def _run(args, out: Path) -> int:
    import onnxruntime as ort
    import torch
    import torch.nn as nn

    from normswap.check import check
    from normswap.export import export

    t0 = time.perf_counter()
    name, model, inputs = _model_and_inputs(args.samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = export(model, out / f"{name}.onnx", inputs, force=True)
        par = check(model, exp.path, inputs, providers=("cpu", "cuda"), repeats=args.repeats)

        # GroupNorm precision, opset 18 (decomposition) vs 21 (GroupNormalization), offset +100
        torch.manual_seed(0)
        gn = nn.GroupNorm(4, 16).eval()
        with torch.no_grad():
            gn.weight.uniform_(0.5, 1.5)
            gn.bias.uniform_(-0.5, 0.5)
        xg = torch.randn(8, 16, 16, 16) + 100.0
        gn_results = {}
        for opset in (18, 21):
            e = export(gn, out / f"gn{opset}.onnx", (xg,), opset=opset, force=True)
            p = check(gn, e.path, (xg,), providers=("cpu", "cuda"), repeats=3)
            gn_results[f"opset{opset}"] = {
                p_.label: {"status": p_.status, "max_abs": p_.max_abs, "reason": p_.reason} for p_ in p.providers
            }

    result = {
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda_available": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "onnxruntime": ort.__version__,
            "onnxruntime_providers": ort.get_available_providers(),
        },
        "model": name,
        "export": exp.to_dict(),
        "check": par.to_dict(),
        "groupnorm_offset100": gn_results,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(result, indent=2, default=str))
    print(par.summary_line(), file=sys.stderr)
    return 0 if par else 1


if __name__ == "__main__":
    sys.exit(main())
