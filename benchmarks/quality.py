"""Quality of a chat model: `python -m benchmarks.quality [--model DIR] --json OUT`.

- held-out masked-token loss at several mask ratios (the eval split of `dllm prepare-data`), and
  the prompt gain: how much lower the fully masked reply loss is with its own prompt than with
  another row's (0: the model ignores the prompt);
- replies to the 40 everyday prompts of `data.QUALITY_PROMPTS` with the default decoding
  (the voice agent's, threshold 0.9, dual cache, blocks of 4, unless the decoding flags say
  otherwise), written out for reading: how many end (EOS / end of turn) within
  48 tokens, how many repeat a word (or a phrase of up to 4 words) three times in a row,
  distinct-2, how many are the commonest reply, how many hold a word the human text has fewer than
  10 times (a non-word blended from rare words' pieces, which a voice would read out);
- the same prompts with the vanilla decoder: how many threshold replies equal the vanilla reply
  exactly, and the tokens/s of the default decoding against vanilla's twice over: early-stopped,
  and as LLaDA's reference runs it (every step a forward over the whole canvas, no early stop: the
  engine benchmark's baseline; its replies are vanilla's, only slower);
- which part of the default decoding makes a reply differ from vanilla's: the threshold policy
  without a cache, and with a prefix cache instead of the dual one (`same_as_vanilla_by_cache`);
- the question set (`training/questions.json`, simple factual and everyday questions with accepted
  answers): how many replies are right, and with `--ar-model` how many the AR model it was
  adapted from gets right on the same prompt ids; over every reply at the default decoding, how
  many hold a word 3-gram three times, and the tokens per forward (reply tokens before the first
  stop token over every forward, block starts included);
- a few multi-turn dialogues (for the model card).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from dllm_engine.config import ConfigError
from dllm_engine.decoding import SPOKEN, DecodeParams
from dllm_engine.engine import Engine
from dllm_engine.loading import load_model
from dllm_engine.options import add_decode_args, add_model_args, decode_params, engine_from_args, model_path, setup_torch
from training.batches import encode_chat, iter_batches, read_jsonl, read_utterances
from training.data import QUALITY_PROMPTS, answers_right, load_questions, prepare, repeats_a_word, words
from training.distill import MIN_WORD_COUNT
from training.objective import eval_loss, prompt_gain

from .common import machine

DIALOGUES = [
    ["Hi, how are you?", "What did you do today?", "That sounds nice. Anything fun planned for the weekend?"],
    ["Do you like music?", "Who is your favorite band?", "Have you seen them live?"],
    ["I just got a new puppy!", "He is a golden retriever.", "Any tips for training him?"],
]


def distinct_2(texts: list[str]) -> float:
    bigrams = [tuple(w[i : i + 2]) for w in map(words, texts) for i in range(len(w) - 1)]
    return len(set(bigrams)) / max(len(bigrams), 1)


def thrice_3gram(text: str) -> bool:
    """A word 3-gram that occurs three times anywhere in the reply (a loop, if not in a row)."""
    grams = collections.Counter(tuple(w[i : i + 3]) for w in [words(text)] for i in range(len(w) - 2))
    return bool(grams) and max(grams.values()) >= 3


async def _replies(engine: Engine, prompts: list[str], params: DecodeParams, desc: str, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    out = []
    for p in tqdm(prompts, desc=desc, unit="prompt"):
        t0 = time.perf_counter()
        text, last = await engine.generate(head + [{"role": "user", "content": p}], params)
        st = last.stats
        out.append({"prompt": p, "reply": text.strip(), "finish": last.finish_reason, "tokens": st.new_tokens, "forwards": st.forwards, "seconds": time.perf_counter() - t0})
    return out


async def _dialogue(engine: Engine, turns: list[str], params: DecodeParams) -> list[dict]:
    """The history is kept within the model's trained prompt length, as the voice agent keeps it."""
    history: list[dict] = []
    for user in turns:
        history.append({"role": "user", "content": user})
        text, _ = await engine.generate(engine.tokenizer.apply_chat_template(history, max_tokens=engine.max_prompt_tokens), params)
        history.append({"role": "assistant", "content": text.strip()})
    return history


