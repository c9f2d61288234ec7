#!/usr/bin/env bash
# The wheel folder bench/gpu.sh installs on a GPU machine without a package index (issue 16 §2):
#
#   bash bench/gpu_wheels.sh [OUT=.whl] [--machine bench/gpu_machine.txt] [--python-version 3.12] [--max-mib 60]
#
# Resolves the project's requirements for the machine's Python against the packages it already has (its
# `pip list --format=freeze`, bench/gpu_machine.txt), downloads the wheels of everything else (builds deepspeed's,
# which PyPI serves as source only), refuses a folder over --max-mib, and checks that it installs with --no-index
# into a fresh venv of that Python holding stand-ins of the machine's packages. Needs scripts/setup.sh's .venv and,
# for the check, the machine's Python version here. The device tool carries the folder: name it in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python bench/wheel_closure.py "$@"
