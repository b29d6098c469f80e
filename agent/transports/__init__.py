"""Network transports: each adapts the Session API to one wire protocol (Realtime-style JSON, Twilio)."""
