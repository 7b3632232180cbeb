"""requirements/*.txt, the hashed locks everything installs from, are in step with pyproject.toml
(`./scripts/lock` regenerates them), and this environment holds exactly their versions."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = "smsgate (pyproject.toml)"


@dataclass
class Pin:
    """One locked package: its version, marker, hashes and what asked for it."""

    version: str
    marker: Marker | None
    hashes: int = 0
    via: list[str] = field(default_factory=list)


def read_lock(name: str) -> dict[str, Pin]:
    """Parse uv's `--generate-hashes` output: `name==version [; marker] \\`, hash lines, via."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    in_via = False
    for raw in (ROOT / "requirements" / name).read_text().splitlines():
        line = raw.strip()
        if raw and not raw[0].isspace() and not raw.startswith("#"):
            requirement = Requirement(line.rstrip("\\ "))
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            current = pins[canonicalize_name(requirement.name)] = Pin(
                spec.version, requirement.marker
            )
            in_via = False
        elif current is None:
            continue
        elif line.startswith("--hash=sha256:"):
            current.hashes += 1
        elif line.startswith("# via"):
            rest = line.removeprefix("# via").strip()
            current.via += [rest] if rest else []
            in_via = not rest
        elif in_via and line.startswith("#   "):
            current.via.append(line.removeprefix("#").strip())
    return pins


RUNTIME = read_lock("runtime.txt")
DEV = read_lock("dev.txt")


def declared(requirements: list[str]) -> dict[str, Requirement]:
    """Requirements by canonical name."""
    parsed = [Requirement(text) for text in requirements]
    return {canonicalize_name(requirement.name): requirement for requirement in parsed}


def test_every_dependency_is_pinned_at_a_version_pyproject_allows() -> None:
    runtime = declared(PYPROJECT["project"]["dependencies"])
    dev = declared(PYPROJECT["project"]["optional-dependencies"]["dev"])
    build = declared(PYPROJECT["build-system"]["requires"])

    for wanted, lock in ((runtime | build, RUNTIME), (runtime | dev | build, DEV)):
        unpinned = [name for name in wanted if name not in lock]
        assert unpinned == []
        outside = {
            name: lock[name].version
            for name, requirement in wanted.items()
            if not requirement.specifier.contains(lock[name].version, prereleases=True)
        }
        assert outside == {}


def test_the_locks_ask_for_what_pyproject_asks_for_and_no_more() -> None:
    """A dependency removed from pyproject.toml (or added without `./scripts/lock`) shows."""
    runtime = set(declared(PYPROJECT["project"]["dependencies"]))
    dev = set(declared(PYPROJECT["project"]["optional-dependencies"]["dev"]))

    assert {name for name, pin in RUNTIME.items() if PROJECT in pin.via} == runtime
    assert {name for name, pin in DEV.items() if PROJECT in pin.via} == runtime | dev


def test_the_build_backend_is_locked_as_pyproject_names_it() -> None:
    listed = [
        line
        for line in (ROOT / "requirements" / "build.in").read_text().splitlines()
        if line and not line.startswith("#")
    ]

    assert listed == PYPROJECT["build-system"]["requires"]


@pytest.mark.parametrize("lock", ["runtime.txt", "dev.txt"])
def test_every_pin_carries_hashes(lock: str) -> None:
    pins = read_lock(lock)

    assert len(pins) > 40
    assert [name for name, pin in pins.items() if pin.hashes == 0] == []


def test_the_dev_lock_keeps_the_runtime_versions() -> None:
    moved = {
        name: (pin.version, DEV[name].version)
        for name, pin in RUNTIME.items()
        if name not in DEV or DEV[name].version != pin.version
    }

    assert moved == {}


def test_this_environment_holds_exactly_the_locked_versions() -> None:
    """`./scripts/test` installed from requirements/dev.txt: what runs is what is locked."""
    different = {}
    for name, pin in DEV.items():
        if pin.marker is not None and not pin.marker.evaluate():
            continue
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed != pin.version:
            different[name] = (pin.version, installed)

    assert different == {}
