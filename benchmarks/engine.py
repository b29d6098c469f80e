"""Engine benchmark: where the speed comes from, one technique at a time.

A fixed set of conversations (a 3-exchange history of about 200 tokens plus a short user turn)
runs through: vanilla exactly as LLaDA's reference does it (whole canvas, no cache, one token per
step, no early stop), vanilla with early stop, threshold commits without a cache (parallel commits
alone), prefix cache + threshold, dual cache + threshold and dual cache + Fast-dLLM's factor rule
(commit the n most confident while the i-th is >= 1 - f / (i + 1)), each at batch 1 (requests one after
another) and batch N (all at once through the engine's continuous batching). Tokens are counted up
to EOS / end of turn. Agreement is the share of prompts whose reply text equals the reference's.

`--thresholds` adds dual + threshold at the first batch size with other values of tau (`threshold_sweep`): what
a lower bar buys in forwards and first-block latency, and costs in agreement with the reference.

Cross-turn prefix reuse is measured apart (`prefix_reuse` in the JSON): each conversation is played
turn by turn (the fixed history as what was said), once recomputing every prompt and once reusing
the previous turn's cached prefix, at the benchmark's settings and at the voice agent's
(`decoding.SPOKEN`). Reported over the turns that can reuse (all but the first): latencies, reused tokens,
and agreement with the recomputed replies.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import re
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dllm_engine.config import ConfigError
from dllm_engine.decoding import SPOKEN, DecodeParams
from dllm_engine.engine import Engine
from dllm_engine.options import add_model_args, engine_from_args, setup_torch

from .common import machine

log = logging.getLogger(__name__)

_HISTORIES = [
    ("I just got back from a long walk by the river, it was lovely out.",
     "That sounds really nice. Was it busy, or did you have the path mostly to yourself?",
     "Mostly to myself, apart from a few people with dogs. One of them was a huge fluffy thing.",
     "Big fluffy dogs are the best. Do you have a dog of your own, or do you just enjoy meeting them?",
     "No dog yet, my apartment is too small. Maybe when I move somewhere with a yard.",
     "That makes sense. A yard makes such a difference for a dog. Where would you like to move?"),
    ("I'm trying to decide what to cook for dinner tonight.",
     "Fun problem to have. What do you have in the fridge right now?",
     "Some rice, a couple of eggs, an onion, and half a bag of frozen peas.",
     "That's almost fried rice already. Do you like fried rice, or were you hoping for something else?",
     "I do like it, but I had it twice this week, so I'm a bit tired of it.",
     "Fair enough. You could make a quick omelette with the onion and peas instead, with rice on the side."),
    ("My sister is visiting this weekend and I have no idea what to do with her.",
     "How nice. What kind of things does she usually enjoy?",
     "She likes museums and old bookshops, and she loves trying new coffee places.",
     "Then you're in luck, that's an easy weekend to plan. Is there a museum near you?",
     "There's a small history museum downtown, I've never actually been inside.",
     "That could be a fun first visit for both of you, and you could look for a cafe nearby afterwards."),
    ("I started learning the guitar last month.",
     "Oh, that's exciting. How is it going so far?",
     "My fingertips hurt a lot, but I can play three chords now.",
     "That's normal at the start, the soreness goes away as you build calluses. Which chords do you know?",
     "G, C and D. I keep messing up the change from C to G though.",
     "That change is tricky for everyone. Practicing it slowly, back and forth, for a few minutes a day really helps."),
    ("I can't sleep well lately, I keep waking up around three in the morning.",
     "That sounds exhausting. Has anything changed in your routine recently?",
     "I've been drinking more coffee in the afternoon because work has been busy.",
     "That could be part of it, caffeine stays in the body for hours. Do you drink it late in the day?",
     "Sometimes as late as five or six in the evening, to get through meetings.",
     "Cutting it off after lunch for a week might be worth a try, and see whether your sleep improves."),
    ("We're planning a trip to the mountains next month.",
     "Lovely. Are you going hiking, or more for the views and relaxing?",
     "A bit of both. My partner wants to hike every day and I mostly want to read by a lake.",
     "Sounds like a good balance if you take turns. Have you found a place to stay yet?",
     "We found a small cabin near a lake, it has a wood stove and no internet.",
     "That sounds perfect for reading. Just make sure you bring enough books and warm clothes."),
    ("I finally finished that series everyone has been talking about.",
     "Nice. Did it live up to the hype for you?",
     "Mostly, but I thought the last episode was rushed.",
     "A lot of people felt that way about the ending. Which part felt most rushed to you?",
     "The main character's change of heart. It happened in like two scenes.",
     "Yes, that kind of turn needs time to feel earned. Are you going to watch anything else now?"),
    ("I've been thinking about getting into running.",
     "That's a great idea. Have you run much before?",
     "Not since school, and I remember hating it back then.",
     "A lot of people feel that way. Starting slowly makes a big difference. What made you think of it now?",
     "A friend of mine ran her first race last month and she looked so happy at the finish.",
     "That's a lovely reason. You could start with short runs mixed with walking, three times a week."),
]
_QUESTIONS = [
    "Anyway, what do you think I should do this weekend?",
    "What would you cook if you were me tonight?",
    "Do you have any other ideas for things we could do together?",
    "How long did it take you to learn something new like that?",
    "Do you think I should try a different bedtime routine as well?",
    "What else should we pack for a week in a cabin like that?",
    "Can you recommend something light and funny to watch next?",
    "How far should I try to run in my first week?",
]


def conversations() -> list[list[dict[str, str]]]:
    """The fixed benchmark prompts: 3 user/assistant exchanges, then a user turn."""
    convs = []
    for history, question in zip(_HISTORIES, _QUESTIONS):
        roles = ["user", "assistant"] * 3
        convs.append([{"role": r, "content": c} for r, c in zip(roles, history)] + [{"role": "user", "content": question}])
    return convs


def turn_prompts(conversation: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """The prompt of each user turn of a conversation: everything said before it, then the turn."""
    return [conversation[: i + 1] for i, m in enumerate(conversation) if m["role"] == "user"]


@dataclasses.dataclass
class Run:
    name: str
    policy: str
    cache: str
    early_stop: bool
    batch: int
    tokens_per_s: float = 0.0
    tokens_per_forward: float = 0.0
    first_block_ms: float = 0.0
    first_sentence_ms: float | None = None  # to the first . ! or ? in the streamed text (None: no reply had one)
    total_ms: float = 0.0
    new_tokens: float = 0.0
    forwards: float = 0.0
    agreement: float | None = None
    speedup_vs_reference: float | None = None
    speedup_vs_early_stop_vanilla: float | None = None
    speedup_vs_ar: float | None = None  # an AR checkpoint converted: against its own one-token-per-forward decoding
    replies: list[str] = dataclasses.field(default_factory=list)  # what agreement compares


CONFIGS = [
    ("vanilla (reference)", "vanilla", "none", False),
    ("vanilla + early stop", "vanilla", "none", True),
    ("threshold, no cache", "threshold", "none", True),
    ("prefix + threshold", "threshold", "prefix", True),
    ("dual + threshold", "threshold", "dual", True),
    ("dual + factor", "factor", "dual", True),
]
SWEPT = CONFIGS[-2]  # --thresholds: dual + threshold at other values of tau
# An AR checkpoint converted (`causal_prompt`): the same weights decoded one token per forward with a
# KV cache, as the AR model itself decodes (block size 1, every forward a step), run first; then
# self-speculation, whose replies are the AR row's, in fewer forwards where the model drafts well.
AR = ("AR: 1 token / forward", "vanilla", "dual", True)
VERIFY = ("verify (self-speculation)", "verify", "dual", True)
SENTENCE_END = re.compile(r"[.!?]")


def _number(text: str, ok, bound: str) -> float:
    """One argparse value, checked before the long runs start."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
    return value


