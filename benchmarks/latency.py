"""python -m benchmarks.latency [--transport ws|twilio|inproc] [--url ws://HOST:PORT] [--callers 1,2,4,8] --json OUT --report OUT.html

Caller voice-to-voice latency; the same as `voice-agent bench` (see --help).
"""

from agent.bench import main

if __name__ == "__main__":
    main()
