#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Sets up .venv with PyTorch and the build tools, then builds and installs dustin in place.
# CUDA kernels are compiled whenever nvcc is found (CUDA_HOME, default /usr/local/cuda); they
# run only where a GPU is present. Re-running is cheap: pip skips what is installed and CMake
# rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${DUSTIN_TORCH_SPEC:-torch==2.14.1}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip setuptools wheel
"$VPY" -m pip install -q "$TORCH_SPEC"
"$VPY" -m pip install -q cmake ninja nvidia-cutlass

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ -z "${DUSTIN_CUDA:-}" ]; then
  if [ -x "$CUDA_HOME/bin/nvcc" ]; then export DUSTIN_CUDA=ON; else export DUSTIN_CUDA=OFF; fi
fi
echo "dustin setup: DUSTIN_CUDA=$DUSTIN_CUDA CUDA_HOME=$CUDA_HOME" >&2
"$VPY" -m pip install -q --no-build-isolation -e ".[test]"
"$VPY" -c "import dustin; print('dustin', dustin.__version__, 'CUDA kernels built:', dustin.built_with_cuda())"
