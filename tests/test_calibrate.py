# SPDX-License-Identifier: Apache-2.0
"""Calibration: head ranking on constructed attention, greedy layers, and a valid config file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from types import SimpleNamespace

import pytest
import torch
from dustin.calibrate import (
    add_arguments,
    adopt_over_defaults,
    calibrate,
    choose_heads,
    head_recall,
    run,
    write_config,
)
from dustin.evaluate import Window, prefill_window
from dustin.policies import PairConfig
from tiny_models import load_tiny, save_tiny

P = 16
# One free block beside the window's: sinks and recent off so a head's choice decides recall.
PAIR = PairConfig(
    draft_heads=((0, 0),), target_heads=((0, 0),), budget_tokens=2 * P, n_sink=0, n_recent=0
)


def _step(scores: torch.Tensor) -> dict:
    """A step with 8 blocks of 16 tokens: the window (q_len 1) is block 7; true mass 0.8 on
    block 3 and 0.2 on the window."""
    mass = torch.zeros(1, 8)
    mass[0, 3], mass[0, 7] = 0.8, 0.2
    return {
        "draft": scores,
        "target": scores,
        "mass": mass,
        "kv_lens": torch.tensor([128], dtype=torch.int32),
        "q_len": 1,
    }


def _peaked(blocks: list[int]) -> torch.Tensor:
    """``[1, H, 8]`` scores, head i peaking on ``blocks[i]``."""
    scores = torch.full((1, len(blocks), 8), 0.01)
    for head, block in enumerate(blocks):
        scores[0, head, block] = 1.0
    return scores


def test_head_recall_ranks_the_head_that_finds_the_mass():
    data = [_step(_peaked([5, 3, 0]))]
    recall = head_recall(data, "draft", None, PAIR, P)
    assert recall.tolist() == pytest.approx([0.2, 1.0, 0.2])
    assert float(head_recall(data, "target", [0, 2], PAIR, P)) == pytest.approx(0.2)


def test_choose_heads_takes_the_layer_of_the_best_head():
    # Two layers of two heads: flat ids 0, 1 (layer 0) and 2, 3 (layer 1); head (1, 1) finds it.
    data = [_step(_peaked([5, 6, 0, 3]))]
    model = SimpleNamespace(config=SimpleNamespace(num_heads=2, num_layers=2))
    heads, report = choose_heads(data, "draft", model, PAIR, P, heads_per_layer=1, max_layers=2)
    assert heads == ((1, 1),)  # adding layer 0 gains nothing, so the greedy search stops
    assert report["greedy_layers"][0] == {"layer": 1, "heads": [1], "recall": pytest.approx(1.0)}
    assert report["best_single_heads"][0]["layer"] == 1
    # With no minimum gain the search takes layer 0 too: its gain of 0 is not below 0.
    heads, _ = choose_heads(
        data, "draft", model, PAIR, P, heads_per_layer=1, max_layers=2, min_gain=0.0
    )
    assert len(heads) == 2 and (1, 1) in heads


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--min-gain 1.5", "--min-gain must be in"),
        ("--head-steps 0", "--head-steps must be >= 1"),
        ("--shares 0.5,x", "--shares must be comma-separated"),
    ],
)
def test_calibrate_command_rejects_bad_options(option, message):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match=message):
        run(parser.parse_args(option.split()))


def _summary(accepted):
    return {"accepted_per_step": accepted}


def test_a_winner_replaces_the_defaults_only_by_a_margin_that_survives_the_search():
    rng = random.Random(5)
    base = [rng.choice((0, 1, 2, 3)) for _ in range(256)]
    noise = [b + rng.choice((-1, 0, 0, 1)) for b in base]  # no real lead
    lead = [b + 1 for b in base]  # one more draft at every step
    summaries = {"default": _summary(base), "noise": _summary(noise), "lead": _summary(lead)}
    adopted, why = adopt_over_defaults(summaries, "lead", "default", comparisons=10)
    assert adopted and why["lead"] == 1.0 and why["lead_stderr"] == 0.0
    # The margin grows with the candidates tried: 1.96 for one, 2.81 for ten.
    assert abs(why["margin_z"] - 2.807) < 1e-3
    _, one = adopt_over_defaults(summaries, "lead", "default", comparisons=1)
    assert abs(one["margin_z"] - 1.960) < 1e-3
    # A lead of between two and three standard errors (the H200's 32k calibration: 0.090 +-
    # 0.034) is adopted against one comparison and not against ten: one more draft at 41 steps,
    # one fewer at 23.
    slight = [b + (1 if i < 41 else -1 if i < 64 else 0) for i, b in enumerate(base)]
    summaries["slight"] = _summary(slight)
    _, stats = adopt_over_defaults(summaries, "slight", "default", comparisons=10)
    z = stats["lead"] / stats["lead_stderr"]
    assert 1.96 < z < 2.81, f"the case must sit between the two margins, got z = {z:.2f}"
    assert adopt_over_defaults(summaries, "slight", "default", comparisons=1)[0]
    assert not adopt_over_defaults(summaries, "slight", "default", comparisons=10)[0]
    # The defaults themselves are never "adopted over" themselves; a loss is never adopted.
    assert not adopt_over_defaults(summaries, "default", "default", comparisons=10)[0]
    worse = {"default": _summary(lead), "base": _summary(base)}
    assert not adopt_over_defaults(worse, "base", "default", comparisons=1)[0]


def test_calibrate_writes_a_loadable_config(tmp_path):
    target = load_tiny(save_tiny(tmp_path / "target", "qwen2", "target", seed=1))
    draft = load_tiny(save_tiny(tmp_path / "draft", "qwen2", "draft", seed=2))
    g = torch.Generator().manual_seed(3)
    windows = [
        prefill_window(
            target,
            draft,
            Window("random", 0, 96, tuple(torch.randint(0, 96, (96 + 13,), generator=g).tolist())),
        )
    ]
    config, report = calibrate(
        target,
        draft,
        windows,
        gamma=3,
        head_steps=3,
        share_steps=3,
        budget_tokens=32,
        shares=(0.0, 1.0),
        max_layers=2,
    )
    config.check(draft.config, target.config)
    assert config.budget_tokens == 32
    search = report["share_search"]
    # Both head sets at every share; the defaults also at their own share (0.5).
    assert set(search["results"]) == {
        "chosen/share=0",
        "chosen/share=1",
        "default/share=0",
        "default/share=0.5",
        "default/share=1",
    }
    # The config is the best candidate on the objective when its lead is adopted, else the
    # defaults as they are: never below the defaults.
    objective = search["objective_values"]
    chosen = report["chosen"]["candidate"]
    adoption = report["adoption"]
    assert objective[adoption["best"]] == max(objective.values())
    assert chosen == (adoption["best"] if adoption["adopted"] else "default/share=0.5")
    assert objective[adoption["best"]] >= objective["default/share=0.5"]
    heads, share = chosen.split("/share=")
    assert config.draft_share == float(share)
    if heads == "chosen":
        assert 1 <= len({layer for layer, _ in config.draft_heads}) <= 2
    else:
        default = PairConfig.default_for(draft.config, target.config)
        assert (config.draft_heads, config.target_heads) == (
            default.draft_heads,
            default.target_heads,
        )
    path = tmp_path / "pair.json"
    write_config(config, path)
    assert PairConfig.load(path) == config
    assert json.loads(path.read_text())["note"].startswith("calibrated by `dustin calibrate`")
    with pytest.raises(ValueError, match="shares"):
        calibrate(target, draft, windows, shares=(1.5,))
    bad = dataclasses.asdict(config) | {"draft_heads": [[0, 0]], "extra": 1}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown keys"):
        PairConfig.load(path)
