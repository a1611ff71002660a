"""convert follows the output rules (issue 12): inputs protected even with --force, outputs
claimed as a set with --json and --report, nothing written when the job fails, layer names
never cut at 80 columns, the error is the first line."""

import os
import subprocess
import sys

from click.testing import CliRunner

from normswap_cli.main import cli

ARCH = ["--arch", "samples.digits:digits_resnet"]
MODEL = "samples/digits/digits_resnet.pt"


def _copy_calib(tmp_path, n=32):
    import numpy as np

    z = np.load("samples/digits/calib.npz")
    p = tmp_path / "calib.npz"
    np.savez(p, x=z["x"][:n], y=z["y"][:n])
    return p


def test_calib_file_is_never_an_output_even_with_force(tmp_path):
    calib = _copy_calib(tmp_path)
    before = calib.read_bytes()
    for opt in ("-o", "--onnx", "--json", "--report"):
        args = ["convert", MODEL, *ARCH, "--to", "gn", "--calib", str(calib), "--force", "-o", str(tmp_path / "m.pt")]
        if opt == "-o":
            args[-1] = str(calib)
        elif opt == "--json":
            args = ["--json", str(calib)] + args
        else:
            args += [opt, str(calib)]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2, (opt, r.output)
        assert calib.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["calib.npz"]


def test_json_may_not_name_the_converted_model(tmp_path):
    calib = _copy_calib(tmp_path)
    r = CliRunner().invoke(cli, ["--json", str(tmp_path / "m.pt"), "convert", MODEL, *ARCH, "--to", "gn",
                                 "--calib", str(calib), "-o", str(tmp_path / "m.pt"), "--mode", "fast"])
    assert r.exit_code == 2 and "would both be" in r.output
    assert sorted(os.listdir(tmp_path)) == ["calib.npz"]


def test_a_failing_parity_forward_leaves_no_outputs(tmp_path, monkeypatch):
    from normswap.errors import NormswapError

    import importlib

    C = importlib.import_module("normswap.check")

    def broken(*a, **k):
        raise NormswapError("the model does not run on these inputs")

    monkeypatch.setattr(C, "check", broken)
    calib = _copy_calib(tmp_path)
    r = CliRunner().invoke(cli, ["convert", MODEL, *ARCH, "--to", "gn", "--calib", str(calib), "-o",
                                 str(tmp_path / "m.pt"), "--mode", "fast"])
    assert r.exit_code == 2 and "nothing was written" in r.output
    assert sorted(os.listdir(tmp_path)) == ["calib.npz"]


def test_report_html_and_full_layer_names_at_80_columns(tmp_path):
    calib = _copy_calib(tmp_path)
    env = dict(os.environ, COLUMNS="80")
    p = subprocess.run([sys.executable, "-m", "normswap_cli.main", "convert", MODEL, *ARCH, "--to", "gn", "--calib",
                        str(calib), "-o", str(tmp_path / "m.pt"), "--mode", "fast", "--report",
                        str(tmp_path / "r.html")], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert "layer2.0.downsample.1" in p.stdout and "…" not in p.stdout
    assert all(len(line) <= 80 for line in p.stdout.splitlines()[:-1])  # the summary line never wraps
    html = (tmp_path / "r.html").read_text()
    assert "<svg" in html and "layer2.0.downsample.1" in html


def test_the_error_is_the_first_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "normswap_cli.main", "convert", str(tmp_path / "missing.pt"),
                        "--to", "gn"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.splitlines()[0].startswith("error:")


def test_an_empty_input_shape_is_an_error_not_ignored(tmp_path):
    r = CliRunner().invoke(cli, ["convert", MODEL, *ARCH, "--to", "gn", "--input-shape", "", "-o",
                                 str(tmp_path / "m.pt")])
    assert r.exit_code == 2 and "--input-shape ''" in r.output
    assert os.listdir(tmp_path) == []
