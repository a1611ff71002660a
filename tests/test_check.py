"""normswap.check: real ONNX files, real onnxruntime sessions, no mocks."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from normswap.check import (
    CRITERION,
    ParityReport,
    ProviderSpec,
    check,
    compare_arrays,
    fallback_reason,
    parse_providers,
    provider_spec,
)
from normswap.errors import NormswapError
from normswap.export import export

CUDA_INSTALLED = "CUDAExecutionProvider" in ort.get_available_providers()
FAST = {"repeats": 2, "warmup": 1}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
    )
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.3, 0.3)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def _x(n=4, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, path of its ONNX export, example inputs), exported once for the module."""
    d = tmp_path_factory.mktemp("check")
    model = make_model()
    path = d / "m.onnx"
    export(model, path, _x())
    return model, path


def test_parity_passes_with_metrics(exported):
    model, path = exported
    rep = check(model, path, _x(), **FAST)
    assert isinstance(rep, ParityReport) and rep and rep.passed
    assert rep.batch_sizes == [4, 1] and rep.dynamic_batch
    cpu = rep.provider("cpu")
    assert cpu.status == "passed" and cpu.ran == "CPUExecutionProvider" and cpu.torch_device == "cpu"
    assert [b.batch_size for b in cpu.batches] == [4, 1]
    o = cpu.batches[0].outputs[0]
    assert o.shape == [4, 6] and o.passed and o.max_abs < 1e-5 and o.mean_abs <= o.max_abs
    assert o.cosine > 0.999999 and o.top1_agreement == 1.0 and o.max_rel < 1e-3
    assert o.tolerance == pytest.approx(1e-4 + 1e-3 * float(model(_x()).detach().abs().max()), rel=1e-5)
    assert cpu.latency_ms > 0 and cpu.torch_latency_ms > 0
    assert rep.atol == 1e-4 and rep.rtol == 1e-3 and rep.criterion == CRITERION
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["passed"] and d["providers"][0]["batches"][1]["outputs"][0]["top1_agreement"] == 1.0
    assert "cpu passed" in rep.summary_line()


@pytest.mark.skipif(CUDA_INSTALLED, reason="onnxruntime-gpu installed")
def test_cuda_not_installed_is_unavailable_not_failed(exported):
    model, path = exported
    rep = check(model, path, _x(), **FAST)  # default providers cpu,cuda
    cuda = rep.provider("cuda")
    assert cuda.status == "unavailable" and cuda.ran is None and not cuda.batches
    assert "not installed" in cuda.reason and "onnxruntime-gpu" in cuda.reason
    assert bool(rep)  # an unavailable provider does not fail the check ...
    only = check(model, path, _x(), providers="cuda", **FAST)
    assert not only  # ... but nothing ran when cuda alone was asked for
    assert any("no requested provider" in n for n in only.notes)


def test_cuda_comparison_logic_with_cpu_standing_in(exported):
    """The CUDA code path (spec -> session -> provider check -> torch on the spec's device),
    with the CPU provider under a 'cuda' label."""
    model, path = exported
    spec = ProviderSpec("cuda", "CPUExecutionProvider", {}, "cuda")
    rep = check(model, path, _x(), providers=[spec], **FAST)
    r = rep.provider("cuda")
    assert rep and r.status == "passed" and r.ran == "CPUExecutionProvider"
    if not torch.cuda.is_available():
        assert r.torch_device == "cpu" and any("no CUDA device" in n for n in rep.notes)
    assert next(model.parameters()).device.type == "cpu"  # the user's model is not moved


