"""envs/*.yaml (for `snakemake --sdm conda`) pin exactly what pyproject.toml pins."""

import re
import tomllib

import yaml
from conftest import REPO


def pins(requirements) -> dict[str, str]:
    result = {}
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        assert version, f"{requirement!r} is not pinned with =="
        result[name.strip().lower()] = version.strip()
    return result


def test_conda_envs_agree_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pyproject_pins = pins(project["dependencies"])
    env_files = sorted((REPO / "envs").glob("*.yaml"))
    assert env_files
    for env_file in env_files:
        env = yaml.safe_load(env_file.read_text())
        pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
        assert len(pip_sections) == 1, f"{env_file.name}: expected one pip section"
        for name, version in pins(pip_sections[0]).items():
            assert pyproject_pins.get(name) == version, (
                f"{env_file.name} pins {name}=={version}, pyproject.toml has "
                f"{pyproject_pins.get(name)}"
            )


def test_every_conda_directive_names_an_env_file():
    rule_files = [REPO / "Snakefile", *(REPO / "workflow" / "rules").glob("*.smk")]
    used = set()
    for rule_file in rule_files:
        text = rule_file.read_text()
        for path in re.findall(r'conda:\s*\n\s*"([^"]+)"', text):
            env_file = (rule_file.parent / path).resolve()
            assert env_file.is_file(), f"{rule_file.name}: conda env {path} does not exist"
            used.add(env_file)
    assert used == {p.resolve() for p in (REPO / "envs").glob("*.yaml")}, "unused env files"
