"""tests/conftest.py's hook in a real inner pytest run: every way a test can skip is a skip
without CI and a failure under CI=true (or 1, yes); a strict xfail that ran stays xfailed."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).parent / "conftest.py"

# One test per way of not running a test, and two that run.
TESTS = """
import pytest


@pytest.fixture
def unavailable():
    pytest.skip("fixture reason")


def test_runs():
    pass


def test_skip_call():
    pytest.skip("call reason")


@pytest.mark.skipif(True, reason="skipif reason")
def test_skipif():
    pass


@pytest.mark.skip(reason="skip mark reason")
def test_skip_mark():
    pass


def test_skip_in_fixture(unavailable):
    pass


@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfail_that_ran():
    assert False


@pytest.mark.xfail(reason="not run reason", run=False)
def test_xfail_not_run():
    pass


def test_xfail_call():
    pytest.xfail("imperative reason")
"""

MODULE_SKIP = """
import pytest

pytest.importorskip("a_module_that_does_not_exist")


def test_never_collected():
    pass
"""

REASONS = ("fixture", "call", "skipif", "skip mark", "not run", "imperative")


@pytest.fixture
def inner(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_inner=TESTS)
    return pytester


@pytest.mark.parametrize("value", [None, "false", "0"])
def test_without_ci_skips_are_skips(inner, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    result = inner.runpytest_subprocess()
    result.assert_outcomes(passed=1, skipped=4, xfailed=3)
    assert result.ret == pytest.ExitCode.OK


@pytest.mark.parametrize("value", ["true", "1", "YES"])
def test_under_ci_every_skip_fails_with_its_reason(inner, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    result = inner.runpytest_subprocess("-ra")
    # Fixture skips count as failed too, not as setup errors; the strict xfail stays.
    result.assert_outcomes(passed=1, failed=6, errors=0, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    summary = result.stdout.str().split("short test summary info")[1]
    for reason in REASONS:
        assert f"CI={value} makes a skip a failure: " in summary
        assert f"{reason} reason" in summary, reason
    assert "test_inner.py:14: Skipped: call reason" in summary  # where the skip was raised
    assert "test_inner.py:17: Skipped: skipif reason" in summary  # the mark


def test_under_ci_a_skipped_module_is_a_collection_error(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_module=MODULE_SKIP)
    monkeypatch.delenv("CI", raising=False)
    pytester.runpytest_subprocess().assert_outcomes(skipped=1)
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*CI=true makes a skip a failure: *a_module_that_does_not_exist*"])
