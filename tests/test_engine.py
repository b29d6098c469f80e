"""The async engine: streaming, continuous batching, cancellation and bad requests."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import subprocess
import sys
import threading

import pytest
import torch

from dllm_engine.config import ConfigError
from dllm_engine.decoding import DecodeParams
from dllm_engine.engine import Engine, RequestError
from tests.helpers import WAIT, BatchSizes, eventually


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


LONG = DecodeParams(policy="vanilla", cache="none", block_size=16, max_new_tokens=256, early_stop=False)


async def collect(engine: Engine, prompt, params: DecodeParams, **kw):
    outs = [out async for out in engine.stream(prompt, params, **kw)]
    return "".join(o.text for o in outs), [t for o in outs for t in o.token_ids], outs


def test_stream_deltas_are_ordered_and_final_output_has_stats(engine):
    params = DecodeParams(policy="threshold", cache="dual", threshold=0.3, block_size=8, max_new_tokens=32, early_stop=False)
    text, ids, outs = asyncio.run(collect(engine, chat("hello"), params, step_events=True))
    assert outs[-1].finished and outs[-1].stats is not None
    assert not any(o.finished for o in outs[:-1])
    assert text == engine.tokenizer.decode(ids)
    assert outs[-1].stats.new_tokens == len(ids)
    steps = [o.step for o in outs if o.step]
    assert steps and sum(len(s.positions) for s in steps) == 32  # every canvas position committed once
    assert sorted(p for s in steps for p in s.positions) == list(range(32))


def test_continuous_batching_matches_one_by_one(engine):
    """More requests than slots, with different lengths and settings, joining while others run."""
    cases = [
        (chat("what do you like to do?"), DecodeParams(policy="vanilla", cache="none", block_size=8, max_new_tokens=24, early_stop=False)),
        (chat("hi"), DecodeParams(policy="threshold", cache="dual", threshold=0.2, block_size=8, max_new_tokens=40, early_stop=False)),
        (chat("tell me about your weekend please"), DecodeParams(policy="factor", cache="prefix", block_size=16, max_new_tokens=32, early_stop=False)),
        (chat("good morning"), DecodeParams(cache="dual", block_size=8, max_new_tokens=16, temperature=0.7, seed=11, early_stop=False)),
        ("raw text prompt without a template", DecodeParams(cache="dual", block_size=8, max_new_tokens=16, early_stop=False)),
    ]

    async def main():
        alone = [await collect(engine, p, params) for p, params in cases]
        with BatchSizes(engine.model) as rows:
            together = await asyncio.gather(*(collect(engine, p, params) for p, params in cases))
        return alone, together, rows

    alone, together, rows = asyncio.run(main())
    assert max(rows) > 1, "no forward carried more than one request: nothing was batched"
    assert max(rows) <= engine.max_batch
    assert [a[1] for a in together] == [a[1] for a in alone]
    assert [a[0] for a in together] == [a[0] for a in alone]


def test_cancel_frees_the_request_and_others_continue(engine):
    short = DecodeParams(cache="dual", block_size=8, max_new_tokens=16, early_stop=False)

    async def main():
        solo = await collect(engine, chat("keep going"), short)
        long_stream = engine.stream(chat("talk for a long time"), LONG, request_id="long", step_events=True)
        first = await long_stream.__anext__()
        assert engine.active_requests == 1
        other = asyncio.create_task(collect(engine, chat("keep going"), short))
        assert engine.cancel("long")
        rest = [o async for o in long_stream]
        return solo, first, rest, await other

    solo, first, rest, other = asyncio.run(main())
    assert not first.finished
    assert rest[-1].finished and rest[-1].finish_reason == "cancelled"
    assert rest[-1].stats.forwards < 256
    assert other[1] == solo[1]
    assert engine.active_requests == 0
    assert not engine.cancel("long")  # already gone


@pytest.mark.parametrize("engine", [{"max_batch": 1}], indirect=True, ids=["one_slot"])
def test_a_cancelled_request_gives_its_slot_back(engine):
    """With one slot, a leaked slot would leave the next request waiting for ever (bounded here by WAIT)."""

    async def cancel_one(request_id: str) -> None:
        stream = engine.stream(chat("talk for a long time"), LONG, request_id=request_id, step_events=True)
        await asyncio.wait_for(anext(stream), WAIT)
        assert engine.cancel(request_id)

        async def last() -> object:
            async for out in stream:  # steps already on their way, then the cancellation
                pass
            return out

        assert (await asyncio.wait_for(last(), WAIT)).finish_reason == "cancelled"

    async def main():
        for k in range(3):  # each cancel must give the one slot back
            await cancel_one(f"long-{k}")
        return await asyncio.wait_for(engine.generate(chat("next"), DecodeParams(block_size=8, max_new_tokens=8)), WAIT)

    _, out = asyncio.run(main())
    assert out.finished and out.finish_reason in ("stop", "length")
    assert engine.active_requests == 0


@pytest.mark.parametrize("engine", [{"max_batch": 1}], indirect=True, ids=["one_slot"])
def test_a_request_cancelled_while_queued_keeps_no_prefix_and_one_cancelled_mid_reply_keeps_what_settled(engine):
    """A barge-in's prompt is worth keeping for the next turn; a request that never had a slot has nothing to keep."""

    async def main():
        running = engine.stream(chat("talk for a long time"), LONG, request_id="mid", conversation="mid")
        await asyncio.wait_for(anext(running), WAIT)
        queued = engine.stream(chat("and me"), LONG, request_id="queued", conversation="queued")
        waiting = asyncio.create_task(anext(queued))
        await eventually(lambda: engine.active_requests == 2, "the second request was not submitted")
        assert engine.cancel("queued") and engine.cancel("mid")
        assert (await asyncio.wait_for(waiting, WAIT)).finish_reason == "cancelled"
        async for out in running:
            pass
        assert out.finish_reason == "cancelled"
        return await asyncio.wait_for(engine.generate(chat("next"), DecodeParams(block_size=8, max_new_tokens=8)), WAIT)

    _, out = asyncio.run(main())
    assert out.finished and "mid" in engine._prefixes and "queued" not in engine._prefixes


