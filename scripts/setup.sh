#!/usr/bin/env bash
# Creates .venv and installs the project with its dev extras; a second run with an unchanged setup.cfg is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=.venv
stamp="$VENV/.installed-$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch first: its CPU wheel satisfies everyone else's torch requirement, so deepspeed cannot pull CUDA builds.
"$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[dev]"
rm -f "$VENV"/.installed-*
touch "$stamp"
