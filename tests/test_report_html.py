"""The HTML report of the tiny run, opened in a real browser: headless Chromium (Debian's
`chromium`, installed with apt when missing and root) renders `make reproduce`'s report command
and the test reads what its JavaScript drew: every rule of the pipeline with its recorded job, and
a results table. Driven over the DevTools protocol (--remote-debugging-pipe), through the calls
the report's own links and rule graph make (`app.showResultInfo`, `app.setView`)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, run_snakemake
from debian_packages import CHROMIUM, SYSTEM_PATH, Unavailable, ensure_packages

pytestmark = pytest.mark.timeout(600)

# `make reproduce`'s report: the pipeline's targets and the report's, so that the report's rule
# graph, statistics and rule pages cover every job that produced the results.
REPORT_TARGETS = ("all", "report")
# Every rule of the tiny run (.test/config/config.yaml), pipeline and report.
PIPELINE_RULES = (
    "generate_mini",
    "preprocess_plan",
    "preprocess_shard",
    "preprocess_s2ef",
    "preprocess_is2re",
    "fit_scale_factors",
    "train",
    "evaluate_s2ef",
    "relax",
    "submission",
)
REPORT_RULES = ("report_table", "report_figure", "report_config")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
)


def test_make_reproduce_builds_the_report_of_every_target():
    makefile = (REPO / "Makefile").read_text()
    assert f"snakemake --report report.html {' '.join(REPORT_TARGETS)}" in makefile


def above_4(fd: int) -> int:
    """The same file on a close-on-exec descriptor numbered 5 or more; `fd` is closed."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
    os.close(fd)
    return moved


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (the browser reads commands
    on fd 3 and answers on fd 4, one JSON message per NUL-terminated record), one page."""

    def __init__(self, executable: str, profile: Path, timeout: float = 60):
        self.timeout = timeout
        # Both pipes above fd 4, so that placing them at 3 and 4 in the child overwrites neither.
        commands, self._commands = map(above_4, os.pipe())  # the browser reads (its fd 3)
        self._answers, answers = map(above_4, os.pipe())  # the browser writes (its fd 4)

        def wire_pipes() -> None:  # in the child, before exec
            os.dup2(commands, 3)
            os.dup2(answers, 4)

        self.log = open(profile / "chromium.log", "wb")  # noqa: SIM115 (closed by close())
        self.process = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            preexec_fn=wire_pipes,
            close_fds=False,  # the pipes are close-on-exec; fds 3 and 4 are not
        )
        os.close(commands)
        os.close(answers)
        self._next_id = 0
        self._buffer = b""
        self.session = None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        attached = self.send("Target.attachToTarget", targetId=target, flatten=True)
        self.session = attached["sessionId"]

    def send(self, method: str, **params):
        """Send one command (to the page once attached) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                    raise TimeoutError(f"Chromium did not answer {method} in {self.timeout} s")
                chunk = os.read(self._answers, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited ({self.process.poll()}) during {method}")
                self._buffer += chunk
            record, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(record)
            if answer.get("id") == self._next_id:  # events and other answers are not ours
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 60):
        """Poll until the expression is truthy (the page's scripts are still running)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"{expression} stayed false for {seconds} s")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot")["data"]))

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.session = None
                self.send("Browser.close")
            except (RuntimeError, TimeoutError, OSError):
                pass
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.close(self._commands)
        os.close(self._answers)
        self.log.close()


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        ensure_packages(*CHROMIUM)
    except Unavailable as reason:
        pytest.skip(f"no headless Chromium: {reason}")
    return shutil.which("chromium", path=SYSTEM_PATH)


def link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem
        shutil.copy2(source, destination)


@pytest.fixture(scope="module")
def report_html(tiny_workflow, tmp_path_factory) -> Path:
    """`make reproduce`'s last two steps on a copy of the tiny run (Snakemake's metadata, which
    holds the jobs' runtimes, travels with it): the tables and figures, then report.html."""
    workdir = tmp_path_factory.mktemp("report-html") / "run"
    # Hard links (the data is 300 MB): the report's jobs only add files. Locks stay behind.
    shutil.copytree(
        tiny_workflow,
        workdir,
        symlinks=True,
        ignore=shutil.ignore_patterns("locks"),
        copy_function=link_or_copy,
    )
    run_snakemake(workdir, "--cores", "2", "report")
    run_snakemake(workdir, "--report", "report.html", *REPORT_TARGETS)
    return workdir / "report.html"


