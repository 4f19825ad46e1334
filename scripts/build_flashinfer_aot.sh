#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Makes flashinfer-0.6.18.post1-aot-sm90a-cu130.tar.gz: FlashInfer's batch prefill (FA2, FA3)
# and batch decode modules for bench/flashinfer_peer.py (bf16, head dim 128, sm_90a), prebuilt as
# aot/<uri>/<uri>.so; and downloads the two wheels they run with (flashinfer-python, cp312
# apache-tvm-ffi). The GPU machine has no network, and JIT-compiling FA3 there costs device time
# (1-2 minutes on 16 cores). scripts/gpu_check.sh installs .whl/*.whl and unpacks the tarball into
# flashinfer/data/, FlashInfer's AOT folder, so the modules load instead of compiling.
# Needs no GPU: CUDA 13 nvcc at $CUDA_HOME (default /usr/local/cuda) and PyPI. ~11 min on 2 cores.
#   scripts/build_flashinfer_aot.sh [WORK_DIR]   venv and build tree (default: mktemp, removed)
#   WHL_DIR=DIR scripts/build_flashinfer_aot.sh  output folder (default: the repo's .whl/)
set -euo pipefail
cd "$(dirname "$0")/.."

FI_VERSION=0.6.18.post1
TVM_FFI_VERSION=0.1.15.post2
GPU_PYTHON=3.12                 # the GPU image's Python, for the tvm-ffi wheel
WHL_DIR=$(realpath -m "${WHL_DIR:-.whl}")
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ $# -gt 0 ]; then
  work=$(realpath -m "$1")
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work" "$WHL_DIR"

"${PYTHON:-python3}" -m venv "$work/venv"
VPY=$work/venv/bin/python
# Build-time needs only: FlashInfer's jit package imports these, and ninja drives the compile.
"$VPY" -m pip install -q torch==2.14.1 numpy ninja nvidia-ml-py requests tqdm packaging \
  "apache-tvm-ffi==$TVM_FFI_VERSION"
"$VPY" -m pip download -q --no-deps -d "$WHL_DIR" "flashinfer-python==$FI_VERSION"
"$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
  --platform manylinux_2_28_x86_64 -d "$WHL_DIR" "apache-tvm-ffi==$TVM_FFI_VERSION"
"$VPY" -m pip install -q --no-deps "$WHL_DIR/flashinfer_python-$FI_VERSION-py3-none-any.whl"

# Two gaps of a minimal toolkit. The modules link -lcuda but use no driver symbol, so an empty
# stub does. FA3 includes curand_kernel.h (through cutlass/util): take it from the nvidia-curand
# wheel, linking only the curand headers so the wheel's others do not shadow the toolkit's.
if [ ! -e "$CUDA_HOME/lib64/libcuda.so" ] && [ ! -e "$CUDA_HOME/lib64/stubs/libcuda.so" ]; then
  mkdir -p "$work/stubs"
  echo 'void fi_stub(void) {}' | gcc -shared -fPIC -x c - -o "$work/stubs/libcuda.so"
  export FLASHINFER_EXTRA_LDFLAGS="-L$work/stubs"
fi
if [ ! -e "$CUDA_HOME/include/curand_kernel.h" ]; then
  "$VPY" -m pip install -q nvidia-curand
  mkdir -p "$work/inc"
  ln -sf "$work"/venv/lib/python3*/site-packages/nvidia/cu13/include/curand*.h "$work/inc/"
  export FLASHINFER_EXTRA_CUDAFLAGS="-isystem $work/inc"
fi

rm -rf "$work/aot"
FLASHINFER_CUDA_ARCH_LIST=9.0a FLASHINFER_WORKSPACE_BASE=$work/ws "$VPY" - "$work/aot" <<'EOF'
"""Build each module in FlashInfer's JIT cache and copy it to AOT_DIR/<uri>/<uri>.so."""
import shutil
import sys
import time
from pathlib import Path

import torch
from flashinfer.jit.attention.modules import gen_batch_decode_module, gen_batch_prefill_module

aot = Path(sys.argv[1])
bf16, i32 = torch.bfloat16, torch.int32
# dtypes q, kv, o, index; head dims qk, vo; no RoPE, sliding window or logits cap (or fp16 QK).
specs = {
    "decode": gen_batch_decode_module(bf16, bf16, bf16, i32, 128, 128, 0, False, False),
    "prefill-fa2": gen_batch_prefill_module("fa2", bf16, bf16, bf16, i32, 128, 128, 0, False, False, False),
    "prefill-fa3": gen_batch_prefill_module("fa3", bf16, bf16, bf16, i32, 128, 128, 0, False, False, False),
}
for name, spec in specs.items():
    t = time.time()
    spec.build()  # raises if the compile fails
    dst = aot / spec.name / f"{spec.name}.so"
    dst.parent.mkdir(parents=True)
    shutil.copy2(spec.jit_library_path, dst)
    print(f"{name}: built in {time.time() - t:.0f} s", flush=True)
EOF

tarball=$WHL_DIR/flashinfer-$FI_VERSION-aot-sm90a-cu130.tar.gz
tar -czf "$tarball" --sort=name --owner=0 --group=0 --numeric-owner -C "$work" aot
echo "wrote $tarball and the wheels in $WHL_DIR"