def tau(text: str) -> float:
    """argparse type for --threshold: a tau in (0, 1]."""
    return _number(text, lambda v: 0 < v <= 1, "in (0, 1]")


def thresholds(text: str) -> list[float]:
    """argparse type for --thresholds: comma-separated taus."""
    return [tau(t) for t in text.split(",") if t.strip()]


def positive(text: str) -> float:
    """argparse type for --factor: a number > 0."""
    return _number(text, lambda v: v > 0, "> 0")


def add_args(p: argparse.ArgumentParser) -> None:
    """`dllm bench`'s options, also `python -m benchmarks.engine`'s: the model's, then the benchmark's."""
    add_model_args(p)
    p.add_argument("--json", type=Path, help="write the figures here as JSON")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="canvas / cap (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--threshold", type=tau, default=0.9, help="tau for the threshold runs (default: %(default)s)")
    p.add_argument("--factor", type=positive, default=DecodeParams.factor, help="f for the factor run (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=len(_HISTORIES), help="how many of the fixed prompts to use (default: %(default)s)")
    p.add_argument("--thresholds", type=thresholds, default="0.7,0.5,0.3", help="comma-separated tau values of an extra dual + threshold sweep at the first of --batches; '' for none (default: %(default)s)")


async def _measure(engine: Engine, prompts: list, params: DecodeParams, batch: int) -> tuple[list[str], list, list[float | None], float]:
    """Run every prompt; `batch` at a time share the engine. Returns texts, stats, the ms from each
    request to the first sentence end in its streamed text (what a voice agent can start speaking),
    wall seconds."""
    texts: list[str] = [""] * len(prompts)
    stats: list = [None] * len(prompts)
    sentence_ms: list[float | None] = [None] * len(prompts)

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        async for out in engine.stream(prompts[i], params, request_id=f"bench-{i}"):
            texts[i] += out.text
            if sentence_ms[i] is None and SENTENCE_END.search(texts[i]):
                sentence_ms[i] = (time.perf_counter() - t0) * 1e3
            stats[i] = out.stats or stats[i]

    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch):
        await asyncio.gather(*(one(i) for i in range(start, min(start + batch, len(prompts)))))
    return texts, stats, sentence_ms, time.perf_counter() - t0