@pytest.fixture(scope="module")
def page(chromium, report_html, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    browser = Chromium(chromium, profile)
    try:
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            width=1400,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        browser.send("Page.navigate", url=report_html.as_uri())
        # The landing page: the navigation menu and the rule graph, drawn by vega.
        browser.wait_for("document.querySelector('#rulegraph canvas') !== null")
        yield browser
    except BaseException:
        print((profile / "chromium.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        browser.close()


def app_text(page: Chromium, selector: str = "#app") -> str:
    return page.evaluate(f"document.querySelector({json.dumps(selector)}).innerText")


def test_report_opens_on_the_workflow_and_its_results(page, report_html):
    text = app_text(page)
    for item in ("Workflow", "Statistics", "Tables", "Figures", "Configuration"):
        assert item in text
    assert "graphpar reproduces Sriram et al." in text  # workflow/report/workflow.rst
    page.screenshot(report_html.with_name("workflow.png"))


def test_report_records_every_rule_of_the_pipeline(page, report_html):
    """Each rule's page, as a click on its node of the rule graph opens it: the rule's code and
    files from the recorded job, not Snakemake's "No metadata available" of a rule that did not
    enter the report."""
    pages = {}
    for rule in (*PIPELINE_RULES, *REPORT_RULES):
        page.evaluate(f"app.setView({{navbarMode: 'ruleinfo', ruleinfo: '{rule}'}})")
        # The breadcrumb names the rule once its page is drawn.
        pages[rule] = page.wait_for(
            f"document.querySelector('#app').innerText.includes('Rule\\n{rule}\\n')"
            " && document.querySelector('#app').innerText"
        )
    for rule, text in pages.items():
        assert "No metadata available" not in text, rule
        assert "output" in text.lower() and "code" in text.lower(), rule
    assert "results/tiny/checkpoints/" in pages["train"]
    assert "results/tables/{table" in pages["report_table"]
    page.evaluate("app.setView({navbarMode: 'ruleinfo', ruleinfo: 'train'})")
    page.wait_for("document.querySelector('#app').innerText.includes('Rule\\ntrain\\n')")
    page.screenshot(report_html.with_name("rule-train.png"))

    # Statistics: one runtime per rule that ran, drawn by vega (a canvas: no text to read).
    page.evaluate("app.setView({content: 'stats'})")
    page.wait_for("document.querySelector('#runtimes canvas') !== null")
    ruled = page.evaluate("runtimes_spec.data.values.map(v => v.rule)")
    assert set(ruled) == {*PIPELINE_RULES, *REPORT_RULES}
    page.screenshot(report_html.with_name("statistics.png"))


def test_report_renders_the_results_tables(page, report_html):
    """Table 1's entry in Tables: its caption holds the table itself, our two runs beside the
    paper's rows, as an HTML table."""
    page.evaluate("app.showResultInfo('results/tables/table1.csv')")
    header = page.wait_for(
        "Array.from(document.querySelectorAll('#app table.docutils thead th'), th => th.innerText)"
    )
    assert "Force MAE (eV/Å)" in header and "Energy MAE (eV)" in header
    rows = page.evaluate(
        "Array.from(document.querySelectorAll('#app table.docutils tbody tr'),"
        " tr => tr.querySelector('td').innerText)"
    )
    assert "GemNet-XL" in rows
    assert {row.split(" ")[0] for row in rows if row.startswith("tiny/")} == {
        "tiny/dimenetpp",
        "tiny/gemnet",
    }
    page.screenshot(report_html.with_name("table1.png"))