def held_out_loss(model_dir: Path, data_dir: Path, reply_len: int, max_prompt_tokens: int, examples: int, ratios: list[float], eval_file: str = "eval.jsonl") -> dict:
    """Masked-token loss in fp32 (the model alone: no engine, no cache), and how much the prompt
    helps (`training.objective.prompt_gain`, nats per reply token: 0 means the model ignores what it is asked)."""
    model, tokenizer = load_model(model_dir, dtype="float32")
    exs = read_jsonl(data_dir / eval_file)
    exs = exs[:: max(1, len(exs) // examples)][:examples]  # evenly spaced, fixed
    rows, _ = encode_chat(tokenizer, exs, reply_len, max_prompt_tokens)
    sp = tokenizer.special
    res = eval_loss(model, list(iter_batches(rows, 32, sp.pad)), sp.mask, ratios, sp.eos)
    res.update(prompt_gain(model, rows, sp.mask, sp.eos, sp.pad))
    return {k: round(v, 4) for k, v in res.items()}


def questions(engine: Engine, params: DecodeParams, system: str | None) -> dict:
    """The question set (`training.data.load_questions`): how many of the model's replies (`engine`
    at `params`) hold an accepted answer."""
    qs = load_questions()
    replies = asyncio.run(_replies(engine, [q.text for q in qs], params, "questions (model)", system))
    return {"questions": len(qs), "right_model": _right(replies, qs), "tokens_per_s_model": _tokens_per_s(replies), "replies_model": replies}


def questions_of_ar(model: dict, ar_dir: Path, device: str, dtype: str, params: DecodeParams, system: str | None) -> dict:
    """The same questions from the autoregressive model the dLLM was adapted from, decoded one token
    per forward (block size 1: its greedy decoding, token for token, as tests/test_convert.py checks
    against transformers) with the same prompt ids and reply cap, on the same device in the same
    dtype. Run it once the model's engine is closed: a second engine's idle OpenMP threads make
    libgomp cut the busy ones' spin-waits (more OpenMP threads than cores), which slows its steps."""
    qs = load_questions()
    ar = Engine.from_pretrained(ar_dir, device=device, dtype=dtype, max_batch=1)
    one_token = dataclasses.replace(params, policy="vanilla", block_size=1)
    try:
        asyncio.run(ar.generate(qs[0].text, one_token))  # warm-up, as the model's engine had
        replies = asyncio.run(_replies(ar, [q.text for q in qs], one_token, "questions (AR)", system))
    finally:
        ar.close()
    return {"right_ar": _right(replies, qs), "tokens_per_s_ar": _tokens_per_s(replies), "replies_ar": replies,
            "accuracy_vs_ar": round(model["right_model"] / max(_right(replies, qs), 1), 3)}


def _right(replies: list[dict], qs: list) -> int:
    return sum(answers_right(r["reply"], q) for r, q in zip(replies, qs))


def _tokens_per_s(replies: list[dict]) -> float:
    return round(sum(r["tokens"] for r in replies) / max(sum(r["seconds"] for r in replies), 1e-9), 1)


def _question_summary(q: dict, answered: list[dict]) -> dict:
    """The question set's figures, and those over every reply at the default decoding (`answered`)."""
    return {
        "questions_right": q["right_model"],
        **({"questions_right_ar": q["right_ar"], "accuracy_vs_ar": q["accuracy_vs_ar"], "tokens_per_s_questions": q["tokens_per_s_model"],
            "tokens_per_s_questions_ar": q["tokens_per_s_ar"]} if "right_ar" in q else {}),
        "replies_with_a_3gram_thrice": sum(thrice_3gram(r["reply"]) for r in answered),
        "tokens_per_forward_all": round(sum(r["tokens"] for r in answered) / max(sum(r["forwards"] for r in answered), 1), 2),
    }


def run(args: argparse.Namespace) -> dict:
    model_dir = model_path(args)
    report: dict = {"model": str(args.model or model_dir), "machine": machine()}  # a named model by its name
    setup_torch(args)
    engine = engine_from_args(args)
    default = decode_params(args).resolved(engine.max_new_tokens)
    vanilla = dataclasses.replace(default, policy="vanilla", cache="none")
    reference = dataclasses.replace(vanilla, early_stop=False)
    try:
        # Warm-up: the first forwards pay for allocations; not any one decoder's time.
        asyncio.run(engine.generate([{"role": "user", "content": QUALITY_PROMPTS[0]}], default))
        if not args.questions_only:
            fast = asyncio.run(_replies(engine, QUALITY_PROMPTS, default, "threshold+dual", args.system))
            slow = asyncio.run(_replies(engine, QUALITY_PROMPTS, vanilla, "vanilla", args.system))
            ref = asyncio.run(_replies(engine, QUALITY_PROMPTS, reference, "vanilla reference", args.system))
            by_cache = {c: asyncio.run(_replies(engine, QUALITY_PROMPTS, dataclasses.replace(default, cache=c), f"threshold+{c}", args.system)) for c in ("none", "prefix")}
            report["dialogues"] = [asyncio.run(_dialogue(engine, d, default)) for d in DIALOGUES]
        report["questions"] = questions(engine, default, args.system)
    finally:
        engine.close()
    if args.ar_model:
        report["questions"] |= questions_of_ar(report["questions"], args.ar_model, str(engine.device), engine.model.weight_format, default, args.system)
    if args.questions_only:
        report["summary"] = _question_summary(report["questions"], report["questions"]["replies_model"])
        return _print_and_write(report, model_dir, args)
    replies = [r["reply"] for r in fast]
    same = lambda rs: round(sum(r["reply"] == s["reply"] for r, s in zip(rs, slow)) / len(rs), 3)  # noqa: E731
    report["decoding"] = {"default": vars(default), "vanilla": vars(vanilla), "reference": vars(reference)}
    report["replies"] = [{**f, "vanilla_reply": s["reply"], "same_as_vanilla": f["reply"] == s["reply"]} for f, s in zip(fast, slow)]
    answered = fast + report["questions"]["replies_model"]  # every reply at the default decoding
    report["summary"] = {
        **_question_summary(report["questions"], answered),
        "prompts": len(fast),
        "ended_within_48_tokens": round(sum(r["finish"] == "stop" and r["tokens"] <= 48 for r in fast) / len(fast), 3),
        "replies_repeating_a_word_3x": sum(map(repeats_a_word, replies)),
        "replies_repeating_a_phrase_3x": sum(repeats_a_word(r, longest=4) for r in replies),  # "I'm sorry, I'm sorry. I'm sorry."
        "distinct_2": round(distinct_2(replies), 3),
        "commonest_reply_count": collections.Counter(replies).most_common(1)[0][1],  # one template for every prompt: 40
        "same_as_vanilla": same(fast),
        "same_as_vanilla_by_cache": {**{c: same(rs) for c, rs in by_cache.items()}, "dual": same(fast)},
        "tokens_per_s_default": _tokens_per_s(fast),
        "tokens_per_s_vanilla": _tokens_per_s(slow),
        "speedup_vs_vanilla": round(_tokens_per_s(fast) / max(_tokens_per_s(slow), 1e-9), 2),
        "tokens_per_s_reference": _tokens_per_s(ref),
        "speedup_vs_reference": round(_tokens_per_s(fast) / max(_tokens_per_s(ref), 1e-9), 2),  # the engine issue's headline
        "tokens_per_forward_default": round(sum(r["tokens"] for r in fast) / max(sum(r["forwards"] for r in fast), 1), 2),
    }
    data_dir = args.data
    if data_dir is None:  # rebuild the split (deterministic)
        data_dir = Path(tempfile.mkdtemp(prefix="dllm-quality-"))
        prepare(data_dir, verbose=False)
    known = collections.Counter(w for line in read_utterances(data_dir / "utterances.txt") for w in words(line))
    report["summary"]["replies_with_rare_words"] = sum(any(known[w] < MIN_WORD_COUNT for w in words(r)) for r in replies)
    if not args.no_loss:
        report["held_out_loss"] = held_out_loss(model_dir, data_dir, args.reply_len, args.max_prompt_tokens, args.examples, [0.25, 0.5, 0.75], args.eval_file)
        report["held_out_file"] = args.eval_file
    return _print_and_write(report, model_dir, args)


def _print_and_write(report: dict, model_dir: Path, args: argparse.Namespace) -> dict:
    s = report["summary"]
    print(f"model {model_dir}")
    for k, v in s.items():
        print(f"  {k:>28}: {v}")
    if "held_out_loss" in report:
        print(f"  {'held-out loss':>28}: " + ", ".join(f"{k} {v}" for k, v in report["held_out_loss"].items()))
    for r in report.get("replies", [])[: args.show]:
        print(f"  > {r['prompt']}\n    {r['reply']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_decode_args(p, SPOKEN.fallback_max_new_tokens, SPOKEN.block_size)  # the voice agent's decoding, by default
    p.add_argument("--ar-model", type=Path, help="the AR model the dLLM was adapted from (a `dllm convert` directory): its question-set accuracy, one token per forward, beside the model's")
    p.add_argument("--system", help="system prompt for every prompt (default: none; the model's chat template may have a default)")
    p.add_argument("--data", type=Path, help="output dir of `dllm prepare-data` (default: rebuilt in a temp dir)")
    p.add_argument("--eval-file", default="eval.jsonl", help="held-out file of --data (distilled-eval.jsonl: teacher replies from `dllm distill --split eval`; default: %(default)s)")
    p.add_argument("--reply-len", type=int, default=24, help="reply region of the held-out rows, as trained (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=64, help="as trained (default: %(default)s)")
    p.add_argument("--examples", type=int, default=500, help="held-out examples scored (default: %(default)s)")
    p.add_argument("--no-loss", action="store_true", help="skip the held-out loss")
    p.add_argument("--questions-only", action="store_true",
                   help="the question set alone (with --ar-model, the AR model's too): accuracy, tokens/s and tokens per forward, without the everyday prompts' decoder comparisons or the held-out loss")
    p.add_argument("--show", type=int, default=10, help="replies printed (all are in the JSON; default: %(default)s)")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if args.eval_file != p.get_default("eval_file") and args.data is None:
        p.error("--eval-file needs --data (a rebuilt split holds eval.jsonl only)")
    if args.data is not None and not args.no_loss and not (args.data / args.eval_file).is_file():
        p.error(f"{args.data / args.eval_file}: not found")  # before minutes of decoding, not after
    try:
        run(args)
    except ConfigError as e:  # a missing or broken model directory
        p.error(str(e))


if __name__ == "__main__":
    main()