def run_bench(
    engine: Engine, batches: list[int], max_new_tokens: int, block_size: int, threshold: float, n_prompts: int, sweep: list[float] = (),
    factor: float = DecodeParams.factor,
) -> dict:
    prompts = conversations()[:n_prompts]
    prompt_tokens = [len(engine.encode_prompt(p)) for p in prompts]
    runs: list[Run] = []
    # Warm-up: first forwards pay for allocations and kernel selection.
    asyncio.run(engine.generate(prompts[0], DecodeParams(max_new_tokens=block_size, block_size=block_size)))
    configs = ([AR, VERIFY] if engine.model.config.causal_prompt else []) + CONFIGS
    todo = [(b, c, threshold) for b in batches for c in configs] + [(batches[0], SWEPT, tau) for tau in sweep]
    sweep_runs: list[Run] = []
    bar = tqdm(todo, desc="engine bench", unit="run")
    for i, (batch, (name, policy, cache, early_stop), tau) in enumerate(bar):
        swept = i >= len(todo) - len(sweep)
        name = f"{name}, tau {tau}" if swept else name
        bar.set_postfix_str(f"{name}, batch {batch}")
        params = DecodeParams(
            policy=policy, cache=cache, early_stop=early_stop, threshold=tau, factor=factor, block_size=1 if name == AR[0] else block_size,
            max_new_tokens=max_new_tokens,
        )
        texts, stats, sentence_ms, wall = asyncio.run(_measure(engine, prompts, params, batch))
        tokens = sum(s.new_tokens for s in stats)
        run = Run(
            name=name, policy=policy, cache=cache, early_stop=early_stop, batch=batch,
            tokens_per_s=tokens / wall,
            tokens_per_forward=tokens / sum(s.forwards for s in stats),
            first_block_ms=statistics.mean(s.first_block_ms for s in stats),
            first_sentence_ms=statistics.mean(ms) if (ms := [m for m in sentence_ms if m is not None]) else None,
            total_ms=statistics.mean(s.total_ms for s in stats),
            new_tokens=tokens / len(stats),
            forwards=statistics.mean(s.forwards for s in stats),
            replies=texts,
        )
        (sweep_runs if swept else runs).append(run)
    reference_texts = next(r.replies for r in runs if r.name == CONFIGS[0][0])
    for run in runs + sweep_runs:
        run.agreement = sum(a == b for a, b in zip(run.replies, reference_texts)) / len(reference_texts)
        same_batch = {r.name: r for r in runs if r.batch == run.batch}
        run.speedup_vs_reference = run.tokens_per_s / same_batch[CONFIGS[0][0]].tokens_per_s
        run.speedup_vs_early_stop_vanilla = run.tokens_per_s / same_batch[CONFIGS[1][0]].tokens_per_s
        if AR[0] in same_batch:
            run.speedup_vs_ar = run.tokens_per_s / same_batch[AR[0]].tokens_per_s
    cfg = engine.model.config
    return {
        "conditions": {
            "max_new_tokens": max_new_tokens,
            "block_size": block_size,
            "threshold": threshold,
            "factor": factor,
            "prompts": len(prompts),
            "prompt_tokens_mean": statistics.mean(prompt_tokens),
            "model": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "vocab_size": cfg.vocab_size,
                      "parameters": engine.model.n_params, "block_causal": cfg.block_causal,
                      "turn_blocks": cfg.turn_blocks},
            "device": str(engine.device),
            "dtype": engine.model.weight_format,
            "threads": torch.get_num_threads(),
            "compiled": engine.model.compiled,
            "cuda_graphs": engine.model.graphed,
            "machine": machine(),
        },
        "runs": [dataclasses.asdict(r) for r in runs],
        "threshold_sweep": [{"threshold": tau, **dataclasses.asdict(r)} for tau, r in zip(sweep, sweep_runs)],
        "prefix_reuse": [run_reuse(engine, p, n_prompts) for p in (
            DecodeParams(threshold=threshold, block_size=block_size, max_new_tokens=max_new_tokens),
            dataclasses.replace(SPOKEN, threshold=threshold),
        )],
    }


