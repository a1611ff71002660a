"""GroupNorm precision in onnxruntime by opset and input offset (why normswap exports at opset 18).

    python benchmarks/export_bench.py

Exports a GroupNorm model with ``normswap.export`` at opsets 18, 20 and 21 and prints the max
absolute error of onnxruntime (CPU) against PyTorch in float64, on inputs offset by +100 and +1000,
for a 4-D (N, C, H, W) and a 2-D (N, C) input.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from normswap.export import export  # noqa: E402


def max_error(opset: int, shape: tuple[int, ...], offset: float, folder: Path) -> float:
    torch.manual_seed(0)
    model = torch.nn.GroupNorm(4, shape[1]).eval()
    with torch.no_grad():
        model.weight.uniform_(0.5, 1.5)
        model.bias.uniform_(-0.5, 0.5)
    x = torch.randn(shape) + offset
    path = folder / f"gn_{opset}_{len(shape)}d_{int(offset)}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, path, (x,), opset=opset, force=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = torch.nn.functional.group_norm(x.double(), 4, model.weight.double(), model.bias.double(), model.eps)
    return float(np.abs(got.astype(np.float64) - ref.numpy()).max())


def main() -> None:
    cases = [((8, 16, 16, 16), 100.0), ((8, 16, 16, 16), 1000.0), ((64, 16), 100.0), ((64, 16), 1000.0)]
    print("| opset | " + " | ".join(f"{len(s)}-D, +{o:g}" for s, o in cases) + " |")
    print("|---" * (len(cases) + 1) + "|")
    with tempfile.TemporaryDirectory() as d:
        for opset in (18, 20, 21):
            errs = [max_error(opset, s, o, Path(d)) for s, o in cases]
            print(f"| {opset} | " + " | ".join(f"{e:.2g}" for e in errs) + " |")


if __name__ == "__main__":
    main()
