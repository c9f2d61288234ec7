"""The wheel folder for a GPU machine without a package index (bench/gpu_wheels.sh runs this).

What the project needs (setup.cfg's install_requires, plus pytest and the service's packages) is resolved by pip for the machine's Python and
platform, with every package the machine already has pinned at its version (bench/gpu_machine.txt, that machine's
`pip list --format=freeze`); the wheels of everything else are downloaded. A requirement published only as a source
distribution (deepspeed) is built into a wheel here first. The folder is then checked the way the machine will use
it: a fresh venv of the same Python (when this machine has it) that holds a metadata-only stand-in for each of the
machine's packages must install the project's requirements from the folder with `pip install --no-index`.
"""

from __future__ import annotations

import argparse
import configparser
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux_2_39_x86_64", "manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
# pytest for the GPU tests; the service packages (not mlflow: bench/serve.py serves export folders) for the ViT-B
# service row of bench/gpu.sh.
EXTRA = ("pytest", "fastapi", "uvicorn", "python-multipart", "prometheus-client", "httpx")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(setup_cfg: Path) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    lines = parser["options"]["install_requires"].strip().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")] + list(EXTRA)


def machine_packages(path: Path) -> dict[str, str]:
    """{canonical name: version} from a `pip list --format=freeze`; local labels (+cu130) dropped."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            out[canonical(name)] = version.split("+", 1)[0]
    return out


def run(*cmd: str) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def find_python(version: str) -> str | None:
    """A working interpreter of `version` here (a pyenv shim on PATH may name one it cannot run)."""
    candidates = [shutil.which(f"python{version}"), *map(str, sorted(Path.home().glob(
        f".pyenv/versions/{version}*/bin/python{version}"))), f"/usr/bin/python{version}"]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "import venv, ensurepip"], capture_output=True).returncode == 0:
            return candidate
    return None


def machine_venv(python: str, machine: dict[str, str], folder: Path) -> Path:
    """A fresh venv of the machine's Python whose site-packages claims each of the machine's packages at its
    version (metadata only, no dependencies): pip then resolves and installs exactly as it will there."""
    run(python, "-m", "venv", str(folder))
    venv_python = folder / "bin" / "python"
    site = Path(run(str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    for name, version in machine.items():
        if name in ("pip", "setuptools", "wheel"):
            continue
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("stand-in for the GPU machine's package\n")
        (info / "RECORD").write_text("")
    return venv_python


def build_sdist_only(reqs: list[str], out: Path) -> None:
    """Wheels, built here, of the requirements PyPI serves only as source (pure Python: any platform)."""
    for req in reqs:
        name = canonical(re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0])
        if name == "deepspeed":  # an sdist only; DS_BUILD_OPS unset builds no C++ ops: a py3-none-any wheel
            run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), req)


def to_install(venv_python: Path, reqs: list[str], out: Path) -> list[str]:
    """name==version of what pip would install on the machine (the index and the folder's built wheels)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        run(str(venv_python), "-m", "pip", "install", "--disable-pip-version-check", "--dry-run", "--quiet",
            "--only-binary=:all:", "--report", str(report), "--find-links", str(out), *reqs)
        items = json.loads(report.read_text())["install"]
    return [f"{canonical(i['metadata']['name'])}=={i['metadata']['version']}" for i in items]


def download(venv_python: Path, wanted: list[str], out: Path) -> list[str]:
    """The wheels of `wanted` that the folder lacks; returns what was fetched."""
    have = {canonical(p.name.split("-", 1)[0]) for p in out.glob("*.whl")}
    fetch = [w for w in wanted if canonical(w.split("==", 1)[0]) not in have]
    if fetch:
        run(str(venv_python), "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
            "--only-binary=:all:", "-d", str(out), *fetch)
    return fetch


def check_install(venv_python: Path, reqs: list[str], out: Path) -> str:
    """Install from the folder alone, with --no-index, on the machine's packages."""
    result = run(str(venv_python), "-m", "pip", "install", "--disable-pip-version-check", "--no-index",
                 "--find-links", str(out), *reqs)
    installed = re.findall(r"Successfully installed (.*)", result.stdout)
    return f"installs with --no-index on the machine's packages: {installed[-1] if installed else 'nothing new'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", default=REPO / ".whl", help="wheel folder (default .whl)")
    parser.add_argument("--machine", type=Path, default=REPO / "bench" / "gpu_machine.txt",
                        help="the machine's `pip list --format=freeze`")
    parser.add_argument("--python-version", default="3.12", help="the machine's Python (major.minor)")
    parser.add_argument("--max-mib", type=float, default=60.0, help="refuse a folder larger than this")
    args = parser.parse_args(argv)
    python = find_python(args.python_version)
    if python is None:
        print(f"error: needs Python {args.python_version} here (the machine's) to resolve and check the folder",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("*.whl"):  # one version of each: two stop the machine's install
        if not stale.name.startswith("nvidia_dali"):
            stale.unlink()
    reqs, machine = requirements(REPO / "setup.cfg"), machine_packages(args.machine)
    build_sdist_only(reqs, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        venv_python = machine_venv(python, machine, Path(tmp) / "venv")
        wanted = to_install(venv_python, reqs, args.out)
        fetched = download(venv_python, wanted, args.out)
        wheels = sorted(args.out.glob("*.whl"))
        mib = sum(p.stat().st_size for p in wheels) / 2 ** 20
        print(f"{len(wheels)} wheels, {mib:.1f} MiB in {args.out} for Python {args.python_version} "
              f"(the machine lacks {len(wanted)}: {' '.join(wanted)}; downloaded {len(fetched)})")
        for wheel in wheels:
            print(f"  {wheel.stat().st_size / 2 ** 20:6.2f} MiB  {wheel.name}")
        if mib > args.max_mib:
            print(f"error: {mib:.1f} MiB is over --max-mib {args.max_mib}", file=sys.stderr)
            return 1
        print(check_install(venv_python, reqs, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
