"""Who may talk to the agent: tokens, browser Origins, Twilio signatures and one-time stream tokens."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    """Only this machine can reach a server bound here (so no token is needed)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_matches(given: object, expected: str | None) -> bool:
    return isinstance(given, str) and bool(given and expected) and hmac.compare_digest(given.encode(), expected.encode())


def credential(headers: Mapping[str, str]) -> str | None:
    """The secret an `Authorization` header carries: `Bearer TOKEN`, or the password of `Basic user:TOKEN`.

    Basic exists for Twilio, whose webhooks can only carry credentials as https://user:TOKEN@host/twiml.
    """
    value = headers.get("authorization", "")
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip() or None
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(rest.strip(), validate=True).decode().partition(":")[2] or None
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def origin_allowed(headers: Mapping[str, str], allowed: Iterable[str]) -> bool:
    """Browsers send Origin: accept the server's own host, or a listed origin; non-browser clients send none."""
    origin = headers.get("origin")
    if origin is None:
        return True
    if origin.rstrip("/") in {a.rstrip("/") for a in allowed}:
        return True
    return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]] = ()) -> str:
    """Twilio's X-Twilio-Signature: base64 HMAC-SHA1 of the URL followed by the sorted POST name+value pairs."""
    data = url + "".join(k + v for k, v in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def twilio_valid(auth_token: str, signature: str | None, url: str, params: Iterable[tuple[str, str]] = ()) -> bool:
    return bool(signature) and hmac.compare_digest(twilio_signature(auth_token, url, params).encode(), signature.encode())


class StreamTokens:
    """Single-use tokens a TwiML answer hands to its media stream (as a `<Parameter>`): Twilio sends no headers."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._expiry: dict[str, float] = {}

    def mint(self) -> str:
        now = time.monotonic()
        self._expiry = {t: e for t, e in self._expiry.items() if e > now}
        token = secrets.token_urlsafe(24)
        self._expiry[token] = now + self.ttl_s
        return token

    def redeem(self, token: object) -> bool:
        expiry = self._expiry.pop(token, None) if isinstance(token, str) else None
        return expiry is not None and expiry > time.monotonic()

    def __len__(self) -> int:
        return len(self._expiry)