def test_provider_specs_and_fallback_detection():
    cuda = provider_spec("cuda")
    assert cuda.provider == "CUDAExecutionProvider" and cuda.options == {"use_tf32": "0"}
    assert cuda.torch_device == "cuda"
    assert provider_spec("CPUExecutionProvider").label == "cpu"
    assert [s.label for s in parse_providers("cpu, cuda,cpu")] == ["cpu", "cuda"]
    with pytest.raises(NormswapError, match="unknown provider"):
        provider_spec("tpu")
    # onnxruntime-gpu without a usable GPU builds a CPU session: that is a fallback
    assert "fell back to CPUExecutionProvider" in fallback_reason(cuda, ["CPUExecutionProvider"])
    assert fallback_reason(cuda, ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None


def _perturb(src, dst, name_part="weight", delta=0.05):
    m = onnx.load(str(src))
    for init in m.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 4:  # the conv weight
            arr = arr.copy()
            arr.flat[0] += delta
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            break
    else:  # pragma: no cover
        raise AssertionError("no conv weight initializer")
    onnx.save(m, str(dst))


def test_perturbed_onnx_fails(exported, tmp_path):
    model, path = exported
    bad = tmp_path / "bad.onnx"
    _perturb(path, bad)
    rep = check(model, bad, _x(), providers="cpu", **FAST)
    assert not rep
    cpu = rep.provider("cpu")
    assert cpu.status == "failed" and "max abs error" in cpu.reason
    assert not cpu.batches[0].outputs[0].passed


def test_inputs_not_matching_the_onnx_file(exported, tmp_path):
    model, path = exported
    with pytest.raises(NormswapError, match=r"expects 1 input\(s\).*2 were given"):
        check(model, path, (_x(), _x()), **FAST)
    with pytest.raises(NormswapError, match="rank 4"):
        check(model, path, torch.randn(4, 3, 8), **FAST)
    with pytest.raises(NormswapError, match="axis 1: 3 vs 5"):
        check(model, path, torch.randn(4, 5, 8, 8), **FAST)
    # an ONNX file of another model: its outputs differ in count
    class Two(nn.Module):
        def forward(self, x):
            return x * 2, x + 1

    other = tmp_path / "two.onnx"
    export(Two(), other, _x())
    with pytest.raises(NormswapError, match="2 output"):
        check(model, other, _x(), providers="cpu", **FAST)


def test_missing_and_non_onnx_files(exported, tmp_path):
    model, _ = exported
    with pytest.raises(NormswapError, match="not found"):
        check(model, tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a protobuf, just text\n" * 20)
    with pytest.raises(NormswapError, match="not an ONNX model"):
        check(model, junk)
    with pytest.raises(NormswapError, match="folder"):
        check(model, tmp_path)


def test_random_inputs_from_onnx_shapes_and_input_shape(exported):
    model, path = exported
    rep = check(model, path, providers="cpu", **FAST)
    assert rep and rep.batch_sizes == [2, 1] and any("random inputs" in n for n in rep.notes)
    rep = check(model, path, providers="cpu", input_shape="5,3,8,8", **FAST)
    assert rep and rep.batch_sizes == [5, 1]


def test_tolerances_are_used(exported, tmp_path):
    model, path = exported
    bad = tmp_path / "bad.onnx"
    _perturb(path, bad, delta=0.05)
    assert check(model, bad, _x(), providers="cpu", atol=1.0, **FAST)
    with pytest.raises(NormswapError):
        check(model, path, _x(), atol=-1)


def test_compare_arrays():
    ref = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]], dtype=np.float32)
    same = compare_arrays("y", ref, ref.copy(), 1e-4, 1e-3)
    assert same.passed and same.max_abs == 0 and same.cosine == pytest.approx(1.0) and same.top1_agreement == 1.0
    off = ref.copy()
    off[1, 2] = -5.0  # flips the argmax of row 1
    r = compare_arrays("y", ref, off, 1e-4, 1e-3)
    assert not r.passed and r.max_abs == 10.0 and r.top1_agreement == 0.5 and r.max_rel == 2.0
    # tolerance = atol + rtol * max|ref|: 5e-3 error on max|ref| = 5 passes with rtol 1e-3
    near = ref + np.float32(4e-3)
    assert compare_arrays("y", ref, near, 1e-4, 1e-3).passed
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not compare_arrays("y", ref, nan, 1e-4, 1e-3).passed
    assert compare_arrays("y", nan, nan.copy(), 1e-4, 1e-3).passed
    shape = compare_arrays("y", ref, ref[:1], 1e-4, 1e-3)
    assert not shape.passed and "shape" in shape.reason
    assert compare_arrays("v", np.ones(3), np.ones(3), 1e-4, 1e-3).top1_agreement is None


