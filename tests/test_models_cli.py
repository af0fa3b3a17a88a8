"""`python -m graphpar.models`: configurations and parameter counts without allocating weights."""

import subprocess
import sys

import pytest
from conftest import tool_env

from graphpar.models.__main__ import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "graphpar.models", *args],
        capture_output=True,
        text=True,
        env=tool_env(),
    )


def test_count_prints_the_parameter_count():
    result = run("--count", "dimenetpp", "dimenetpp-xl")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["dimenetpp", "1,809,414"]
    assert lines[1].split()[:2] == ["dimenetpp-xl", "219,342,342"]


def test_list_and_errors(capsys):
    """The same main() in this process (the module's own start is tested above)."""
    main(["--list"])
    assert "dimenetpp-tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["--count", "dimenetpp-xxl"])
    assert stop.value.code == 2 and "unknown configuration" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0 and "--count" in capsys.readouterr().out
