"""The dependency floors in setup.cfg are versions this project was run on: every installed requirement meets its
floor and the GPU machine's versions meet them too; tests/test_train.py's single-process run (also marked `floors`)
trains and exports. bench/floors.sh runs these (and more) with every requirement at exactly its floor; bench/gpu.sh
runs the `floors`-marked tests on the GPU machine, whose torch, transformers and peft sit at the floors."""

import configparser
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from sharding.config import REPO_ROOT

pytestmark = pytest.mark.floors


def _requirements() -> list[Requirement]:
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    lines = parser["options"]["install_requires"].strip().splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip()]


def test_floors_admit_the_gpu_machine_and_installed_versions_meet_them():
    machine = {}
    for line in (REPO_ROOT / "bench" / "gpu_machine.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, pinned = line.split("==", 1)
            machine[name.lower().replace("_", "-")] = Version(pinned.split("+", 1)[0])
    for req in _requirements():
        installed = Version(version(req.name).split("+", 1)[0])
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} does not meet {req}"
        on_machine = machine.get(req.name.lower())
        assert on_machine is None or req.specifier.contains(on_machine), \
            f"the GPU machine's {req.name} {on_machine} does not meet {req} (bench/gpu_machine.txt)"
    floors = {req.name: min(s.version for s in req.specifier) for req in _requirements() if req.specifier}
    assert floors["torch"] == "2.11" and floors["transformers"] == "5.17"
