# SPDX-License-Identifier: Apache-2.0
"""End-to-end decode throughput on one GPU or more: plain, classic speculative, MagicDec-style, Dustin.

Every method runs through ``dustin.fast.GraphDecoder`` (each phase of a step one CUDA-graph
replay, attention through the project's ``sparse_verify``, dense by listing every block):

- ``plain``: autoregressive decoding of the target (q = 1, dense);
- ``classic``: speculative decoding, full-KV draft, dense verification;
- ``magicdec``: streaming draft (sinks + recent window), dense verification;
- ``dustin-full`` / ``dustin-stream``: Dustin's sparse verification (budget 512) with a full-KV
  or a streaming draft (lookahead scores read the draft's full cache either way).

Pairs: the shapes of Qwen2.5-7B with Qwen2.5-0.5B (random weights; acceptance replayed from a
fixed distribution of mean accepted length 2.2), and Qwen2.5-Coder-1.5B with 0.5B (real weights
when ``--target/--draft`` are given or the fetched pair is in the dustin cache: a real prefill of
Austen text and real greedy acceptance; else random weights with replayed acceptance).
With random weights the caches are filled with random K/V instead of running a prefill: speed
does not depend on the values.

Per method: tokens/s, speedups, and a per-step time breakdown (draft, scoring, selection,
verification attention, the rest of verification, other) from CUDA events around each phase;
the verification attention is the step's ``sparse_verify`` calls of every target layer
replayed alone (one graph) right after the verification, with the step's lists and lengths.

    python bench/bench_e2e.py                 # quick: 32k context, batch 16, gamma 4 (< 4 min)
    python bench/bench_e2e.py --full          # contexts 8k/16k/32k x batch 8/16/32 x gamma 3-5
    python bench/bench_e2e.py --plot FILE.json   # redraw the stacked-bar plot of a run (no GPU)

Tensor parallel (``dustin.parallel``; random weights only): the target's heads and MLP columns are
split over the ranks, the draft runs whole on each, rank 0 reports:

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 8 bench/bench_e2e.py --tp 8 \
        --pairs qwen2.5-72b/0.5b qwen2.5-32b/0.5b
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dustin import ops
from dustin.config import ModelConfig
from dustin.fast import GraphDecoder, capture
from dustin.model import Transformer, rope_inv_freq
from dustin.parallel import TensorParallel, init_from_env
from dustin.policies import CONFIG_DIR, Dense, Dustin, PairConfig

from bench.common import RESULTS_DIR, Report, read_ceiling_tbps, time_cuda

OUT_DIR = RESULTS_DIR / "e2e"
DTYPE = torch.bfloat16
MEAN_ACCEPTED = 2.2  # tokens committed per verification (accepted drafts + bonus), the paper's
CATEGORIES = ("draft", "scoring", "selection", "verify_attention", "verify_other", "other")


def qwen2_config(
    vocab, hidden, ffn, layers, heads, kv_heads, head_dim, tied, max_pos
) -> ModelConfig:
    return ModelConfig(
        arch="qwen2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=max_pos,
        attention_bias=True,
        tie_word_embeddings=tied,
    )


# Shapes from the models' config.json. Both targets use the draft's vocabulary (151,936):
# Qwen2.5-7B pads its embedding to 152,064 rows that a trained model never emits but a random one
# would, and the draft cannot embed them. Random-weight positions may pass the trained context.
VOCAB = 151936
DRAFT_0_5B = qwen2_config(VOCAB, 896, 4864, 24, 14, 2, 64, True, 131072)
PAIRS = {
    "qwen2.5-7b/0.5b": (
        qwen2_config(VOCAB, 3584, 18944, 28, 28, 4, 128, False, 131072),
        DRAFT_0_5B,
    ),
    "qwen2.5-coder-1.5b/0.5b": (
        qwen2_config(VOCAB, 1536, 8960, 28, 12, 2, 128, False, 131072),
        DRAFT_0_5B,
    ),
    # Too large for one GPU at 32k x 16 (weights and KV cache): run them with --tp.
    "qwen2.5-32b/0.5b": (
        qwen2_config(VOCAB, 5120, 27648, 64, 40, 8, 128, False, 131072),
        DRAFT_0_5B,
    ),
    "qwen2.5-72b/0.5b": (
        qwen2_config(VOCAB, 8192, 29568, 80, 64, 8, 128, False, 131072),
        DRAFT_0_5B,
    ),
}
ONE_GPU_PAIRS = ["qwen2.5-7b/0.5b", "qwen2.5-coder-1.5b/0.5b"]  # the default --pairs
REAL_PAIR = "qwen2.5-coder-1.5b/0.5b"
REAL_PAIR_CONFIG = "qwen2.5-coder-0.5b_1.5b.json"


@dataclass(frozen=True)
class Method:
    name: str
    speculative: bool
    sparse: bool = False  # Dustin verification (else dense)
    streaming_draft: bool = False


METHODS = {
    m.name: m
    for m in (
        Method("plain", False),
        Method("classic", True),
        Method("magicdec", True, streaming_draft=True),
        Method("dustin-full", True, sparse=True),
        Method("dustin-stream", True, sparse=True, streaming_draft=True),
    )
}


def random_model(config: ModelConfig, seed: int) -> Transformer:
    """Random bf16 weights of a config's shape on the GPU, made in place (no fp32 copy)."""
    with torch.device("meta"):
        model = Transformer(config).to(DTYPE)
    model = model.to_empty(device="cuda")
    gen = torch.Generator("cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to("cuda")
    return model.eval().requires_grad_(False)


def random_target(config: ModelConfig, tp: int) -> Transformer:
    """``random_model`` of the target, or with ``tp`` > 1 of this rank's share of it (every rank
    draws the same numbers for its share: speed does not depend on them)."""
    if tp == 1:
        return random_model(config, 0)
    parallel = TensorParallel(config, dist.get_rank(), tp)
    model = random_model(parallel.local_config, 0)
    model.parallel = parallel
    return model


def geometric_acceptance(gamma: int, mean: float) -> list[float]:
    """P(L = 1..gamma+1) of tokens committed per step when each draft is accepted with the same
    probability a until the first rejection (P(L = k) = a^(k-1) (1 - a), P(L = gamma+1) =
    a^gamma), with a chosen by bisection so that E[L] = mean."""
    if not 1.0 <= mean <= gamma + 1:
        raise ValueError(
            f"mean accepted length must be in [1, gamma + 1] = [1, {gamma + 1}], got {mean}"
        )

    def dist(a):
        return [a ** (k - 1) * (1 - a) for k in range(1, gamma + 1)] + [a**gamma]

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(k * p for k, p in enumerate(dist(mid), 1)) < mean else (lo, mid)
    return dist(lo)


def acceptance_table(gamma: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """``[steps, B]`` int32 accepted drafts (0..gamma) drawn from ``geometric_acceptance``."""
    probs = torch.tensor(geometric_acceptance(gamma, MEAN_ACCEPTED))
    gen = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(probs.expand(steps * batch, -1), 1, replacement=True, generator=gen)
    return draws.view(steps, batch).to(torch.int32).cuda()


class Setup:
    """Models and filled caches of one (pair, context, batch): shared by every method and gamma."""

    def __init__(
        self,
        pair: str,
        target,
        draft,
        context: int,
        batch: int,
        reach: int,
        page: int,
        real_state=None,
    ) -> None:
        self.pair, self.target, self.draft, self.context, self.batch = (
            pair,
            target,
            draft,
            context,
            batch,
        )
        self.real_state = real_state  # a dustin.spec.Prefilled when the weights are real
        if real_state is not None:
            self.prompt_lens = [len(p) for p in real_state.prompts]
            return
        self.prompt_lens = [context] * batch
        self.caches = []
        gen = torch.Generator("cuda").manual_seed(1)
        for model in (target, draft):
            pages = -(
                -(context + reach) // page
            )  # per sequence, so every one can reserve its reach
            cache = model.new_cache(
                batch, context + reach, token_budget=batch * pages * page, page_size=page
            )
            cache.append(context)
            for layer in range(model.config.num_layers):  # random K/V stand in for a prefill
                cache.k(layer).normal_(generator=gen)
                cache.v(layer).normal_(generator=gen)
            self.caches.append(cache)

    def decoder(
        self, method: Method, gamma: int, pair_cfg: PairConfig, args, max_new: int, graphs: bool
    ):
        """The method's decoder, started (and captured); returns it and the seconds that took."""
        if self.real_state is not None:
            state = self.real_state.fork()
            tcache, dcache = state.target_cache, state.draft_cache
        else:
            tcache, dcache = self.caches
        policy = None
        if method.speculative:
            policy = Dense()
            if method.sparse:
                policy = Dustin(
                    draft_heads=pair_cfg.draft_heads,
                    target_heads=pair_cfg.target_heads,
                    budget_tokens=args.budget,
                    n_sink=pair_cfg.n_sink,
                    n_recent=pair_cfg.n_recent,
                    draft_share=pair_cfg.draft_share,
                )
        decoder = GraphDecoder(
            self.target,
            tcache,
            self.draft if method.speculative else None,
            dcache if method.speculative else None,
            policy,
            gamma=gamma if method.speculative else 0,
            max_new_tokens=max_new,
            draft_window=args.draft_window if method.streaming_draft else None,
            replay_acceptance=self.real_state is None and method.speculative,
            use_graphs=graphs,
        )
        start = time.perf_counter()
        if self.real_state is not None:
            decoder.start_from(state)
        else:
            gen = torch.Generator("cuda").manual_seed(2)
            tokens = torch.randint(0, VOCAB, (2, self.batch), device="cuda", generator=gen)
            decoder.start(self.prompt_lens, tokens[0], tokens[1])
        torch.cuda.synchronize()
        return decoder, time.perf_counter() - start


def attention_probe(decoder: GraphDecoder):
    """The verification's ``sparse_verify`` of every target layer alone, as one graph replay:
    same caches, lengths and block lists as the step's, a static random q."""
    target, cache = decoder.target, decoder.tcache
    config = target.config
    q_len = decoder.gamma + 1
    q = torch.randn(
        cache.batch_size, q_len, config.num_heads, config.head_dim, dtype=DTYPE, device="cuda"
    )
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    def run():
        ids, counts = decoder.verify_lists(cache.kv_lens, q_len)
        for layer in range(config.num_layers):
            ops.sparse_verify_out(
                q,
                cache.k(layer),
                cache.v(layer),
                cache.block_table,
                cache.kv_lens,
                ids,
                counts,
                target.sm_scale,
                cache.layout,
                out,
                lse,
                decoder.workspaces.get(q, cache.k(layer), cache.block_table, ids, cache.layout),
                validate=False,
            )

    run()  # once outside capture (lazy state); it only reads
    return capture(run)


def measure(
    decoder: GraphDecoder, table: torch.Tensor | None, warmup: int, steps: int, probe_steps: int
) -> dict:
    """Times ``steps`` steps phase by phase with CUDA events; then ``probe_steps`` more steps
    with the attention probe after each verification. Returns per-step milliseconds."""
    step_index = 0

    def set_acceptance():
        nonlocal step_index
        if table is not None:
            decoder.set_acceptance(table[step_index])
        step_index += 1

    for _ in range(warmup):
        set_acceptance()
        decoder.step()
    names = list(decoder.phases)
    emitted_before = int(decoder.emitted_sum)
    events = [
        [torch.cuda.Event(enable_timing=True) for _ in range(len(names) + 1)] for _ in range(steps)
    ]
    for i in range(steps):
        set_acceptance()
        for event, run in zip(events[i], decoder.phases.values()):
            event.record()
            run()
        events[i][-1].record()
    torch.cuda.synchronize()
    emitted = int(decoder.emitted_sum) - emitted_before
    per_phase = {name: [] for name in names}
    for ev in events:
        for j, name in enumerate(names):
            per_phase[name].append(ev[j].elapsed_time(ev[j + 1]))
    phase_ms = {name: statistics.fmean(t) for name, t in per_phase.items()}
    total_ms = sum(sum(t) for t in per_phase.values())

    probe, probe_ms = None, []
    for _ in range(probe_steps):
        set_acceptance()
        for name, run in decoder.phases.items():
            run()
            if name == "verify":
                if probe is None:  # made here, where lengths and lists are the verification's
                    probe = attention_probe(decoder)
                begin, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                begin.record()
                probe()
                end.record()
                probe_ms.append((begin, end))
    torch.cuda.synchronize()
    attention = statistics.median(b.elapsed_time(e) for b, e in probe_ms)
    return {
        "phase_ms": phase_ms,
        "step_ms": total_ms / steps,
        "tokens": emitted,
        "seconds": total_ms / 1e3,
        "steps": steps,
        "verify_attention_ms": attention,
    }


def dense_attention_peers(setup: Setup, gamma: int) -> dict:
    """Per-layer dense attention at this shape: dustin's paged ``sparse_verify`` (every block
    listed) against PyTorch SDPA on a contiguous KV (its best backend), q = 1 and q = gamma + 1."""
    config = setup.target.config
    tcache = setup.real_state.target_cache if setup.real_state is not None else setup.caches[0]
    shape = (setup.batch, config.num_kv_heads, setup.context, config.head_dim)
    k = torch.randn(shape, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    ids, counts = ops.dense_block_lists(tcache.kv_lens, tcache.page_size, tcache.max_pages_per_seq)
    return {q_len: peer_times(setup, tcache, ids, counts, k, v, q_len) for q_len in (1, gamma + 1)}


def peer_times(setup, tcache, ids, counts, k, v, q_len) -> dict:
    """Graph-replay microseconds of one layer's dense attention, dustin and SDPA."""
    config = setup.target.config
    q = torch.randn(
        setup.batch, q_len, config.num_heads, config.head_dim, dtype=DTYPE, device="cuda"
    )
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
    nbytes = ops.sparse_verify_workspace_bytes(
        q, tcache.k(0), tcache.block_table, ids, tcache.layout
    )
    ws = torch.empty(nbytes, dtype=torch.uint8, device="cuda") if nbytes else None
    context = k.shape[2]
    mask = None  # q = 1 sees every key; a window sees the keys up to its own position
    if q_len > 1:
        mask = torch.ones(q_len, context, dtype=torch.bool, device="cuda").tril(context - q_len)
    qt = q.transpose(1, 2)

    def ours():
        ops.sparse_verify_out(
            q,
            tcache.k(0),
            tcache.v(0),
            tcache.block_table,
            tcache.kv_lens,
            ids,
            counts,
            setup.target.sm_scale,
            tcache.layout,
            out,
            lse,
            ws,
            validate=False,
        )

    def sdpa():
        F.scaled_dot_product_attention(qt, k, v, attn_mask=mask, enable_gqa=True)

    times = {"dustin_us": time_cuda(ours).best_us}
    try:
        times["sdpa_us"] = time_cuda(sdpa).best_us
    except RuntimeError as exc:  # no SDPA backend for this case
        print(f"  SDPA peer failed at q={q_len}: {str(exc).splitlines()[0][:120]}")
        times["sdpa_us"] = math.nan
    return times


def load_real_pair(args) -> tuple[Transformer, Transformer, list[int]]:
    """The real pair on the GPU, and the token ids of the bundled Austen novels (the prompts)."""
    from dustin.checkpoint import check_compatible, load_checkpoint
    from dustin.texts import TEXT_NAMES, load_text

    models = []
    for path in (args.target, args.draft):
        print(f"loading {path}", flush=True)
        config, state_dict, tokenizer = load_checkpoint(path, dtype=DTYPE)
        models.append(
            (Transformer.from_state_dict(config, state_dict, dtype=DTYPE, device="cuda"), tokenizer)
        )
        del state_dict
    (target, tok), (draft, dtok) = models
    check_compatible(draft.config, dtok, target.config, tok)
    return target, draft, [t for name in TEXT_NAMES for t in tok.encode(load_text(name)).ids]


def real_prefill(target, draft, text_ids, context, batch, reach_new, gamma_max, page):
    """Prefilled caches of ``batch`` windows of the text, as long as ``context`` allows within
    the models' trained context; returns the prompt length used and the state."""
    from dustin.spec import DecodeOptions, prefill

    options = DecodeOptions(max_new_tokens=reach_new, gamma=gamma_max)
    longest = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    context = min(context, longest - options.context_needed(0))
    stride = min(context, (len(text_ids) - context) // max(batch - 1, 1))
    prompts = [text_ids[b * stride : b * stride + context] for b in range(batch)]
    start = time.perf_counter()
    state = prefill(target, draft, prompts, options, page_size=page)
    print(f"prefill of {batch} x {context} tokens: {time.perf_counter() - start:.0f} s", flush=True)
    return context, state


def run_sweep(args) -> Report:
    report = Report(
        "e2e",
        [
            "pair",
            "weights",
            "context",
            "batch",
            "gamma",
            "method",
            "tokens_per_s",
            "vs_plain",
            "vs_classic",
            "vs_magicdec",
            "emitted_per_step",
            "step_ms",
            "floor_ms",
            "pct_of_floor",
            *[f"{c}_ms" for c in CATEGORIES],
            "attention_vs_dense",
        ],
    )
    probs = {g: [round(p, 4) for p in geometric_acceptance(g, MEAN_ACCEPTED)] for g in args.gammas}
    report.notes += [
        (
            f"random-weight pairs: acceptance REPLAYED, not measured: tokens committed per step L drawn "
            f"(seed 0) from P(L = k) = a^(k-1)(1-a), P(L = gamma+1) = a^gamma with E[L] = {MEAN_ACCEPTED} "
            f"(the paper's mean accepted length); P(L = 1..gamma+1) per gamma: {probs}"
        ),
        (
            "random-weight pairs: caches filled with random K/V instead of a prefill (speed does not "
            "depend on values); pages of a sequence are consecutive in the pool"
        ),
        (
            f"Dustin: budget {args.budget} tokens, page {args.page_size}; streaming draft window "
            f"{args.draft_window} tokens (4 sink tokens + most recent); greedy acceptance computed in "
            "every step (replayed counts replace it where stated)"
        ),
        (
            "every phase is a CUDA-graph replay; step_ms is the sum of the phases' CUDA-event times; "
            "verify_attention_ms is the step's sparse_verify calls of all target layers replayed alone "
            "right after the verification; verify_other_ms the rest of the verification"
        ),
        (
            "rows named '<method>-eager': the same phases as direct PyTorch calls from Python, "
            "no CUDA graphs (what the graphs save)"
        ),
        (
            f"floor_ms: the bytes a step must read once (weights of every forward pass, the KV "
            f"it attends, the keys its scoring reads) at the {read_ceiling_tbps():.2f} TB/s read "
            "ceiling; pct_of_floor = floor_ms / step_ms"
        ),
    ]
    report.notes.append(
        "layer glue (norms, projections, RoPE, MLP) compiled by torch.compile, q/k/v and "
        "gate/up fused into one GEMM each (Transformer.compile_layers), attention through "
        "dustin's ops, for every method; projections of up to 16 rows "
        + (
            "through dustin.ops.decode_linear with the layer's glue fused in (norms, RoPE, "
            "activation, residual adds)"
            if args.decode_linear
            else "through cuBLAS (--no-decode-linear)"
        )
        if args.compile
        else "layer glue run as eager PyTorch ops (--no-compile)"
    )
    if args.tp > 1:
        report.notes.append(
            f"tensor parallel over {args.tp} GPUs (NCCL, NCCL_NVLS_ENABLE="
            f"{os.environ.get('NCCL_NVLS_ENABLE')}): target heads and MLP columns split, one "
            "all-reduce after o_proj and after down_proj; draft whole on every GPU; times of rank 0"
        )
    steps_total = args.warmup + args.steps + args.probe_steps
    gamma_max = max(args.gammas)
    reach_new = steps_total * (gamma_max + 1) + 1  # tokens a step loop may commit
    reach = reach_new + 2 * gamma_max + 1
    for pair in args.pairs:
        real = pair == REAL_PAIR and args.target is not None
        if real:
            target, draft, text_ids = load_real_pair(args)
            pair_cfg = PairConfig.load(CONFIG_DIR / REAL_PAIR_CONFIG)
        else:
            target_cfg, draft_cfg = PAIRS[pair]
            target, draft = random_target(target_cfg, args.tp), random_model(draft_cfg, 1)
            pair_cfg = PairConfig.default_for(draft_cfg, target_cfg)
        if args.compile:
            target.compile_layers(decode_linear=args.decode_linear)
            draft.compile_layers(decode_linear=args.decode_linear)
        report.notes.append(f"{pair}: retrieval heads and draft share: {pair_cfg.note}")
        for context in args.contexts:
            for batch in args.batches:
                state = None
                used_context = context
                if real:
                    used_context, state = real_prefill(
                        target,
                        draft,
                        text_ids,
                        context,
                        batch,
                        reach_new,
                        gamma_max,
                        args.page_size,
                    )
                    report.notes.append(
                        f"{pair}: real weights {args.target.name} / {args.draft.name}, "
                        f"real greedy acceptance, prompts of {used_context} tokens"
                    )
                setup = Setup(
                    pair, target, draft, used_context, batch, reach, args.page_size, state
                )
                weights = "real" if real else "random"
                print(
                    f"\n== {pair} ({weights} weights), context {used_context}, batch {batch}",
                    flush=True,
                )
                if args.peers:
                    peers = dense_attention_peers(setup, gamma_max)
                    report.notes.append(
                        f"{pair} {used_context}x{batch} dense attention per layer (us, graph): "
                        + ", ".join(
                            f"q={q}: dustin {r['dustin_us']:.1f} vs SDPA contiguous {r['sdpa_us']:.1f}"
                            for q, r in peers.items()
                        )
                    )
                sweep_gammas(report, setup, pair_cfg, args, weights, steps_total, reach_new)
                del setup, state
                gc.collect()
                torch.cuda.empty_cache()
        del target, draft
        gc.collect()
        torch.cuda.empty_cache()
    check_targets(report)
    return report


def sweep_gammas(report, setup, pair_cfg, args, weights, steps_total, reach_new) -> None:
    """Every method (graphs; plus direct calls for ``args.eager``) at every gamma of one
    (pair, context, batch); plain decoding, which has no gamma, runs once."""
    runs = [(name, True) for name in args.methods] + [(name, False) for name in args.eager]
    once: dict[str, dict] = {}  # label -> row of the gamma-free runs
    for gamma in args.gammas:
        table = None
        if setup.real_state is None:
            table = acceptance_table(gamma, steps_total, setup.batch, seed=0)
        rows = {}
        for name, graphs in runs:
            method, label = METHODS[name], name if graphs else f"{name}-eager"
            if label in once:
                rows[label] = once[label]
                continue
            decoder, setup_s = setup.decoder(method, gamma, pair_cfg, args, reach_new, graphs)
            result = measure(
                decoder,
                table if method.speculative else None,
                args.warmup,
                args.steps,
                args.probe_steps,
            )
            row = summarize(setup, gamma, label, weights, result, decoder)
            row["floor_ms"] = step_floor_ms(setup, method, decoder.gamma, pair_cfg, args)
            row["pct_of_floor"] = 100.0 * row["floor_ms"] / row["step_ms"]
            row["setup_s"] = round(setup_s, 2)
            del decoder
            gc.collect()
            torch.cuda.empty_cache()
            rows[label] = row
            if not method.speculative:
                once[label] = row
            print(
                f"  gamma {gamma} {label:20s} {row['tokens_per_s']:10.0f} tok/s  "
                f"step {row['step_ms']:.2f} ms  emitted/step {row['emitted_per_step']:.2f}",
                flush=True,
            )
        for label, row in rows.items():
            if label in once and gamma != args.gammas[0]:
                continue  # reported with the first gamma
            row = dict(row)
            for base in ("plain", "classic", "magicdec"):
                if base in rows:
                    row[f"vs_{base}"] = row["tokens_per_s"] / rows[base]["tokens_per_s"]
            if "classic" in rows:
                row["attention_vs_dense"] = (
                    rows["classic"]["verify_attention_ms"] / row["verify_attention_ms"]
                )
            report.add(**row)


def weight_bytes(model: Transformer) -> int:
    """Bytes of the weights one forward pass reads: every parameter once, the embedding table
    only where it doubles as the LM head (a lookup reads a few rows)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        total -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def kv_bytes(model: Transformer, batch: int, tokens: int) -> int:
    """Keys and values of ``tokens`` positions of every layer and sequence."""
    c = model.config
    return 2 * batch * c.num_layers * tokens * c.num_kv_heads * c.head_dim * model.dtype.itemsize


def key_bytes(model: Transformer, heads, batch: int, tokens: int) -> int:
    """Keys that scoring on retrieval ``heads`` ((layer, query head) pairs) reads: each KV head
    those heads map to, once per layer."""
    c = model.config
    group = c.num_heads // c.num_kv_heads
    kv_heads = {(layer, head // group) for layer, head in heads}
    return len(kv_heads) * batch * tokens * c.head_dim * model.dtype.itemsize


def step_floor_ms(setup, method: Method, gamma: int, pair_cfg: PairConfig, args) -> float:
    """The time a step cannot beat on this GPU: the bytes it must read once (the weights of every
    forward pass, the KV it attends, the keys its scoring reads) at the read ceiling."""
    ctx, batch = setup.context, setup.batch
    attended = min(ctx, args.budget + gamma + 1) if method.sparse else ctx
    total = weight_bytes(setup.target) + kv_bytes(setup.target, batch, attended)
    if method.speculative:
        drafted = min(ctx, args.draft_window) if method.streaming_draft else ctx
        total += gamma * (weight_bytes(setup.draft) + kv_bytes(setup.draft, batch, drafted))
    if method.sparse:
        total += key_bytes(setup.draft, pair_cfg.draft_heads, batch, ctx)
        total += key_bytes(setup.target, pair_cfg.target_heads, batch, ctx)
    return total / (read_ceiling_tbps() * 1e12) * 1e3


def summarize(setup, gamma, label, weights, result, decoder) -> dict:
    ph = result["phase_ms"]
    attention = result["verify_attention_ms"]
    return {
        "pair": setup.pair,
        "weights": weights,
        "context": setup.context,
        "batch": setup.batch,
        "gamma": gamma if decoder.gamma else 0,
        "method": label,
        "tokens_per_s": result["tokens"] / result["seconds"],
        "emitted_per_step": result["tokens"] / (setup.batch * result["steps"]),
        "step_ms": result["step_ms"],
        "draft_ms": ph.get("draft", 0.0),
        "scoring_ms": ph.get("lookahead", 0.0) + ph.get("history", 0.0),
        "selection_ms": ph.get("select", 0.0),
        "verify_attention_ms": attention,
        "verify_other_ms": ph["verify"] - attention,
        "other_ms": ph["accept"],
    }


def check_targets(report: Report) -> None:
    """Notes on the issue's targets at 32k context, batch 16 (where the sweep has them)."""
    for row in report.rows:
        if (
            row["context"] < 32000
            or row["batch"] != 16
            or row["method"] not in ("dustin-full", "dustin-stream")
        ):
            continue
        if row["weights"] == "random":
            report.notes.append(
                f"target check {row['pair']} {row['method']} gamma {row['gamma']}: "
                f"{row.get('vs_plain', math.nan):.2f}x plain (target >= 5), "
                f"{row.get('vs_classic', math.nan):.2f}x classic (>= 3), "
                f"{row.get('vs_magicdec', math.nan):.2f}x magicdec (>= 2), "
                f"attention {row.get('attention_vs_dense', math.nan):.1f}x faster than dense (>= 20)"
            )
        else:
            report.notes.append(
                f"real pair {row['method']} gamma {row['gamma']}: {row.get('vs_plain', math.nan):.2f}x plain, "
                f"{row.get('vs_classic', math.nan):.2f}x classic, {row.get('vs_magicdec', math.nan):.2f}x magicdec "
                "(target: faster than every baseline)"
            )


def plot(json_path: Path) -> Path | None:
    """Stacked bars of time per generated token by category, one panel per (pair, context,
    batch) at the largest gamma of the run. Returns the PNG path (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            f"matplotlib is not installed: no plot; later run: python bench/bench_e2e.py --plot {json_path}"
        )
        return None
    data = json.loads(Path(json_path).read_text())
    rows = data["rows"]
    gamma = max(r["gamma"] for r in rows)
    panels = sorted({(r["pair"], r["context"], r["batch"]) for r in rows})
    cols = min(3, len(panels))
    fig_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(fig_rows, cols, figsize=(5.5 * cols, 4.2 * fig_rows), squeeze=False)
    colors = dict(
        zip(CATEGORIES, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"))
    )
    for ax, (pair, context, batch) in zip(axes.flat, panels):
        chosen = [
            r
            for r in rows
            if (r["pair"], r["context"], r["batch"]) == (pair, context, batch)
            and r["gamma"] in (0, gamma)
        ]
        names = [r["method"] for r in chosen]
        bottom = [0.0] * len(chosen)
        for cat in CATEGORIES:
            # microseconds per generated token of the whole batch
            values = [1e3 * r[f"{cat}_ms"] / (r["emitted_per_step"] * r["batch"]) for r in chosen]
            ax.bar(names, values, bottom=bottom, label=cat.replace("_", " "), color=colors[cat])
            bottom = [b + v for b, v in zip(bottom, values)]
        for x, (r, top) in enumerate(zip(chosen, bottom)):
            ax.text(x, top, f"{r['tokens_per_s']:.0f}/s", ha="center", va="bottom", fontsize=8)
        ax.set_title(
            f"{pair} ({chosen[0]['weights']} weights)\n{context} ctx, batch {batch}, gamma {gamma}",
            fontsize=9,
        )
        ax.set_ylabel("us per generated token")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    png = Path(json_path).with_suffix(".png")
    fig.savefig(png, dpi=120)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--full", action="store_true", help="contexts 8k/16k/32k x batch 8/16/32 x gamma 3/4/5"
    )
    parser.add_argument("--contexts", nargs="+", type=int, help="prompt tokens (quick: 32768)")
    parser.add_argument("--batches", nargs="+", type=int, help="sequences (quick: 16)")
    parser.add_argument("--gammas", nargs="+", type=int, help="drafted tokens per step (quick: 4)")
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=ONE_GPU_PAIRS)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument(
        "--target", type=Path, help="real target checkpoint (HF dir or .gguf) for the Coder pair"
    )
    parser.add_argument("--draft", type=Path, help="real draft checkpoint for the Coder pair")
    parser.add_argument(
        "--budget", type=int, default=512, help="Dustin's budget in tokens (default 512)"
    )
    parser.add_argument(
        "--draft-window", type=int, default=512, help="streaming draft's window in tokens"
    )
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per method")
    parser.add_argument("--probe-steps", type=int, default=6, help="steps with the attention probe")
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="run the layer glue as eager ops instead of torch.compile'd kernels",
    )
    parser.add_argument(
        "--no-decode-linear",
        dest="decode_linear",
        action="store_false",
        help="decode-step projections through cuBLAS and the compiled glue instead of "
        "dustin.ops.decode_linear with the glue fused in",
    )
    parser.add_argument(
        "--no-peers", dest="peers", action="store_false", help="skip the dense attention peer check"
    )
    parser.add_argument(
        "--eager",
        nargs="*",
        choices=list(METHODS),
        help="methods also timed as direct calls, no graphs (quick: plain dustin-stream; full: none)",
    )
    parser.add_argument(
        "--plot", type=Path, metavar="JSON", help="only redraw the plot of a results file"
    )
    parser.add_argument(
        "--tp",
        type=int,
        default=1,
        help="GPUs the target is split over (random weights; launch with torchrun --nproc-per-node N)",
    )
    args = parser.parse_args()
    if args.plot is not None:
        print(plot(args.plot))
        return
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (use --plot to redraw a plot without one)")
    if (args.target is None) != (args.draft is None):
        parser.error("--target and --draft go together")
    if args.tp < 1:
        parser.error(f"--tp must be >= 1, got {args.tp}")
    if args.tp > 1:
        if args.target is not None:
            parser.error("--tp runs random-weight pairs only; drop --target/--draft")
        try:
            init_from_env(args.tp, "cuda")
        except ValueError as exc:
            parser.error(str(exc))
        if int(os.environ["RANK"]) != 0:  # rank 0 prints the progress and the report
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the process's lifetime)
    elif args.target is None:
        from dustin.fetch import cached_real_pair

        found = cached_real_pair()
        if found is not None:
            args.draft, args.target = found
    quick = {
        "contexts": [32768],
        "batches": [16],
        "gammas": [4],
        "eager": ["plain", "dustin-stream"],
    }
    full = {
        "contexts": [8192, 16384, 32768],
        "batches": [8, 16, 32],
        "gammas": [3, 4, 5],
        "eager": [],
    }
    for key, value in (full if args.full else quick).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for g in args.gammas:
        if not 1 <= g <= 15:
            parser.error(f"--gammas must be in [1, 15], got {g}")

    start = time.perf_counter()
    report = run_sweep(args)
    if args.tp > 1:
        dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return
    # What the next GPU call must budget for (device time is scarce and calls are capped).
    report.notes.append(f"the sweep took {time.perf_counter() - start:.0f} s")
    print("\n" + report.markdown())
    for note in report.notes:
        print(f"- {note}")
    json_path, md_path = report.save(OUT_DIR)
    png = plot(json_path)
    if png is not None:
        md_path.write_text(md_path.read_text() + f"\n![time per token]({png.name})\n")
    print(
        f"\nwrote {json_path}, {md_path}{', ' + str(png) if png else ''} in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
