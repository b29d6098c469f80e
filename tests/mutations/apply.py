"""The five deliberate breakages of issue 37, each applied to the working tree in turn, with the
test that must now fail. `python tests/mutations/apply.py [name ...]`; every file is restored.

Not collected by pytest (no test_ prefix): it runs pytest itself, once per breakage.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Breakage:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # each must fail with the breakage in place


BREAKAGES = [
    Breakage("max_batch_1", "dllm_engine/engine.py",
             "        self.model = model\n", "        self.model = model\n        max_batch = 1\n",
             ("tests/test_engine.py::test_continuous_batching_matches_one_by_one",)),
    Breakage("cancel_leaks_slot", "dllm_engine/engine.py",
             "        self._scheduler.free(req)\n", "        if out.finish_reason != 'cancelled':\n            self._scheduler.free(req)\n",
             ("tests/test_engine.py::test_a_cancelled_request_gives_its_slot_back[one_slot]",)),
    Breakage("compile_noop", "dllm_engine/engine.py",
             '        """Compile the model\'s layers and run each kind of forward once, before serving."""\n',
             '        """Compile the model\'s layers and run each kind of forward once, before serving."""\n        return\n',
             ("tests/test_compile.py::test_a_compiled_engine_compiles_before_serving_and_never_again",)),
    Breakage("history_empty", "agent/reply.py",
             '        return " ".join(words)\n', '        return ""\n',
             ("tests/test_voice.py::test_barge_in_cancels_the_reply_and_history_keeps_what_was_heard",)),
    Breakage("history_last_word", "agent/reply.py",
             '        return " ".join(words)\n', '        return " ".join(words[-1:])\n',
             ("tests/test_voice.py::test_barge_in_cancels_the_reply_and_history_keeps_what_was_heard",)),
    Breakage("bench_turns_fail", "benchmarks/latency.py",
             "        res.failed = await self.wait_reply(p)\n", "        res.failed = await self.wait_reply(p) or 'broken on purpose'\n",
             ("tests/test_bench.py::test_short_run_over_websocket", "tests/test_bench.py::test_short_run_as_a_twilio_call")),
]


def run(b: Breakage) -> bool:
    """Apply `b`, run its tests; True if every one of them failed."""
    path = ROOT / b.path
    original = path.read_text()
    assert original.count(b.old) == 1, f"{b.name}: the patch no longer applies to {b.path}"
    path.write_text(original.replace(b.old, b.new))
    try:
        caught = []
        for test in b.tests:
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test], cwd=ROOT, capture_output=True, text=True)
            caught.append(r.returncode == 1)
            print(f"{b.name}: {test} {'FAILED (caught)' if r.returncode == 1 else f'exit {r.returncode} (NOT caught)'}", flush=True)
        return all(caught)
    finally:
        path.write_text(original)


def main(names: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a killed run still restores the file it patched
    chosen = [b for b in BREAKAGES if not names or b.name in names]
    missed = [b.name for b in chosen if not run(b)]
    print("all caught" if not missed else f"not caught: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
