# SPDX-License-Identifier: Apache-2.0
"""Tensor-parallel decoding on 2 gloo processes equals single-process decoding token for token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dustin.checkpoint import load_checkpoint
from dustin.cli import main
from dustin.fast import GraphDecoder
from dustin.model import Transformer
from dustin.parallel import TensorParallel, init_from_env, shard_state_dict, sharded_model
from dustin.policies import Dense, Dustin
from dustin.spec import DecodeOptions, autoregressive_decode, prefill, speculative_decode
from tiny_models import VOCAB, load_tiny, save_tiny

WORLD_SIZE = 2
TIMEOUT_S = 120  # a rank stuck in a collective fails the test instead of hanging it
FAMILIES = ("llama", "qwen2")
PROMPT_LENS = (37, 52, 18)
OPTIONS = DecodeOptions(max_new_tokens=14, gamma=3)
PAGE_SIZE = 4
# Target heads on both ranks (4 query heads, 2 per rank): layer 1 only on rank 0, layer 2 only
# on rank 1, so the history scores need both ranks' parts (test_history_needs_both_ranks_heads).
DRAFT_HEADS, TARGET_HEADS = ((0, 1),), ((1, 0), (2, 3))
BUDGET = {"budget_tokens": 24, "n_sink": 4, "n_recent": 4}
POLICIES = {"dense": Dense(), "dustin": Dustin(DRAFT_HEADS, TARGET_HEADS, **BUDGET)}
# Dynamo's tracing and AOTAutograd without code generation: the compiled regions' structure
# (which ops, where the collectives sit) at a fraction of inductor's compile time.
COMPILE_BACKEND = "aot_eager"


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _decode(target: Transformer, draft: Transformer) -> dict[str, dict]:
    """Every method's tokens and step counts on the test prompts; "graph-dustin" is the
    static-buffer decoder of ``dustin.fast`` (direct calls on a CPU)."""
    state = prefill(target, draft, _prompts(), OPTIONS, page_size=PAGE_SIZE)
    results = {"plain": autoregressive_decode(target, state.fork(), OPTIONS)}
    for name, policy in POLICIES.items():
        results[name] = speculative_decode(target, draft, state.fork(), policy, OPTIONS)
    out = {
        name: {
            "tokens": r.tokens,
            "verifications": r.verifications,
            "emitted_per_verification": r.emitted_per_verification,
            "kv_read_share": r.kv_read_share,
        }
        for name, r in results.items()
    }
    fork = state.fork()
    decoder = GraphDecoder(
        target,
        fork.target_cache,
        draft,
        fork.draft_cache,
        POLICIES["dustin"],
        gamma=OPTIONS.gamma,
        max_new_tokens=OPTIONS.max_new_tokens,
    )
    decoder.start_from(fork)
    graph = decoder.generate()
    out["graph-dustin"] = {
        "tokens": graph.tokens,
        "verifications": graph.steps,
        "emitted_per_verification": graph.emitted_per_step,
    }
    return out


def _rank(rank: int, store: str, dirs: dict[str, list[str]], out: str, compiled: bool) -> None:
    """One rank: shard each family's target, keep the draft whole, decode (with the layer glue
    compiled when ``compiled``); rank 0 writes."""
    torch.set_num_threads(1)
    # A file store, not a TCP port: a free port picked by the parent can be taken before the
    # ranks bind it.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for family, (target_dir, draft_dir) in dirs.items():
            config, state_dict, _ = load_checkpoint(Path(target_dir))
            target = sharded_model(TensorParallel(config, rank, WORLD_SIZE), state_dict)
            assert target.config.num_kv_heads == config.num_kv_heads // WORLD_SIZE
            draft = load_tiny(Path(draft_dir))
            if compiled:
                target.compile_layers(COMPILE_BACKEND), draft.compile_layers(COMPILE_BACKEND)
            results[family] = _decode(target, draft)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, list[str]]:
    """family -> [target dir, draft dir]; the draft is the target with 10% weight noise, so
    steps accept some drafts and roll the caches back past the rest."""
    dirs = {}
    for family in FAMILIES:
        target = save_tiny(tmp_path_factory.mktemp(f"{family}-target"), family, "target", seed=0)
        draft = save_tiny(
            tmp_path_factory.mktemp(f"{family}-draft"), family, "target", seed=0, noise=0.1
        )
        dirs[family] = [str(target), str(draft)]
    return dirs


def _run_ranks(dirs: dict[str, list[str]], folder: Path, compiled: bool) -> dict:
    """``_rank`` on WORLD_SIZE spawned processes; rank 0's results."""
    out = folder / "results.json"
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # children inherit it; gloo ignores it
    context = mp.start_processes(
        _rank,
        args=(str(folder / "store"), dirs, str(out), compiled),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"tensor-parallel ranks did not finish within {TIMEOUT_S} s")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def parallel_results(pairs, tmp_path_factory) -> dict:
    return _run_ranks(pairs, tmp_path_factory.mktemp("tp"), compiled=False)


@pytest.fixture(scope="module")
def single_results(pairs) -> dict:
    return {
        family: _decode(load_tiny(Path(target)), load_tiny(Path(draft)))
        for family, (target, draft) in pairs.items()
    }