# --------------------------------------------------------------------------- CLI


def _cli():
    pytest.importorskip("normswap_cli.commands.check")
    from click.testing import CliRunner

    from normswap_cli.main import cli

    return CliRunner(), cli


def test_cli_check_exit_codes_and_json(exported, tmp_path):
    runner, cli = _cli()
    model, path = exported
    mpath = tmp_path / "m.pt"
    torch.save(model, mpath)
    js = tmp_path / "parity.json"
    res = runner.invoke(cli, ["check", str(mpath), str(path), "--trust", "--input-shape", "3,3,8,8", "--repeats", "2", "--json", str(js)])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output and "unavailable" in res.output or CUDA_INSTALLED
    d = json.loads(js.read_text())
    assert d["passed"] and d["batch_sizes"] == [3, 1] and d["providers"][0]["status"] == "passed"

    bad = tmp_path / "bad.onnx"
    _perturb(path, bad)
    res = runner.invoke(cli, ["check", str(mpath), str(bad), "--trust", "--providers", "cpu", "--repeats", "1"])
    assert res.exit_code == 1 and "FAILED" in res.output

    res = runner.invoke(cli, ["check", str(mpath), str(tmp_path / "nope.onnx"), "--trust"])
    assert res.exit_code == 2 and "not found" in res.output

    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32))
    res = runner.invoke(cli, ["check", str(mpath), str(path), "--trust", "--data", str(data), "--providers", "cpu", "--repeats", "1"])
    assert res.exit_code == 0, res.output
    if not CUDA_INSTALLED:
        res = runner.invoke(cli, ["check", str(mpath), str(path), "--trust", "--providers", "cuda", "--repeats", "1"])
        assert res.exit_code == 1 and "no requested provider" in res.output


def test_compare_arrays_nonfinite_qa():
    both = np.array([[np.nan, np.inf, 1.0]], dtype=np.float32)
    assert compare_arrays("y", both, both.copy(), 1e-4, 1e-3).passed  # NaN and +Inf at the same places
    flipped = np.array([[np.nan, -np.inf, 1.0]], dtype=np.float32)
    assert not compare_arrays("y", both, flipped, 1e-4, 1e-3).passed
    allnan = np.full((2, 3), np.nan, dtype=np.float32)
    r = compare_arrays("y", allnan, allnan.copy(), 1e-4, 1e-3)
    assert not r.passed and "no finite values" in r.reason and np.isnan(r.max_abs)


def test_nan_tolerance_refused(exported):
    model, path = exported
    for bad in (dict(atol=float("nan")), dict(rtol=float("nan")), dict(atol=float("inf"))):
        with pytest.raises(NormswapError, match="atol and rtol"):
            check(model, path, _x(), providers="cpu", **bad, **FAST)


def test_cli_check_calib_random_with_input_shape(exported, tmp_path):
    runner, cli = _cli()
    model, path = exported
    mpath = tmp_path / "m.pt"
    torch.save(model, mpath)
    res = runner.invoke(cli, ["check", str(mpath), str(path), "--trust", "--data", "random", "--input-shape", "3,3,8,8",
                              "--providers", "cpu", "--repeats", "1"])
    assert res.exit_code == 0, res.output


def test_cli_check_image_folder_with_input_shape(exported, tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    runner, cli = _cli()
    model, path = exported
    mpath = tmp_path / "m.pt"
    torch.save(model, mpath)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        PIL.fromarray((np.random.default_rng(i).random((12, 10, 3)) * 255).astype("uint8")).save(tmp_path / "imgs" / f"{i}.png")
    res = runner.invoke(cli, ["check", str(mpath), str(path), "--trust", "--data", str(tmp_path / "imgs"),
                              "--input-shape", "1,3,8,8", "--providers", "cpu", "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert "PASSED | normswap check" in res.output and "batch 3, 1" in res.output
