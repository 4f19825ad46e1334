# SPDX-License-Identifier: Apache-2.0
"""Quality evaluation on tiny random models: metrics on constructed cases, Quest, the CLI run."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from dustin.cache import PagedKVCache
from dustin.evaluate import (
    Variant,
    Window,
    cut_windows,
    free_running,
    prefill_window,
    teacher_forced,
)
from dustin.model import BlockSelection
from dustin.policies import Dense, PairConfig, Quest, Streaming, make_policy
from dustin.quality_metrics import attended_blocks, paired_difference
from dustin.quality_report import target_checks
from dustin.spec import DecodeOptions
from tiny_models import load_tiny, save_tiny, tiny_tokenizer

CONTEXT = 96
GAMMA = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    target = load_tiny(save_tiny(root / "target", "qwen2", "target", seed=1))
    draft = load_tiny(save_tiny(root / "draft", "qwen2", "draft", seed=2))
    return target, draft


def _windows(count: int, length: int) -> list[Window]:
    g = torch.Generator().manual_seed(7)
    return [
        Window("random", i, CONTEXT, tuple(torch.randint(0, 96, (length,), generator=g).tolist()))
        for i in range(count)
    ]


def test_attended_blocks_lists_selection_and_window():
    # kv_lens 20 with a window of 4 at P = 4: the window is block 4; blocks 0 and 2 are listed.
    selection = BlockSelection(
        torch.tensor([[0, 2, -1]], dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
    )
    blocks = attended_blocks(selection, torch.tensor([20], dtype=torch.int32), 4, 4, 5)
    assert blocks.tolist() == [[[True, False, True, False, True]]]
    assert attended_blocks(None, torch.tensor([20], dtype=torch.int32), 4, 4, 5).all()


def test_quest_picks_the_page_with_the_largest_key_bound():
    cache = PagedKVCache(1, 2, 8, 1, 256, page_size=16)
    cache.append(160)
    keys = torch.randn(1, 160, 2, 8) * 0.1
    keys[0, 50, 0] = 3.0  # page 3 of KV head 0 holds one key aligned with the queries
    keys[0, 90, 1] = 3.0  # page 5 of KV head 1
    cache.write(0, keys, keys)
    q = torch.ones(1, 4, 4, 8)  # 4 query heads, 2 per KV head
    quest = Quest(budget_tokens=32, n_sink=0, n_recent=0)  # the window block and one free block
    selection = quest.select_layer(q, cache.k(0), cache.block_table, cache.kv_lens, 16, "HND")
    ids, counts = selection.block_ids, selection.block_counts
    assert counts.tolist() == [[2, 2]]
    assert ids[0, 0, :2].tolist() == [3, 9] and ids[0, 1, :2].tolist() == [5, 9]
    with pytest.raises(NotImplementedError, match="select_layer"):
        quest.select(None, cache.kv_lens, 4, 16)


def test_paired_difference_cancels_shared_noise():
    a = [3.0, 0.0, 4.0, 1.0]
    b = [2.0, 0.0, 3.0, 1.0]  # a - b = 1, 0, 1, 0
    diff, stderr = paired_difference(a, b)
    assert diff == pytest.approx(0.5)
    assert stderr == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))
    assert math.isnan(paired_difference([1.0], [0.0])[1])
    with pytest.raises(ValueError, match="3 samples against 2"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])


def _row(accepted: list[int]) -> dict:
    mean = sum(accepted) / len(accepted) + 1.0
    return {"mean_accepted_length": mean, "retention": mean / 2.0, "accepted_per_step": accepted}


def test_target_checks_say_whether_a_rival_lead_is_noise():
    mine = [1, 0, 2, 1, 1, 0, 2, 1]
    rows = {
        "dustin/b512/p16": _row(mine),
        "quest/b512/p16": _row([1, 0, 2, 1, 1, 0, 2, 2]),  # ahead by one draft in eight
        "streaming/b512/p16": _row([0, 0, 1, 1, 0, 0, 1, 1]),
    }
    lines = target_checks({"teacher_forced": rows}, 512, 16)
    policies = next(line for line in lines if "more than every other policy" in line)
    assert "MISSED" in policies and "within two standard errors" in policies
    assert "(Dustin - quest -0.125 ± 0.125)" in policies
    rows["quest/b512/p16"] = _row([2, 1, 3, 2, 2, 1, 3, 2])  # ahead at every step
    lines = target_checks({"teacher_forced": rows}, 512, 16)
    policies = next(line for line in lines if "more than every other policy" in line)
    assert "MISSED" in policies and "two standard errors or more" in policies
    rows["quest/b512/p16"] = _row(list(mine))  # a tie (identical picks) is no lead
    lines = target_checks({"teacher_forced": rows}, 512, 16)
    policies = next(line for line in lines if "more than every other policy" in line)
    assert "MISSED" in policies and "within two standard errors" in policies
    rows["quest/b512/p16"] = _row([0] * 8)
    lines = target_checks({"teacher_forced": rows}, 512, 16)
    policies = next(line for line in lines if "more than every other policy" in line)
    assert policies.endswith("more than every other policy: met")


def test_cut_windows_come_from_inside_the_text():
    tok = tiny_tokenizer()
    windows = cut_windows(tok, ["persuasion"], 100, 20, per_text=2)
    total = len(tok.encode(__import__("dustin.texts").texts.load_text("persuasion")).ids)
    assert [w.start for w in windows] == [total // 4, total // 2]
    assert all(len(w.tokens) == 120 and len(w.prompt) == 100 for w in windows)
    with pytest.raises(ValueError, match="needs"):
        cut_windows(tok, ["persuasion"], total, 20)


def test_dense_draft_equal_to_target_and_whole_context_budgets(models):
    target, _ = models
    # The target drafting for itself: dense verification accepts every draft.
    windows = [prefill_window(target, target, w) for w in _windows(2, CONTEXT + 8 * (GAMMA + 1))]
    pair = PairConfig.default_for(target.config, target.config)
    whole = 4 * CONTEXT  # budget past the whole context: sparse verification is dense
    variants = [Variant("dense", Dense(), 16)]
    variants += [Variant(f"dustin/p{p}", make_policy("dustin", pair, whole), p) for p in (1, 16)]
    variants += [
        Variant("quest", Quest(budget_tokens=whole), 16),
        Variant("streaming-small", Streaming(budget_tokens=16), 16),
    ]
    result = teacher_forced(target, target, windows, variants, gamma=GAMMA, steps=6)
    dense = result.dense
    assert dense["mean_accepted_length"] == GAMMA + 1 and dense["acceptance_rate"] == 1.0
    assert dense["attention_recall"] == 1.0 and dense["steps"] == 12
    for label in ("dense", "dustin/p1", "dustin/p16", "quest"):
        r = result.summaries[label]
        assert r["retention"] == 1.0 and r["top1_agreement_with_dense"] == 1.0, label
        assert r["attention_recall"] == pytest.approx(1.0, abs=1e-5), label
        assert r["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-4), label
        assert r["kv_read_share"] == pytest.approx(1.0), label
    small = result.summaries["streaming-small"]
    assert small["attention_recall"] < 0.99 and small["kv_read_share"] < 0.5
    assert math.isfinite(small["perplexity"])


def test_teacher_forced_rejects_short_windows(models):
    target, draft = models
    windows = [prefill_window(target, draft, w) for w in _windows(1, CONTEXT + 4)]
    with pytest.raises(ValueError, match="continuation tokens"):
        teacher_forced(target, draft, windows, [], gamma=GAMMA, steps=3)


def test_free_running_against_dense(models, tmp_path):
    target, draft = models
    stored = [prefill_window(target, draft, w, tmp_path, "tiny") for w in _windows(1, CONTEXT + 40)]
    again = prefill_window(target, draft, stored[0].window, tmp_path, "tiny")  # from the store
    assert torch.equal(again.target_kv[2][1], stored[0].target_kv[2][1])
    pair = PairConfig.default_for(draft.config, target.config)
    variants = [
        Variant("dustin/b112/p16", make_policy("dustin", pair, 112), 16),  # the whole final context
        Variant("streaming/b16/p1", make_policy("streaming", pair, 16), 1),
        Variant("quest/b16/p16", Quest(budget_tokens=16), 16),  # not runnable in the engine's loop
    ]
    results = free_running(
        target, draft, stored, variants, DecodeOptions(max_new_tokens=12, gamma=GAMMA)
    )
    assert set(results) == {"dense", "dustin/b112/p16", "streaming/b16/p1"}
    assert results["dense"]["agreement_with_dense"] == 1.0 and results["dense"]["retention"] == 1.0
    whole = results["dustin/b112/p16"]
    assert whole["agreement_with_dense"] == 1.0 and whole["tokens"] == results["dense"]["tokens"]
    assert results["streaming/b16/p1"]["kv_read_share"] < 0.5


def eval_command(tmp_path, options: str):
    """``dustin eval``'s parser and the arguments for a tiny checkpoint pair plus `options`,
    writing to ``tmp_path / "out"`` on the CPU."""
    from dustin import quality_cli

    root = tmp_path / "ckpt"
    target = save_tiny(root / "target", "llama", "target", seed=3, max_position_embeddings=1024)
    draft = save_tiny(root / "draft", "llama", "draft", seed=4, max_position_embeddings=1024)
    parser = argparse.ArgumentParser()
    quality_cli.add_arguments(parser)
    args = parser.parse_args(
        f"--target {target} --draft {draft} --texts emma --steps 2 --gamma 2 --main-budget 32 "
        f"--out-dir {tmp_path / 'out'} --no-progress --device cpu {options}".split()
    )
    return parser, args


def test_eval_command_writes_results(models, tmp_path):
    from dustin import quality_cli

    out = tmp_path / "out"
    parser, args = eval_command(
        tmp_path,
        "--context 80 --budgets 16,32 --block-sizes 1,16 --free-tokens 4 "
        f"--policies dense,dustin,dustin-default,streaming,quest --store {tmp_path / 'store'}",
    )
    assert quality_cli.run(args) == 0
    data = json.loads((out / "quality-cpu-80.json").read_text())
    rows = data["results"]["80"]["teacher_forced"]
    assert set(rows) == {
        f"{p}/b{b}/p{s}"
        for p in ("dustin", "dustin-default", "streaming", "quest")
        for b, s in ((16, 16), (32, 16), (32, 1))
    }
    assert set(data["results"]["80"]["free_running"]) == {
        "dense",
        "dustin/b32/p16",
        "dustin-default/b32/p16",
        "streaming/b32/p16",
    }
    markdown = (out / "quality-cpu-80.md").read_text()
    assert (
        "training data" in markdown
        and "| quest | 32 | 1 |" in markdown
        and "Issue 6 targets" in markdown
    )
    assert (out / "quality-cpu-80-ctx80.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--policies", "dense,nonsense"])


def test_eval_command_keeps_finished_contexts_when_cut_short(models, tmp_path, monkeypatch):
    """A run that fails in its second context still leaves the first one's results on disk."""
    from dustin import quality_cli

    _, args = eval_command(
        tmp_path,
        "--contexts 80,96 --budgets 32 --block-sizes 16 --free-tokens 0 --policies dense,dustin "
        "--no-store --tag cut",
    )
    real = quality_cli.teacher_forced

    def fails_at_96(target, draft, windows, *rest, **kwargs):
        if windows[0].window.context == 96:
            raise RuntimeError("cut short")
        return real(target, draft, windows, *rest, **kwargs)

    monkeypatch.setattr(quality_cli, "teacher_forced", fails_at_96)
    with pytest.raises(RuntimeError, match="cut short"):
        quality_cli.run(args)
    data = json.loads((tmp_path / "out" / "quality-cut.json").read_text())
    assert set(data["results"]) == {"80"}
    assert set(data["results"]["80"]["teacher_forced"]) == {"dustin/b32/p16"}
