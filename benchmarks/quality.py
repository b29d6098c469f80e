"""python -m benchmarks.quality [--model DIR] --json OUT — held-out loss and replies to 40 everyday prompts."""

from dllm_engine.quality import main

if __name__ == "__main__":
    main()
