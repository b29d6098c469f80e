"""The console scripts, on top of everything else: `dllm` (dllm.py) and `voice-agent` (voice_agent.py)."""
