"""Who may talk to the agent: tokens, browser Origins, Twilio signatures and signed stream tokens."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
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
    """Tokens a TwiML answer hands to its media stream (as a `<Parameter>`: Twilio sends no headers).

    Stateless, so that any replica accepts what another minted: `<expiry>.<HMAC-SHA256 of the call's
    CallSid and the expiry>`, keyed by a secret every replica derives from its configuration. The
    stream's `start` must carry the same CallSid before the expiry (replicas' clocks must agree to
    within seconds). Each process also refuses a token it has already redeemed; across replicas a
    token is single-use only per call: it names that call alone, and only for `ttl_s`.
    """

    def __init__(self, secret: str | bytes, ttl_s: float) -> None:
        self._key = hmac.new(secret.encode() if isinstance(secret, str) else secret, b"twilio stream token", hashlib.sha256).digest()
        self.ttl_s = ttl_s
        self._spent: dict[str, float] = {}  # redeemed here → expiry

    def _mac(self, call_sid: str, expiry: int) -> str:
        digest = hmac.new(self._key, f"{call_sid}\0{expiry}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def mint(self, call_sid: str) -> str:
        expiry = int(time.time() + self.ttl_s)
        return f"{expiry}.{self._mac(call_sid, expiry)}"

    def redeem(self, token: object, call_sid: object) -> bool:
        """Whether `token` was minted (with this secret) for `call_sid` and is unexpired and unused here."""
        if not isinstance(token, str) or not isinstance(call_sid, str) or token.count(".") != 1:
            return False
        expiry_text, mac = token.split(".")
        if not expiry_text.isdigit() or not hmac.compare_digest(mac.encode(), self._mac(call_sid, int(expiry_text)).encode()):
            return False
        now = time.time()
        self._spent = {t: e for t, e in self._spent.items() if e > now}
        if int(expiry_text) <= now or token in self._spent:
            return False
        self._spent[token] = int(expiry_text)
        return True
