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
from normswap_cli.common import unwrap_summary

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
    assert unwrap_summary(result.output).startswith("PASSED | normswap audit")
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
    assert unwrap_summary(good.stdout).startswith("PASSED")


def test_help_does_not_import_torch():
    code = "import sys; from normswap_cli.main import cli; cli.main(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert unwrap_summary(out.stdout) == "False"


# --------------------------------------------------------------------------- QA regressions


@pytest.mark.parametrize("args", [["bogus"], ["audit", "--bogus", "x"], ["check", "a"], ["audit", "{d}"]])
def test_usage_errors_are_one_line_exit_2(files, args):
    result = CliRunner().invoke(cli, [a.format(d=files) for a in args])
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "--help" in err and "Usage:" not in err


def test_json_never_overwrites_the_input_model(files, monkeypatch):
    monkeypatch.chdir(files)  # the failing check below writes its error report to ./cpu
    before = (files / "whole.pt").read_bytes()
    for args in (["audit", str(files / "whole.pt"), "--trust", "--json", str(files / "whole.pt")],
                 ["--json", str(files / "whole.pt"), "audit", str(files / "whole.pt"), "--trust"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "the input model" in result.stderr
    assert (files / "whole.pt").read_bytes() == before
    # an option value that is not a file (--providers cpu) does not block --json cpu
    assert "also" not in CliRunner().invoke(cli, ["check", str(files / "whole.pt"), "x.onnx", "--trust", "--json", "cpu"]).stderr


def test_json_into_missing_or_unwritable_folder_fails_before_the_job(files):
    result = CliRunner().invoke(cli, ["audit", str(files / "whole.pt"), "--trust", "--json", str(files / "no" / "a.json")])
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert "norm sites" not in result.output and "Traceback" not in result.output
    # a folder where no file can be created: one line, exit 2, no traceback
    result = CliRunner().invoke(cli, ["audit", str(files / "whole.pt"), "--trust", "--json", "/proc/normswap-qa.json"])
    assert result.exit_code == 2 and result.stderr.strip().startswith("error:") and "\n" not in result.stderr.strip()


def test_audit_wrong_input_shape_is_bad_input(files):
    result = CliRunner().invoke(cli, ["audit", str(files / "whole.pt"), "--trust", "--input-shape", "1,3,8,8"])
    assert result.exit_code == 2 and "--input-shape 1,3,8,8" in result.stderr and "\n" not in result.stderr.strip()
    assert run("audit", str(files / "whole.pt"), "--trust", "--input-shape", "1,1,8,8").exit_code == 0


def test_audit_table_hides_empty_columns_at_80_columns(files):
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].num_batches_tracked.fill_(10)
    torch.save(m, files / "trained.pt")
    result = CliRunner().invoke(cli, ["audit", str(files / "trained.pt"), "--trust"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert "flags" not in result.output  # no site has a flag
    assert max(len(line) for line in result.output.splitlines()) <= 80


def test_render_bug_still_ends_with_the_summary_line(files, monkeypatch):
    import normswap_cli.commands.audit as audit_cmd

    def broken(report, console):
        raise KeyError("boom")

    monkeypatch.setattr(audit_cmd, "render", broken)
    result = CliRunner().invoke(cli, ["audit", str(files / "whole.pt"), "--trust"])
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert unwrap_summary(result.stdout).startswith("PASSED | normswap audit")
    assert "could not render" in result.stderr


def test_summary_line_is_one_line_on_a_narrow_terminal(files):
    result = CliRunner(env={"COLUMNS": "40"}).invoke(cli, ["audit", str(files / "whole.pt"), "--trust"])
    last = unwrap_summary(result.output)
    assert last.startswith("PASSED | normswap audit") and "foldable" in last