def test_leaving_the_stream_early_cancels(engine):
    async def main():
        async for _ in engine.stream(chat("hello"), LONG, request_id="x", step_events=True):
            break
        await eventually(lambda: engine.active_requests == 0, "the abandoned request was not cancelled")

    asyncio.run(main())


@pytest.mark.parametrize("engine", [{"max_batch": 1}], indirect=True, ids=["one_slot"])
def test_a_request_whose_callers_event_loop_closed_stops_at_its_next_output(engine):
    """A client loop that ends mid-request (a closed test, a dropped server loop) only drops its request,
    and frees its slot at the next output instead of decoding its 256 tokens for nobody."""

    async def start_and_walk_away():
        agen = engine.stream(chat("hello"), LONG, request_id="orphan")
        await agen.__anext__()  # the request runs; this loop now ends without closing the stream

    with BatchSizes(engine.model) as rows:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(start_and_walk_away())
        loop.close()
        before = len(rows)
        _, _, outs = asyncio.run(asyncio.wait_for(collect(engine, chat("hi"), DecodeParams(block_size=8, max_new_tokens=16)), WAIT))
    assert outs[-1].finished and engine._thread.is_alive()
    orphaned = len(rows) - before - outs[-1].stats.forwards  # the orphan's forwards after its loop closed (one slot: none shared)
    assert orphaned <= 2


def test_bad_requests_get_clear_errors_and_engine_keeps_serving(engine):
    ok = DecodeParams(cache="dual", block_size=8, max_new_tokens=8)

    async def main():
        with pytest.raises(RequestError, match="exceeds the context of 512 tokens"):
            await engine.generate("word " * 600, ok)
        with pytest.raises(RequestError, match="prompt is empty"):
            await engine.generate("", ok)
        with pytest.raises(RequestError, match="outside the vocabulary"):
            await engine.generate([1, 2, 10**9], ok)
        with pytest.raises(RequestError, match="must be a string"):
            await engine.generate(42, ok)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="role"):
            await engine.generate([{"role": "user"}], ok)
        running = engine.stream(chat("hi"), LONG, request_id="dup", step_events=True)
        await running.__anext__()
        with pytest.raises(RequestError, match="request id 'dup' is already running"):
            await engine.generate(chat("hi"), ok, request_id="dup")
        await running.aclose()
        text, out = await engine.generate(chat("still there?"), ok)
        return out

    out = asyncio.run(main())
    assert out.finished and out.finish_reason in ("stop", "length")


