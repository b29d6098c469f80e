"""python -m benchmarks.latency [--callers 1,2,4] [--turns N] --json OUT — caller voice-to-voice latency."""

from agent.bench import main

if __name__ == "__main__":
    main()
