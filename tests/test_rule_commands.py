"""Every rule runs python and torchrun from the environment Snakemake itself runs in (the venv of
.venv/bin/snakemake, whatever PATH holds), except under --sdm conda, where the rule's conda
environment provides them: the shell prefix of workflow/rules/common.smk puts the interpreter's
bin/ first on PATH, and leaves PATH alone under conda. The tiny end-to-end run (conftest.py
tiny_workflow) runs every rule of the pipeline this way without the venv on PATH; the system
Python of CI's machine has neither torch nor pandas, so a rule that reached it would fail."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
from conftest import BIN, REPO, SNAKEMAKE, copy_test_workdir, snakemake_env


def shell_prefix(workdir, *options: str) -> str:
    """The shell prefix of the workflow parsed with `options`, by a Snakefile that includes
    the repository's and prints it."""
    snakefile = workdir / "Snakefile.prefix"
    snakefile.write_text(
        f"include: {str(REPO / 'Snakefile')!r}\n"
        "from snakemake.shell import shell as _shell\n"
        "print('PREFIX=' + _shell._process_prefix)\n"
    )
    command = [str(SNAKEMAKE), "-s", str(snakefile), "-d", str(workdir), "--list-rules"]
    result = subprocess.run(
        [*command, *options], capture_output=True, text=True, env=snakemake_env(), check=True
    )
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("PREFIX=")]
    return line.removeprefix("PREFIX=")


@pytest.mark.parametrize("deployment", ["venv", "conda"])
def test_rules_run_python_and_torchrun_of_their_environment(tmp_path, deployment):
    workdir = copy_test_workdir(tmp_path / "run")
    options = ("--sdm", "conda") if deployment == "conda" else ()
    prefix = shell_prefix(workdir, *options)
    assert "OMP_NUM_THREADS=1" in prefix
    path = re.findall(r"\bPATH=([^\s;]+)", prefix)
    if deployment == "conda":
        assert path == [], prefix
    else:
        assert path == [f"{shlex.quote(str(BIN))}:$PATH"], prefix
        assert (BIN / "python").exists() and (BIN / "torchrun").exists()


def shell_blocks(text: str) -> list[str]:
    """The `shell:` blocks of a Snakefile or .smk file, as text."""
    blocks, block, indent = [], None, 0
    for line in text.splitlines():
        stripped = line.lstrip()
        if block is not None and stripped and len(line) - len(stripped) <= indent:
            blocks.append("\n".join(block))
            block = None
        if stripped.startswith("shell:"):
            block, indent = [stripped.removeprefix("shell:")], len(line) - len(stripped)
        elif block is not None:
            block.append(stripped)
    if block is not None:
        blocks.append("\n".join(block))
    return blocks


def test_every_rule_runs_python_or_torchrun_by_name():
    """Also the rules the tiny run leaves out (OC20 download and extraction, scaling): each shell
    runs `python -m graphpar...` or `torchrun ... -m graphpar...`, found on the prefix's PATH,
    never python3 or an interpreter's path."""
    files = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    blocks = [block for path in files for block in shell_blocks(path.read_text())]
    assert len(blocks) >= 12
    for block in blocks:
        assert re.search(r"\b(python|torchrun)\b.* -m graphpar\b", block, re.DOTALL), block
        assert not re.search(r"python3|/python\b|/torchrun\b", block), block
