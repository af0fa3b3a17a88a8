"""`python -m graphpar.models`: configurations and parameter counts without allocating weights."""

import subprocess
import sys

from conftest import tool_env


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


def test_list_and_errors():
    assert "dimenetpp-tiny" in run("--list").stdout
    result = run("--count", "dimenetpp-xxl")
    assert result.returncode == 2 and "unknown configuration" in result.stderr
    assert run("--help").returncode == 0
