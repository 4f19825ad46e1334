# SPDX-License-Identifier: Apache-2.0
"""Calibration: head ranking on constructed attention, greedy layers, and a valid config file."""

from __future__ import annotations

import argparse
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from dustin.calibrate import add_arguments, calibrate, choose_heads, head_recall, run, write_config
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
    # The config is the best candidate on the objective, so never below the defaults.
    objective = search["objective_values"]
    chosen = report["chosen"]["candidate"]
    assert objective[chosen] == max(objective.values())
    assert objective[chosen] >= objective["default/share=0.5"]
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
