"""The engine as a network service: an OpenAI-compatible HTTP API (`dllm serve`, openai_api.py) and
the client the voice agent uses to decode on it (remote.py). Imports only the engine."""
