"""Who may call: tokens (header or first message), browser origins, Twilio signatures and single-use
stream tokens, the session limit; the token on the WebRTC offer (401) and the origin (403), HTTP
Basic on /twiml."""

from __future__ import annotations

import asyncio
import base64
import json
import re

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus

from agent.security import twilio_signature
from tests.servers import SID, WAIT, close_code, http, live, recv_json, start_msg

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


def test_tokens_origins_signatures_and_session_limit(voice_agent):
    twilio_token = "tw-auth-token"
    settings = dict(token="s3cret", twilio_auth_token=twilio_token, public_url="https://agent.example.com", allowed_origins=("https://app.example.com",), max_sessions=1, open_timeout_s=1.0)
    with live(voice_agent, **settings) as sec:
        bearer = {"Authorization": "Bearer s3cret"}

        async def run():
            url = sec.url("/v1/realtime")
            with pytest.raises(InvalidStatus) as e:
                await connect(url, additional_headers={"Authorization": "Bearer wrong"})
            assert e.value.response.status_code == 401
            with pytest.raises(InvalidStatus) as e:
                await connect(url, additional_headers=bearer, origin="https://evil.example.com")
            assert e.value.response.status_code == 403

            async with connect(url) as ws:  # a browser: no header, nothing sent in time
                assert await close_code(ws) == 1008
            async with connect(url) as ws:
                await ws.send(json.dumps({"type": "session.auth", "token": "nope"}))
                assert await close_code(ws) == 1008

            async with connect(url, origin="https://app.example.com") as ws:  # a browser with the first-message token
                await ws.send(json.dumps({"type": "session.auth", "token": "s3cret"}))
                assert (await recv_json(ws))["type"] == "session.created"
                async with connect(url, additional_headers=bearer) as second:  # over max_sessions
                    err = await recv_json(second)
                    assert err["type"] == "error" and err["error"]["code"] == "session_limit"
                    assert await close_code(second) == 1013
                status, _, body = http(sec, "/twiml", data=b"CallSid=CA1", headers={"X-Twilio-Signature": twilio_signature(twilio_token, "https://agent.example.com/twiml", [("CallSid", "CA1")])})
                assert status == 200 and '<Reject reason="busy"/>' in body

            for origin in (f"http://127.0.0.1:{sec.port}", "https://agent.example.com"):  # same origin; the public one
                async with connect(url, additional_headers=bearer, origin=origin) as ws:
                    assert (await recv_json(ws))["type"] == "session.created"

            # Twilio: the webhook is signed over the public URL + sorted form fields.
            form = [("From", "+15550001"), ("CallSid", "CA0")]  # the call start_msg names
            body = "&".join(f"{k}={v}" for k, v in form).replace("+", "%2B").encode()
            assert http(sec, "/twiml", data=body)[0] == 403
            assert http(sec, "/twiml", data=body, headers={"X-Twilio-Signature": twilio_signature("other", "https://agent.example.com/twiml", form)})[0] == 403
            status, _, xml = http(sec, "/twiml", data=body, headers={"X-Twilio-Signature": twilio_signature(twilio_token, "https://agent.example.com/twiml", form)})
            assert status == 200 and '<Stream url="wss://agent.example.com/twilio/stream">' in xml
            token = re.search(r'<Parameter name="token" value="([^"]+)"/>', xml).group(1)

            stream = sec.url("/twilio/stream")
            sig = {"X-Twilio-Signature": twilio_signature(twilio_token, "wss://agent.example.com/twilio/stream")}
            with pytest.raises(InvalidStatus) as e:
                await connect(stream)
            assert e.value.response.status_code == 403
            async with connect(stream, additional_headers=sig) as ws:
                await ws.send(start_msg("not-the-token"))
                assert await close_code(ws) == 1008
            async with connect(stream, additional_headers=sig) as ws:
                await ws.send(start_msg(token))
                await ws.send(json.dumps({"event": "stop", "streamSid": SID}))
                assert await close_code(ws) == 1000
            async with connect(stream, additional_headers=sig) as ws:  # single use
                await ws.send(start_msg(token))
                assert await close_code(ws) == 1008
            async with connect(stream, additional_headers=sig) as ws:  # connected, then nothing
                await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
                assert await close_code(ws) == 1008

        asyncio.run(run())


def self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(certfile), str(keyfile)


def test_tls_serves_https_and_wss_and_nothing_in_the_clear(voice_agent, tmp_path):
    import ssl
    import urllib.request

    certfile, keyfile = self_signed(tmp_path)
    trusted = ssl.create_default_context(cafile=certfile)
    with live(voice_agent, ssl=(certfile, keyfile)) as srv:
        with urllib.request.urlopen(srv.url("/health", "https"), context=trusted, timeout=WAIT) as r:
            assert r.status == 200 and json.load(r)["status"] == "ok"

        async def run():
            async with connect(srv.url("/v1/realtime", "wss"), ssl=trusted) as ws:
                assert (await recv_json(ws))["type"] == "session.created"
            with pytest.raises(InvalidMessage):  # the clear-text handshake gets no HTTP answer
                async with connect(srv.url("/v1/realtime", "ws"), open_timeout=WAIT):
                    pass

        asyncio.run(run())