def run_reuse(engine: Engine, params: DecodeParams, n_prompts: int) -> dict:
    """Recompute vs cross-turn prefix reuse over the conversations' later turns (batch 1).

    Each turn runs both ways back to back, in alternating order, so that the vCPUs' drift over a
    run (seconds to minutes) does not land on one side."""
    convs = [turn_prompts(c) for c in conversations()[:n_prompts]]
    texts: dict[bool, list[str]] = {False: [], True: []}
    stats: dict[bool, list] = {False: [], True: []}
    flip = False
    for i, turns in enumerate(tqdm(convs, desc="prefix reuse", unit="conv", leave=False)):
        for j, prompt in enumerate(turns):
            flip = not flip
            for reuse in (flip, not flip):
                if reuse or j:  # a first turn only fills the conversation's prefix
                    text, out = asyncio.run(engine.generate(prompt, params, conversation=f"bench-{i}" if reuse else None))
                    if j:
                        texts[reuse].append(text)
                        stats[reuse].append(out.stats)
        engine.forget(f"bench-{i}")

    def summary(st: list) -> dict:
        return {
            "first_block_ms": statistics.mean(s.first_block_ms for s in st),
            "total_ms": statistics.mean(s.total_ms for s in st),
            "tokens_per_s": sum(s.new_tokens for s in st) / sum(s.total_ms for s in st) * 1e3,
        }

    return {
        "policy": params.policy, "cache": params.cache, "block_size": params.block_size, "max_new_tokens": params.max_new_tokens,
        "exact": engine.exact_prefix_reuse, "turns": len(texts[True]),
        "prompt_tokens_mean": statistics.mean(s.prompt_tokens for s in stats[True]),
        "reused_tokens_mean": statistics.mean(s.reused_tokens for s in stats[True]),
        "recompute": summary(stats[False]),
        "reuse": summary(stats[True]),
        "agreement": sum(a == b for a, b in zip(texts[True], texts[False])) / len(texts[True]),
    }


