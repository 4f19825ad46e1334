# SPDX-License-Identifier: Apache-2.0
"""The commit written into result files."""

import re
import shutil

import pytest
from dustin.provenance import source_commit


def test_environment_names_the_commit(monkeypatch):
    monkeypatch.setenv("DUSTIN_COMMIT", "0123456789ab (recorded in .dustin-commit)")
    assert source_commit() == "0123456789ab (recorded in .dustin-commit)"


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_names_the_commit_of_this_tree(monkeypatch):
    monkeypatch.delenv("DUSTIN_COMMIT", raising=False)
    commit = source_commit()
    if commit == "unknown" or "recorded" in commit:
        pytest.skip(f"this copy of the tree has no usable .git ({commit})")
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?", commit), commit
