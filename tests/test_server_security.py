"""Who may call: the token on the WebRTC offer (401) and the browser origin (403), HTTP Basic on /twiml."""

from __future__ import annotations

import base64
import json

import pytest

from tests.servers import http, live

TOKEN = "s3cret"
OFFER = json.dumps({"type": "offer", "sdp": "v=0 not checked before admission"}).encode()


@pytest.fixture(scope="module")
def secured(voice_agent):
    with live(voice_agent, token=TOKEN, allowed_origins=("https://app.example.com",)) as s:
        yield s


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": f"Bearer {TOKEN}", "Origin": "https://evil.example.com"}, 403),
    ({"Authorization": f"Bearer {TOKEN}", "Origin": "https://app.example.com"}, 400),  # admitted: the offer itself is refused
])
def test_the_webrtc_offer_needs_the_token_and_an_allowed_origin(secured, headers, status):
    got, _, body = http(secured, "/v1/webrtc/offer", data=OFFER, headers={"Content-Type": "application/json", **headers})
    assert got == status, body


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    (basic("twilio", "wrong"), 401),
    ({"Authorization": "Basic %%%"}, 401),
    (basic("twilio", TOKEN), 200),  # https://twilio:TOKEN@host/twiml, as Twilio's console allows
])
def test_twiml_takes_the_token_as_http_basic(secured, headers, status):
    got, _, body = http(secured, "/twiml", data=b"CallSid=CA1", headers=headers)
    assert got == status, body
    if status == 401:
        assert "unauthorized" in body
    else:
        assert '<Parameter name="token"' in body
