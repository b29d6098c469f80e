"""The voice agent: sessions that turn caller audio into spoken replies from the dLLM engine."""

from .session import Session
from .voice_agent import Agent, AgentConfig

__all__ = ["Agent", "AgentConfig", "Session"]
