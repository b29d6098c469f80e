"""python -m benchmarks.engine [--model PATH] --json OUT — the same as `dllm bench`."""

from dllm_engine.cli import main

if __name__ == "__main__":
    import sys

    main(["bench", *sys.argv[1:]])