def test_early_stop_reports_stop(eot_model):
    model, tok = eot_model
    engine = Engine(model, tok, max_batch=1, max_len=256)
    try:
        text, out = asyncio.run(engine.generate(chat("hi"), DecodeParams(max_new_tokens=64, block_size=32)))
    finally:
        engine.close()
    assert out.finish_reason == "stop" and out.stats.forwards == 1 and text == ""


def test_prefix_reuse_loads_the_common_prefix_and_never_recomputes_it(engine):
    params = DecodeParams(cache="dual", threshold=0.3, block_size=8, max_new_tokens=16, early_stop=False)
    turn1 = chat("hello there")
    prompt1 = engine.encode_prompt(turn1)

    async def main():
        text1, ids1, outs1 = await collect(engine, turn1, params, conversation="c")
        kept = engine._prefixes["c"]
        stored_k = [k.clone() for k in kept.k]
        # The last full forward began the second block: the prompt and the first block are settled.
        assert kept.ids == prompt1 + ids1[:8]
        turn2 = turn1 + [{"role": "assistant", "content": text1}, {"role": "user", "content": "and you?"}]
        prompt2 = engine.encode_prompt(turn2)
        reused = await collect(engine, turn2, params, conversation="c")
        expected = next(i for i, (a, b) in enumerate(zip(kept.ids + [-1], prompt2)) if a != b)
        assert reused[2][-1].stats.reused_tokens == expected >= len(prompt1)
        for before, after in zip(stored_k, engine._prefixes["c"].k):  # loaded, never rewritten
            assert torch.equal(before[:expected], after[:expected])
        engine.forget("c")
        assert "c" not in engine._prefixes
        fresh = await collect(engine, turn2, params, conversation="c")
        plain = await collect(engine, turn2, params)
        assert fresh[2][-1].stats.reused_tokens == 0
        assert fresh[1] == plain[1]  # nothing to reuse: exactly the full recompute

    asyncio.run(main())


def test_an_approximate_prefix_is_never_shared_between_conversations(engine):
    """A bidirectional model's cached keys saw their own prompt's end: another conversation whose
    prompt starts the same way recomputes it."""
    params = DecodeParams(cache="dual", threshold=0.3, block_size=8, max_new_tokens=8)
    assert not engine.exact_prefix_reuse and engine.share_prefixes

    async def main():
        await engine.generate(chat("hello there"), params, conversation="first")
        _, out = await engine.generate(chat("hello there, friend"), params, conversation="second")
        return out

    out = asyncio.run(main())
    assert engine._prefixes["first"].reusable(engine.encode_prompt(chat("hello there, friend"))) > 0
    assert out.stats.reused_tokens == 0


def test_generate_reuses_a_conversations_prefix_as_stream_does(engine):
    params = DecodeParams(cache="dual", threshold=0.3, block_size=8, max_new_tokens=16, early_stop=False)
    turn1 = chat("hello there")

    async def main():
        text, first = await engine.generate(turn1, params, conversation="g")
        turn2 = turn1 + [{"role": "assistant", "content": text}, {"role": "user", "content": "and you?"}]
        _, second = await engine.generate(turn2, params, conversation="g")
        return first, second

    first, second = asyncio.run(main())
    assert first.stats.reused_tokens == 0 and second.stats.reused_tokens >= len(engine.encode_prompt(turn1))


def test_a_closed_engine_refuses_requests_and_its_thread_ends(random_model):
    model, tok = random_model
    engine = Engine(model, tok, max_batch=1, max_len=256)
    engine.close()
    assert not engine._thread.is_alive()
    with pytest.raises(RequestError, match="the engine is closed"):
        asyncio.run(collect(engine, chat("hi"), DecodeParams(block_size=8, max_new_tokens=8)))
    engine.close()  # a second close is harmless


def test_closing_the_engine_ends_the_requests_it_was_serving_with_an_error(random_model):
    model, tok = random_model
    engine = Engine(model, tok, max_batch=1, max_len=512)

    async def main():
        stream = engine.stream(chat("hello"), LONG)
        await anext(stream)  # the request is running
        await asyncio.to_thread(engine.close)
        with pytest.raises(RequestError, match="the engine is closed"):
            async for _ in stream:
                pass

    asyncio.run(main())


