# SPDX-License-Identifier: Apache-2.0
"""Machine-code checks of the built kernels, runnable without a GPU.

ptxas 13.0 once compiled the D = 64 warpgroup (wgmma) instance of the verification kernel so
that the registers holding the Q fragments, loaded once before the KV loop, were reused for
other values inside it: every tile after the first then multiplied garbage by K (relative
errors up to 0.7 on the H200). It happened when a branch sat between the two warpgroup MMAs of
a loop iteration. This test reads the sm_90a SASS of libdustin and checks, for every wgmma
instance, that nothing inside the KV loop writes the A-operand registers of the Q K^T MMAs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import dustin
import pytest

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA (?:!?U?P\d, )?0x([0-9a-f]+)")
QK_MMA = re.compile(r"^HGMMA\S*\s+R\d+, R(\d+), gdesc\[UR\d+\](?!\.tnspB)")
DEST = re.compile(r"^(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s+R(\d+)\b")


def cuobjdump() -> str | None:
    """cuobjdump from PATH, CUDA_HOME, or the copy Triton's wheel carries."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    cuda = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
    if cuda.exists():
        return str(cuda)
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Instructions (address, text) of each function in a cuobjdump -sass listing."""
    out: dict[str, list[tuple[int, str]]] = {}
    name = None
    for line in sass.splitlines():
        if "Function : " in line:
            name = line.split("Function : ")[1].strip()
            out[name] = []
        elif name and (m := INSTRUCTION.search(line)):
            out[name].append((int(m.group(1), 16), m.group(2)))
    return out


def written_registers(text: str) -> range:
    """General registers an instruction writes (its first operand), by the width it names."""
    m = DEST.match(text)
    if not m or m.group(1).startswith(("ST", "RED", "ATOM", "HGMMA", "BAR", "WARP")):
        return range(0)
    opcode, first = m.group(1), int(m.group(2))
    width = (
        4 if (".128" in opcode or ".4" in opcode) else 2 if re.search(r"\.64|WIDE", opcode) else 1
    )
    return range(first, first + width)


def q_fragment_clobbers(code: list[tuple[int, str]]) -> tuple[set[int], list[str]]:
    """The Q K^T MMAs' A registers inside the KV loop, and the loop's other writes to them."""
    qk = [a for a, t in code if QK_MMA.match(t)]
    assert qk, "no Q K^T warpgroup MMA found"
    loops = [
        (int(m.group(1), 16), a)
        for a, t in code
        if (m := BRANCH.search(t)) and int(m.group(1), 16) <= min(qk) < a
    ]
    assert loops, "no loop around the Q K^T warpgroup MMA"
    head, tail = min(h for h, _ in loops), max(t for _, t in loops)
    body = [(a, t) for a, t in code if head <= a <= tail]
    q_regs = {
        r
        for _, t in body
        if (m := QK_MMA.match(t))
        for r in range(int(m.group(1)), int(m.group(1)) + 4)
    }
    clobbers = [f"{a:#x}: {t}" for a, t in body if q_regs.intersection(written_registers(t))]
    return q_regs, clobbers


@pytest.fixture(scope="module")
def sm90_sass() -> str:
    if not dustin.built_with_cuda():
        pytest.skip("libdustin was built without CUDA")
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's wheel) to read the SASS with")
    library = Path(dustin.__file__).parent / "libdustin.so"
    listing = subprocess.run(
        [tool, "-sass", "-arch", "sm_90a", str(library)],
        check=False,
        capture_output=True,
        text=True,
    )
    if listing.returncode != 0 or "Function : " not in listing.stdout:
        pytest.skip(f"libdustin.so holds no sm_90a code: {listing.stderr.strip()[:200]}")
    return listing.stdout


def test_wgmma_verification_kernels_keep_their_q_fragments(sm90_sass):
    kernels = {
        name: code
        for name, code in functions(sm90_sass).items()
        if "sparse_verify_kernel" in name and any(QK_MMA.match(t) for _, t in code)
    }
    # bf16 and fp16, D = 64 and 128: the 64-row warpgroup instances.
    assert len(kernels) >= 4, f"expected 4 wgmma instances, found {sorted(kernels)}"
    for name, code in kernels.items():
        q_regs, clobbers = q_fragment_clobbers(code)
        assert q_regs, name
        assert not clobbers, f"{name}: the KV loop overwrites Q fragment registers: {clobbers[:4]}"


def test_checker_finds_a_clobbered_q_fragment():
    """The checker itself, on a hand-made loop whose second Q K^T reads a clobbered register."""
    code = [
        (0x10, "LDSM.16.M88.4 R88, [R27]"),
        (0x20, "HGMMA.64x64x16.F32.BF16 R24, R88, gdesc[UR4], RZ, !UPT, gsb0"),
        (0x30, "@P0 IMAD R89, R121, 0x4, R0"),
        (0x40, "HGMMA.64x64x16.F32.BF16 R56, R100, gdesc[UR4].tnspB, R56, gsb0"),
        (0x50, "@!P0 BRA 0x20"),
    ]
    q_regs, clobbers = q_fragment_clobbers(code)
    assert q_regs == {88, 89, 90, 91}
    assert clobbers == ["0x30: @P0 IMAD R89, R121, 0x4, R0"]
    assert q_fragment_clobbers(code[:2] + code[3:])[1] == []


def test_decode_linear_streams_its_weights_in_16_byte_loads(sm90_sass):
    """Every decode_linear instance: its global loads are 16-byte vectors (the weights with L1
    no-allocate), but for the bias and residual; products on the tensor cores in the input's
    type; nothing in local memory (the batches' register arrays stay in registers)."""
    kernels = {
        name: code for name, code in functions(sm90_sass).items() if "decode_linear_kernel" in name
    }
    assert len(kernels) == 8, f"expected bf16/fp16 x plain/gated x normed, found {sorted(kernels)}"
    for name, code in kernels.items():
        opcodes = [t.split()[0] for _, t in code if not t.startswith("@")] + [
            t.split()[1] for _, t in code if t.startswith("@")
        ]
        loads = [op for op in opcodes if op.startswith("LDG")]
        narrow = [op for op in loads if ".128" not in op and op != "LDG.E.U16"]
        assert not narrow, f"{name}: loads narrower than 16 bytes: {narrow}"
        assert any(".NA.128" in op for op in loads), f"{name}: no L1-bypassing weight loads"
        mma = "HMMA.16816.F32.BF16" if "bfloat16" in name else "HMMA.16816.F32"
        assert mma in opcodes, f"{name}: no {mma}"
        spills = [op for op in opcodes if op.startswith(("LDL", "STL"))]
        assert not spills, f"{name}: local memory: {spills}"
