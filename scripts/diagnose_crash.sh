#!/usr/bin/env bash
# Diagnostics of the host-side segfault seen on the GPU machine (docs/gpu-notes.md): number
# formatting through std::ostream inside _C crashed there. Run after `gpu_check.sh build`.
# Bisects: which libstdc++ the process maps, what _C instantiates itself, and whether a tiny
# library built by the same g++ crashes when loaded after torch (with and without hidden
# visibility), or a torch load_inline extension (torch's own flags) does.
set -u
cd "$(dirname "$0")/.."
g++ --version | head -n 1
so=$(ls python/dustin/_C*.so)
echo "--- libstdc++ needed/mapped"
ldd "$so" | grep -E "stdc|gcc_s|dustin"
echo "libstdc++ the linker uses: $(g++ -print-file-name=libstdc++.so)"; file -L "$(g++ -print-file-name=libstdc++.so)"; head -c 300 "$(g++ -print-file-name=libstdc++.so)" | grep -a INPUT
python3 -c "import torch, dustin; print(''.join(sorted({l.split()[-1] + chr(10) for l in open('/proc/self/maps') if 'stdc++' in l or 'gcc_s' in l})))"
echo "--- what _C defines itself (W = weak copy in _C)"
nm -C "$so" | grep -E " [WVuT] .*(_M_insert<|num_put<char|numpunct<char|locale::id)" | head -n 20
echo "--- error path through dustin"
python3 -X faulthandler - <<'PY' 2>&1 | tail -n 6
import torch, dustin
from dustin import ops
q = torch.randn(1, 2, 4, 64); k = torch.randn(4, 2, 16, 64); v = torch.randn_like(k)
t = torch.arange(4, dtype=torch.int32).view(1, 4); l = torch.tensor([50], dtype=torch.int32)
ids, c = ops.dense_block_lists(l, 16)
print("ok call", ops.sparse_verify(q, k, v, t, l, ids, c, 0.125, "HND")[1].shape)
try:
    ops.sparse_verify(q, k, v, t, torch.tensor([90], dtype=torch.int32), ids, c, 0.125, "HND")
except (IndexError, RuntimeError) as e:
    print("raised", type(e).__name__, str(e)[:200])
PY
echo "--- tiny g++ library that formats a long, loaded after torch"
src=/tmp/fmt.cpp
printf '#include <sstream>\n#include <string>\nextern "C" __attribute__((visibility(\"default\"))) int fmt(long v, char* buf) { std::ostringstream s; s << "v=" << v; std::string r = s.str(); r.copy(buf, r.size()); buf[r.size()] = 0; return (int)r.size(); }\n' > $src
for flags in "-O2 -std=c++20" "-O2 -std=c++20 -fvisibility=hidden" "-O2 -std=c++17 -fvisibility=hidden -D_GLIBCXX_USE_CXX11_ABI=1"; do
  g++ -shared -fPIC $flags $src -o /tmp/fmt.so && printf "%-60s %s\n" "$flags" "$(nm -C /tmp/fmt.so | grep -c ' W .*_M_insert<long>') weak copies"
  python3 -X faulthandler -c "import torch, ctypes; b = ctypes.create_string_buffer(64); ctypes.CDLL('/tmp/fmt.so').fmt(42, b); print('  ->', b.value)" 2>&1 | tail -n 3
done
echo "--- torch load_inline extension (torch's flags) formatting c10::str(42L)"
timeout 240 python3 -X faulthandler - <<'PY' 2>&1 | tail -n 6
import torch
from torch.utils.cpp_extension import load_inline
m = load_inline("fmt_inline", "#include <c10/util/StringUtil.h>\nstd::string fmt(int64_t v) { return c10::str(\"v=\", v); }",
                functions=["fmt"], build_directory=None, verbose=False)
print("load_inline ->", m.fmt(42))
PY
