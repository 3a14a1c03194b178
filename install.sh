#!/usr/bin/env bash
# Install gsmsr and everything it needs into the active Python environment (3.10+).
#   bash install.sh            # CPU or GPU, PyTorch from PyPI
#   bash install.sh --cuda     # also mamba-ssm / causal-conv1d (needs a CUDA toolkit matching PyTorch)
# basicsr 1.4.2 imports torch in its setup.py, so torch (and numpy, cython) must be installed first and
# basicsr built without build isolation.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extras=test
[ "${1:-}" = "--cuda" ] && extras=test,cuda
$PY -m pip install --quiet torch torchvision numpy cython
$PY -m pip install --quiet --no-build-isolation basicsr==1.4.2
$PY -m pip install --quiet -e ".[$extras]"
$PY -c "import gsmsr; print('gsmsr', gsmsr.__version__, 'installed')"
