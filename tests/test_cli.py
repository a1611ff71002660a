"""The CLI skeleton: help, version, global options, one-line errors and exit codes.

Runs in-process with click's CliRunner and once as a real subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from normswap_cli.main import COMMANDS, cli

ROOT = Path(__file__).resolve().parents[1]


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.fixture
def files(tmp_path):
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval().state_dict(), tmp_path / "sd.pt")
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval(), tmp_path / "whole.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    return tmp_path


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_every_command_with_an_example():
    result = run("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
        sub = run(name, "--help")
        assert sub.exit_code == 0, sub.output
        assert "normswap " + name in sub.output and "xample" in sub.output, f"{name} --help has no example"


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and "normswap" in result.output and "0.1.0" in result.output


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["audit", "{d}/missing.pt"], "no such file"),
        (["audit", "{d}/empty.pt"], "file is empty"),
        (["audit", "{d}/sd.pt"], "--arch"),
        (["audit", "{d}/whole.pt"], "--trust"),
        (["audit", "{d}/sd.pt", "--arch", "nosuch.mod:f"], "cannot import module"),
    ],
)
def test_user_errors_are_one_line_exit_2(files, args, pattern):
    result = CliRunner().invoke(cli, [a.format(d=files) for a in args])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error:") and pattern in err and "\n" not in err
    assert "Traceback" not in result.output


def test_debug_shows_the_exception(files):
    result = CliRunner().invoke(cli, ["--debug", "audit", str(files / "missing.pt")])
    assert result.exit_code != 0 and type(result.exception).__name__ == "NormswapError"


def test_summary_json_and_quiet(files):
    d = files
    result = run("audit", str(d / "whole.pt"), "--trust", "--json", str(d / "a.json"))
    assert result.exit_code == 0
    assert result.output.strip().splitlines()[-1].startswith("PASSED | normswap audit")
    report = json.loads((d / "a.json").read_text())
    assert [s["kind"] for s in report["sites"]] == ["bn"]
    # global --json before the command, --quiet prints only the summary line
    result = run("--json", str(d / "b.json"), "--quiet", "audit", str(d / "whole.pt"), "--trust")
    assert result.exit_code == 0
    assert result.output.strip().splitlines() == [result.output.strip()] and result.output.startswith("PASSED")
    assert json.loads((d / "b.json").read_text())["sites"][0]["name"] == "1"


def test_real_subprocess(files):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bad = subprocess.run(
        [sys.executable, "-m", "normswap_cli.main", "audit", str(files / "missing.pt")],
        capture_output=True, text=True, env=env, cwd=files,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
    good = subprocess.run(
        [sys.executable, "-m", "normswap_cli.main", "audit", str(files / "whole.pt"), "--trust"],
        capture_output=True, text=True, env=env, cwd=files,
    )
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip().splitlines()[-1].startswith("PASSED")


def test_help_does_not_import_torch():
    code = "import sys; from normswap_cli.main import cli; cli.main(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip().splitlines()[-1] == "False"