@pytest.mark.parametrize("method", ["plain", *POLICIES, "graph-dustin"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_equals_one_process(single_results, parallel_results, family, method):
    alone = single_results[family][method]
    together = parallel_results[family][method]
    assert together["tokens"] == alone["tokens"]
    assert all(len(t) == OPTIONS.max_new_tokens for t in alone["tokens"])
    assert together["verifications"] == alone["verifications"]
    if "kv_read_share" in alone:
        assert together["kv_read_share"] == pytest.approx(alone["kv_read_share"])
    if method != "plain":  # drafts were rejected and rolled back, not all accepted
        assert 1.0 < alone["emitted_per_verification"] < OPTIONS.gamma + 1
    if method == "dustin":  # the selection was sparse, so the scores mattered
        assert alone["kv_read_share"] < 0.8


def test_compiled_tensor_parallel_equals_compiled_one_process(pairs, tmp_path_factory):
    """Compiled layer glue on tensor-parallel ranks (all-reduces outside the compiled regions)
    decodes what one compiled process does; Qwen2 for its fused q/k/v biases."""
    dirs = {"qwen2": pairs["qwen2"]}
    together = _run_ranks(dirs, tmp_path_factory.mktemp("tp-compiled"), compiled=True)["qwen2"]
    target, draft = (load_tiny(Path(d)) for d in dirs["qwen2"])
    target.compile_layers(COMPILE_BACKEND), draft.compile_layers(COMPILE_BACKEND)
    alone = _decode(target, draft)
    for method in ("plain", *POLICIES, "graph-dustin"):
        assert together[method]["tokens"] == alone[method]["tokens"], method
        assert together[method]["verifications"] == alone[method]["verifications"], method


def test_history_needs_both_ranks_heads(pairs, single_results):
    """Scoring with one rank's heads alone changes the output: the test above would catch a
    rank that selected blocks from its own part of the history scores."""
    target, draft = (load_tiny(Path(d)) for d in pairs["llama"])
    state = prefill(target, draft, _prompts(), OPTIONS, page_size=PAGE_SIZE)
    for heads in TARGET_HEADS:
        policy = Dustin(DRAFT_HEADS, (heads,), **BUDGET)
        one_rank = speculative_decode(target, draft, state.fork(), policy, OPTIONS)
        assert one_rank.tokens != single_results["llama"]["dustin"]["tokens"]


def test_shards_split_heads_by_kv_group_and_mlp_columns(pairs):
    config, state_dict, _ = load_checkpoint(Path(pairs["qwen2"][0]))
    parts = [shard_state_dict(TensorParallel(config, r, 2), state_dict) for r in range(2)]
    for name in state_dict:
        if any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            assert parts[0][name].shape[0] * 2 == state_dict[name].shape[0]
            assert torch.equal(torch.cat([p[name] for p in parts]), state_dict[name])
        elif any(k in name for k in ("o_proj", "down_proj")):
            assert torch.equal(torch.cat([p[name] for p in parts], dim=1), state_dict[name])
        else:  # embeddings, norms, lm_head: replicated
            assert all(p[name] is state_dict[name] for p in parts)
    local = TensorParallel(config, 1, 2)
    assert local.first_head == config.num_heads // 2
    heads = {1: torch.tensor([0, 1]), 2: torch.tensor([1, 3])}
    assert {l: h.tolist() for l, h in local.local_heads(heads).items()} == {2: [1]}


def test_bad_sizes_are_refused(pairs):
    config, _, _ = load_checkpoint(Path(pairs["llama"][0]))
    with pytest.raises(ValueError, match="num_kv_heads \\(2\\) must be a multiple of .* \\(4\\)"):
        TensorParallel(config, 0, 4)
    with pytest.raises(ValueError, match="rank must be in \\[0, 2\\), got 2"):
        TensorParallel(config, 2, 2)


def _table(output: str) -> list[list[str]]:
    """The rows of ``dustin generate``'s table without the timing columns, and the sample line."""
    lines = output[output.index("method") :].splitlines()
    rows = [
        line.split() for line in lines if line.split()[:1] in (["plain"], ["dense"], ["dustin"])
    ]
    return [row[:1] + row[3:] for row in rows] + [lines[-1]]


def test_generate_with_tp_under_torchrun_prints_the_single_process_table(pairs, tmp_path, capsys):
    target, draft = pairs["qwen2"]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(f"w{(i * 7) % VOCAB}" for i in range(400)))
    argv = ["generate", "--target", target, "--draft", draft, "--prompt-file", str(prompt)]
    argv += ["--device", "cpu", "--context", "120", "--batch-size", "2", "--max-new-tokens", "12"]
    argv += ["--budget", "24", "--page-size", "4", "--no-progress"]
    assert main(argv) == 0
    alone = _table(capsys.readouterr().out)
    # --standalone: the launcher binds a free port itself (no port picked here and raced for).
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [*launch, "-m", "dustin", *argv, "--tp", "2"],
        check=False,  # the assertion below shows stderr
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tensor-parallel 2" in run.stdout
    assert run.stdout.count("method") == 1  # only rank 0 prints
    assert _table(run.stdout) == alone


def test_a_world_size_other_than_tp_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="--tp 2: torchrun started 3 processes"):
        init_from_env(2, "cpu")


def test_tp_without_torchrun_is_refused(pairs, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    target, draft = pairs["qwen2"]
    argv = ["generate", "--target", target, "--draft", draft, "--device", "cpu", "--tp", "2"]
    assert main(argv) == 2
    assert "start the command with `torchrun --nproc-per-node 2" in capsys.readouterr().err
