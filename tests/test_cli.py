# SPDX-License-Identifier: Apache-2.0
"""``dustin generate``: help, option errors and an end-to-end run on tiny local checkpoints."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from dustin.cli import main
from tiny_models import VOCAB, save_tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    target = save_tiny(tmp_path_factory.mktemp("target"), "qwen2", "target", seed=0)
    draft = save_tiny(tmp_path_factory.mktemp("draft"), "qwen2", "target", seed=0, noise=0.1)
    prompt = tmp_path_factory.mktemp("text") / "prompt.txt"
    prompt.write_text(" ".join(f"w{(i * 7) % VOCAB}" for i in range(1000)))
    return target, draft, prompt


def test_help_documents_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "dustin", "generate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in (
        "--target",
        "--draft",
        "--context",
        "--batch-size",
        "--max-new-tokens",
        "--gamma",
        "--temperature",
        "--budget",
        "--page-size",
        "--pair-config",
        "--methods",
        "--device",
        "--dtype",
        "--kv-layout",
        "--seed",
        "--no-progress",
    ):
        assert option in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gamma", "16"], "--gamma must be in \\[1, 15\\]"),
        (["--methods", "plain,fast"], "unknown: fast"),
        (["--context", "0"], "must be a positive integer"),
        (["--page-size", "200"], "--page-size must be in \\[1, 128\\]"),
        (["--target", "/nonexistent/model"], "/nonexistent/model does not exist"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
    ],
)
def test_invalid_options_exit_with_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_target_without_draft_is_refused(tiny_pair, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--target", str(tiny_pair[0])])
    assert "--target and --draft go together" in capsys.readouterr().err


def _run(tiny_pair, *extra):
    target, draft, prompt = tiny_pair
    return main(
        [
            "generate",
            "--target",
            str(target),
            "--draft",
            str(draft),
            "--prompt-file",
            str(prompt),
            "--device",
            "cpu",
            "--context",
            "96",
            "--max-new-tokens",
            "10",
            "--page-size",
            "4",
            "--no-progress",
            *extra,
        ]
    )


def test_generate_prints_the_comparison_table(tiny_pair, capsys):
    assert (
        _run(
            tiny_pair,
            "--batch-size",
            "2",
            "--budget",
            "32",
            "--methods",
            "plain,dense,dustin,streaming",
        )
        == 0
    )
    out = capsys.readouterr().out
    methods = ("plain", "dense", "dustin", "streaming")
    rows = {
        cells[0]: cells
        for cells in map(str.split, out.splitlines())
        if cells[:1] and cells[0] in methods
    }
    assert set(rows) == {"plain", "dense", "dustin", "streaming"}
    assert rows["dense"][4] == "100.0%" and rows["dense"][5] == "100.0%"  # same as dense, KV read
    assert rows["plain"][5] == "100.0%"  # greedy plain decoding equals dense verification
    assert float(rows["dustin"][-1].rstrip("%")) < 100.0
    assert "uncalibrated retrieval heads" in out  # no --pair-config for a custom pair


def test_request_errors_are_reported_not_raised(tiny_pair, tmp_path, capsys):
    assert _run(tiny_pair, "--context", "600") == 2  # longer than the tiny models' 512 positions
    assert "more than the target's context (512)" in capsys.readouterr().err
    assert _run(tiny_pair, "--budget", "100000") == 2
    assert "larger than the context" in capsys.readouterr().err
    other = tmp_path / "other"
    save_tiny(other, "qwen2", "target", tokenizer=tiny_tokenizer(VOCAB - 1))
    target, _, prompt = tiny_pair
    code = main(
        [
            "generate",
            "--target",
            str(target),
            "--draft",
            str(other),
            "--prompt-file",
            str(prompt),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 2 and "tokenizers differ" in capsys.readouterr().err
