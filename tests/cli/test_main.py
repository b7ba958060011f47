"""The ``trio-cluster`` command (`trio_cluster._cli._main`) and
``python -m trio_cluster``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trio_cluster._cli._main import main, main as cli_main


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit):
        cli_main([])
    assert "demo" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_demo_runs():
    result = subprocess.run(
        [sys.executable, "-m", "trio_cluster", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "done." in result.stdout


def test_demo_command_with_runners(capsys):
    assert main(["demo", "--runners", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 runners" in out
    assert "failover" in out
