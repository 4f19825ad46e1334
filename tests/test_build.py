# SPDX-License-Identifier: Apache-2.0
"""The build promises: CI runs the README's test command, and compiles the CUDA code."""

import os
import re
from pathlib import Path

import pytest

import dustin

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md must open with a bash block holding the two commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    main_job, test_command = _readme_commands()[:2]
    assert "pytest" in test_command and "pytest" not in main_job
    assert test_command in (ROOT / ".ci" / "run").read_text()


@pytest.mark.skipif(
    not (os.environ.get("CI") and Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc").exists()),
    reason="checks the CI build only: needs CI=1 and nvcc",
)
def test_ci_build_compiled_the_cuda_kernels():
    assert dustin.built_with_cuda(), "nvcc is present but libdustin was built without CUDA"