def test_an_engine_thread_that_fails_fails_its_requests_and_refuses_more(random_model):
    """A bug outside a decoding step ends the thread: callers get the error instead of waiting forever."""
    model, tok = random_model
    engine = Engine(model, tok, max_batch=1, max_len=256)

    def broken(req):
        raise RuntimeError("boom")

    engine._load_prefix = broken
    params = DecodeParams(block_size=8, max_new_tokens=8)
    with pytest.raises(RequestError, match=r"the engine stopped \(RuntimeError: boom\)"):
        asyncio.run(collect(engine, chat("hi"), params))
    engine._thread.join(timeout=10)
    assert not engine._thread.is_alive() and engine.active_requests == 0
    with pytest.raises(RequestError, match="the engine stopped"):
        asyncio.run(collect(engine, chat("hi"), params))


class HeldForwards:
    """Holds the model's forwards until `release()`: the engine thread stays inside its step meanwhile."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.entered, self.released = threading.Event(), threading.Event()
        self._hook = model.register_forward_pre_hook(self._hold)

    def _hold(self, _module: torch.nn.Module, _args: tuple) -> None:
        self.entered.set()
        self.released.wait()

    def release(self) -> None:
        self._hook.remove()
        self.released.set()


def test_by_default_eight_requests_share_a_forward(random_model):
    model, tok = random_model
    engine = Engine(model, tok, max_len=256)
    params = DecodeParams(policy="vanilla", cache="none", block_size=8, max_new_tokens=16, early_stop=False)

    held = HeldForwards(model)

    async def main():
        with BatchSizes(model) as rows:
            first = asyncio.create_task(collect(engine, chat("hi"), params))
            await asyncio.to_thread(held.entered.wait, WAIT)  # nine more queue while the first one's forward is held
            rest = [asyncio.create_task(collect(engine, chat(f"hi {i}"), params)) for i in range(9)]
            await eventually(lambda: engine.active_requests == 10, "the requests were not submitted")
            held.release()
            await asyncio.wait_for(asyncio.gather(first, *rest), WAIT)
        return rows

    try:
        rows = asyncio.run(main())
    finally:
        held.release()
        engine.close()
    assert max(rows) == 8


def test_close_gives_up_waiting_for_a_forward_that_does_not_return(random_model):
    model, tok = random_model
    engine = Engine(model, tok, max_batch=1, max_len=512)
    held = HeldForwards(model)

    async def main():
        request = asyncio.create_task(collect(engine, chat("hello"), LONG))
        await asyncio.to_thread(held.entered.wait, WAIT)
        closer = threading.Thread(target=engine.close, kwargs={"timeout": 0.1})
        closer.start()
        await asyncio.to_thread(closer.join, WAIT)
        assert not closer.is_alive() and engine._thread.is_alive()  # close() returned; the engine thread is still stuck
        held.release()
        with pytest.raises(RequestError, match="the engine is closed"):  # and once unstuck, it ends its request
            await asyncio.wait_for(request, WAIT)

    try:
        asyncio.run(main())
    finally:
        held.release()
    engine._thread.join(WAIT)
    assert not engine._thread.is_alive()


class WatchedQueue(queue.Queue):
    """The engine's command queue, noting whether its reader is blocked waiting for a command."""

    waiting = False

    def get(self, block: bool = True, timeout: float | None = None) -> object:
        self.waiting = block
        try:
            return super().get(block, timeout)
        finally:
            self.waiting = False


