#!/usr/bin/env bash
# Diagnostics of the host-side segfault seen on the GPU machine: libstdc++ templates
# (ostream::_M_insert<long>) instantiated inside _C crash there; try the extension's C++ standard.
set -u
cd "$(dirname "$0")/.."
export CUDA_HOME=/usr/local/cuda
for std in 17 20; do
  printf '#include <ostream>\nint x;\n' | g++ -std=c++$std -dM -E -x c++ - | grep -E "_GLIBCXX_EXTERN_TEMPLATE|__cplusplus " | tr '\n' ' '; echo
done
repro='import torch, dustin
from dustin import ops
q=torch.randn(1,2,4,64); k=torch.randn(4,2,16,64); v=torch.randn_like(k)
t=torch.arange(4,dtype=torch.int32).view(1,4); l=torch.tensor([50],dtype=torch.int32)
ids,c=ops.dense_block_lists(l,16)
print("ok call", ops.sparse_verify(q,k,v,t,l,ids,c,0.125,"HND")[1].shape)
try: ops.sparse_verify(q,k,v,t,torch.tensor([90],dtype=torch.int32),ids,c,0.125,"HND")
except IndexError as e: print("raised", e)'
for std in 17 20; do
  echo "=== extension C++$std"
  rm -rf build /tmp/tmp*.build-temp python/dustin/*.so*
  DUSTIN_EXT_CXX_STANDARD=$std DUSTIN_CUDA=OFF DUSTIN_BUILD_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >/tmp/b.log 2>&1 || grep -m5 -i "error" /tmp/b.log
  nm -C python/dustin/_C*.so | grep "_M_insert<long>"
  python3 -X faulthandler -c "$repro" 2>&1 | tail -n 4
done
