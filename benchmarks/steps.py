"""python -m benchmarks.steps [--model DIR | --shape llada-8b] --json OUT — per-step latency by cache and batch."""

from dllm_engine.steps import main

if __name__ == "__main__":
    main()