def test_an_idle_engine_waits_for_work_instead_of_spinning(random_model, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(queue, "Queue", WatchedQueue)
        engine = Engine(*random_model, max_batch=1, max_len=256)
    try:
        asyncio.run(collect(engine, chat("hi"), DecodeParams(block_size=8, max_new_tokens=8)))
        asyncio.run(eventually(lambda: engine._commands.waiting, "the idle engine never blocked on its queue: it spins"))
    finally:
        engine.close()


def test_an_engine_left_open_does_not_keep_its_program_from_exiting(random_model_dir):
    program = f"from dllm_engine.engine import Engine; Engine.from_pretrained({str(random_model_dir)!r}); print('exiting')"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0 and done.stdout == "exiting\n", done.stderr


def test_a_conversation_forgotten_while_it_decodes_keeps_nothing(engine):
    async def main():
        stream = engine.stream(chat("hello"), LONG, conversation="gone")
        first = await anext(stream)  # the request is running
        engine.forget("gone")
        outs = [first] + [o async for o in stream]
        assert outs[-1].finish_reason == "length"
        assert "gone" not in engine._prefixes

    asyncio.run(main())


def test_prefix_reuse_keeps_few_conversations_and_a_diverging_prompt_reuses_nothing(random_model):
    model, tok = random_model
    engine = Engine(model, tok, max_batch=2, max_len=256, max_conversations=2)
    params = DecodeParams(block_size=8, max_new_tokens=8)
    try:

        async def main():
            for name in ("a", "b", "c"):
                await collect(engine, chat(f"conversation {name}"), params, conversation=name)
            assert list(engine._prefixes) == ["b", "c"]  # the least recently used is dropped
            out = await collect(engine, "raw text, no chat template", params, conversation="c")
            assert out[2][-1].stats.reused_tokens == 0

        asyncio.run(main())
    finally:
        engine.close()


def test_an_open_max_new_tokens_is_the_models_reply_length_from_its_generation_config(random_model_dir, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(random_model_dir, d)
    (d / "generation_config.json").write_text('{"max_new_tokens": 12, "max_prompt_tokens": 20}')
    eng = Engine.from_pretrained(d, dtype="float32", max_batch=1)
    try:
        assert eng.max_prompt_tokens == 20  # for the agent's history budget
        open_cap = DecodeParams(policy="vanilla", cache="none", block_size=4, early_stop=False)
        assert len(asyncio.run(collect(eng, chat("hi"), open_cap))[1]) == 12  # the whole canvas: the model's 12
        explicit = DecodeParams(policy="vanilla", cache="none", block_size=4, max_new_tokens=8, early_stop=False)
        assert len(asyncio.run(collect(eng, chat("hi"), explicit))[1]) == 8  # asked for: wins
    finally:
        eng.close()
    eng = Engine.from_pretrained(random_model_dir, dtype="float32", max_batch=1)  # no generation_config.json
    try:
        fallback = DecodeParams(policy="vanilla", cache="none", block_size=4, early_stop=False, fallback_max_new_tokens=20)
        assert len(asyncio.run(collect(eng, chat("hi"), fallback))[1]) == 20
        assert eng.max_prompt_tokens is None
    finally:
        eng.close()
    for bad, key in (('{"max_new_tokens": "long"}', "max_new_tokens"), ('{"max_prompt_tokens": 0}', "max_prompt_tokens"), ('{"block_size": true}', "block_size")):
        (d / "generation_config.json").write_text(bad)
        with pytest.raises(ConfigError, match=f"generation_config.json: {key} must be a positive integer"):
            Engine.from_pretrained(d, dtype="float32")
    (d / "generation_config.json").write_text("[12]")
    with pytest.raises(ConfigError, match="generation_config.json: not a JSON object"):
        Engine.from_pretrained(d, dtype="float32")
    (d / "generation_config.json").write_text('{"policy": "guess"}')
    with pytest.raises(ConfigError, match="generation_config.json: policy must be one of vanilla, threshold"):
        Engine.from_pretrained(d, dtype="float32")


def test_a_request_without_params_decodes_as_the_model_directory_says(random_model_dir, tmp_path):
    """`policy` and `block_size` in generation_config.json (a converted AR checkpoint's one token per
    forward, a trained model's blocks): the engine's default params, and what `dllm generate` and
    the agent start from."""
    import shutil

    d = tmp_path / "model"
    shutil.copytree(random_model_dir, d)
    (d / "generation_config.json").write_text('{"policy": "vanilla", "block_size": 2, "max_new_tokens": 6}')
    eng = Engine.from_pretrained(d, dtype="float32", max_batch=1)
    try:
        assert (eng.default_params.policy, eng.default_params.block_size) == ("vanilla", 2)
        _, out = asyncio.run(eng.generate(chat("hi")))
        _, same = asyncio.run(eng.generate(chat("hi"), DecodeParams(policy="vanilla", block_size=2, max_new_tokens=6)))
        _, threshold = asyncio.run(eng.generate(chat("hi"), DecodeParams(max_new_tokens=6)))
    finally:
        eng.close()
    assert (out.stats.blocks, out.stats.forwards) == (same.stats.blocks, same.stats.forwards) == (3, 6)
    assert threshold.stats.blocks == 1  # the engine's own default, blocks of 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, None])
def test_from_pretrained_loads_the_weights_in_the_dtype_asked_for(random_model_dir, dtype):
    """None: the default, "auto" (bf16 where the CPU has it)."""
    from dllm_engine.loading import resolve_dtype

    kw = {} if dtype is None else {"dtype": str(dtype).removeprefix("torch.")}
    eng = Engine.from_pretrained(random_model_dir, max_batch=1, **kw)
    try:
        assert {p.dtype for p in eng.model.parameters()} == {dtype or resolve_dtype("auto", torch.device("cpu"))}
    finally:
        eng.close()


def test_early_stop_only_skips_forwards_after_the_reply(tiny_chat):
    """The quality report's reference run (vanilla without early stop) says vanilla's replies."""
    from tests.helpers import PAIRS

    engine = Engine.from_pretrained(tiny_chat / "model", dtype="float32", max_batch=1)
    vanilla = DecodeParams(policy="vanilla", cache="none", block_size=4, max_new_tokens=32)
    try:
        for prompt, _ in PAIRS[:3]:
            text, out = asyncio.run(engine.generate(chat(prompt), vanilla))
            ref_text, ref = asyncio.run(engine.generate(chat(prompt), dataclasses.replace(vanilla, early_stop=False)))
            assert out.finish_reason == "stop" and text.strip()
            assert ref_text == text and ref.stats.new_tokens == out.stats.new_tokens
            assert ref.stats.forwards == 32 > out.stats.forwards
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_an_engine_with_cuda_graphs_decodes_as_it_does_without(random_model_dir, cache):
    """Each kind of step (prefix steps shrink block by block) is captured at its first call and
    replayed after. One request at a time: how concurrent ones batch depends on timing, and a
    GPU's kernels for another batch size may round differently."""
    params = DecodeParams(cache=cache, threshold=0.3, block_size=8, max_new_tokens=32, early_stop=False)
    prompts = ["hi", "what do you like to do on a sunny weekend?", "good morning", "tell me a story"]
    replies = []
    for graphs in (False, True):
        engine = Engine.from_pretrained(random_model_dir, device="cuda", dtype="float32", max_batch=3, cuda_graphs=graphs)

        async def main():
            return [(await engine.generate(chat(p), params))[0] for p in prompts]

        try:
            replies.append(asyncio.run(main()))
        finally:
            engine.close()
    assert replies[1] == replies[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_graphs_are_shared_by_prompts_of_other_lengths(random_model_dir):
    """Keys padded to a multiple of GRAPH_KEYS_BUCKET and queries to a power of two: a second
    request a few tokens longer replays the first one's graphs, and decodes as it would eagerly."""
    params = DecodeParams(cache="dual", threshold=0.3, block_size=8, max_new_tokens=16, early_stop=False)
    prompts = ["hi", "hi there"]
    replies = []
    for graphs in (False, True):
        engine = Engine.from_pretrained(random_model_dir, device="cuda", dtype="float32", max_batch=1, cuda_graphs=graphs)
        try:
            lengths = [len(engine.encode_prompt(chat(p))) for p in prompts]
            assert lengths[0] < lengths[1] and (lengths[0] + 8 - 1).bit_length() == (lengths[1] + 8 - 1).bit_length()
            replies.append([asyncio.run(engine.generate(chat(prompts[0]), params))[0]])
            captured = len(engine.model._layers.graphs) if graphs else 0
            replies[-1].append(asyncio.run(engine.generate(chat(prompts[1]), params))[0])
            if graphs:
                assert captured >= 2 and len(engine.model._layers.graphs) == captured  # nothing new to capture
        finally:
            engine.close()
    assert replies[1] == replies[0]


def test_a_failed_step_fails_its_requests_keeps_no_prefix_and_the_engine_serves_on(random_model):
    """A forward that raises (out of memory, a bad kernel) ends that step's requests with an error; their cache is not trusted."""
    model, tok = random_model
    engine = Engine(model, tok, max_batch=2, max_len=512)
    step, calls = engine.runner.step, []

    def failing_once(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 3:  # after the prompt has settled
            raise RuntimeError("out of memory")
        return step(*args, **kwargs)

    engine.runner.step = failing_once
    with pytest.raises(RequestError, match="^engine step failed: out of memory$"):
        asyncio.run(collect(engine, chat("hello"), LONG, conversation="c"))
    assert "c" not in engine._prefixes and engine.active_requests == 0
    _, out = asyncio.run(engine.generate(chat("again"), DecodeParams(block_size=8, max_new_tokens=8)))
    assert out.finished
    engine.close()
