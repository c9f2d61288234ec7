#!/usr/bin/env bash
# The dependency floors of setup.cfg, run (issue 16 §2): a venv with every requirement at exactly its floor
# (torch 2.11, transformers 5.17, peft 0.21.0 are the H200 machine's; bench/gpu_machine.txt), then the tests that
# exercise them on the CPU: tests/test_floors.py (floors met, one training step and an export), the models, the
# per-sample noise, training and the GPU-path fallback.
#
#   bash bench/floors.sh [VENV=/tmp/sommelier-floors] [pytest args...]
#
# torch 2.11 from the package index is its CUDA build (about 4 GB with its nvidia-* packages); it runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/sommelier-floors}
shift || true
PYTHON=${PYTHON:-python3.11}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
floors=$("$VENV/bin/python" - <<'PY'
import configparser
parser = configparser.ConfigParser()
parser.read("setup.cfg")
lines = parser["options"]["install_requires"].strip().splitlines()
print(" ".join(line.strip().replace(">=", "==") for line in lines if line.strip() and not line.startswith("#")))
PY
)
echo "installing the floors: $floors"
"$VENV/bin/pip" install --quiet --disable-pip-version-check $floors pytest
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -e .
"$VENV/bin/python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__)"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_floors.py tests/test_models.py \
  tests/test_sample_noise.py tests/test_train.py tests/test_gpu_path.py tests/test_eval_metrics.py "$@"