def print_table(result: dict) -> None:
    c = result["conditions"]
    print(f"\nmax_new_tokens {c['max_new_tokens']}, block {c['block_size']}, tau {c['threshold']}, f {c.get('factor', 1.0)}, "
          f"{c['prompts']} prompts of ~{c['prompt_tokens_mean']:.0f} tokens, {c['dtype']} on {c['device']}, {c['threads']} threads"
          + (", compiled layers" if c.get("compiled") else "") + (", CUDA graphs" if c.get("cuda_graphs") else "") + (", block-causal (exact caches: prefix = dual)" if c["model"].get("block_causal") else ""))
    ar = any(r.get("speedup_vs_ar") for r in result["runs"])
    head = (f"{'run':<22}{'batch':>6}{'tok/s':>9}{'tok/fwd':>9}{'1st block ms':>14}{'1st sent. ms':>14}{'total ms':>10}{'tokens':>8}{'agree':>7}"
            f"{'x ref':>7}{'x early':>8}" + (f"{'x AR':>7}" if ar else ""))
    print(head)
    print("-" * len(head))
    for r in result["runs"] + [{**r, "name": f"  tau {r['threshold']}"} for r in result.get("threshold_sweep", [])]:
        sentence = "-" if r.get("first_sentence_ms") is None else f"{r['first_sentence_ms']:.1f}"
        print(f"{r['name']:<22}{r['batch']:>6}{r['tokens_per_s']:>9.1f}{r['tokens_per_forward']:>9.2f}{r['first_block_ms']:>14.1f}{sentence:>14}"
              f"{r['total_ms']:>10.0f}{r['new_tokens']:>8.1f}{r['agreement']:>7.2f}{r['speedup_vs_reference']:>7.1f}{r['speedup_vs_early_stop_vanilla']:>8.1f}"
              + (f"{r['speedup_vs_ar']:>7.1f}" if ar else ""))
    print("\ncross-turn prefix reuse (batch 1, turns 2-4 of each conversation): recompute -> reuse")
    for r in result.get("prefix_reuse", []):
        a, b = r["recompute"], r["reuse"]
        print(f"  {r['policy']}+{r['cache']} block {r['block_size']}, {r['max_new_tokens']} tokens: {r['reused_tokens_mean']:.0f} of "
              f"{r['prompt_tokens_mean']:.0f} prompt tokens reused; first block {a['first_block_ms']:.1f} -> {b['first_block_ms']:.1f} ms, "
              f"total {a['total_ms']:.0f} -> {b['total_ms']:.0f} ms, agreement {r['agreement']:.2f}" + (" (exact: turn blocks)" if r.get("exact") else ""))


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark `add_args`' options describe, print its table and write its JSON."""
    setup_torch(args)
    batches = [int(b) for b in args.batches.split(",")]
    engine = engine_from_args(args, max_batch=max(batches))
    try:
        result = run_bench(engine, batches, args.max_new_tokens, args.block_size, args.threshold, args.prompts, args.thresholds, args.factor)
    finally:
        engine.close()
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", args.json)
    return result


def main(argv: list[str] | None = None) -> dict:
    """`python -m benchmarks.engine`: the same as `dllm bench`."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__)
    add_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except ConfigError as e:  # a missing or broken model directory: no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
