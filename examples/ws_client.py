"""Ask the voice agent one spoken question over its WebSocket and save the spoken answer.

    .venv/bin/voice-agent serve &
    .venv/bin/python examples/ws_client.py question.wav --out answer.wav

The WAV must be 16-bit mono at a common rate (8000 to 48000 Hz).
Needs only `websockets` and the standard library.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import wave

from websockets.asyncio.client import connect


async def ask(url: str, wav_in: str, wav_out: str, token: str | None = None) -> str:
    with wave.open(wav_in) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise SystemExit("need a 16-bit mono WAV")
        rate, pcm = w.getframerate(), w.readframes(w.getnframes())
    headers = {"Authorization": f"Bearer {token}"} if token else None
    reply = bytearray()
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        created = json.loads(await ws.recv())
        out_rate = created["session"]["output_sample_rate"]
        await ws.send(json.dumps({"type": "session.update", "session": {"input_sample_rate": rate}}))
        for i in range(0, len(pcm), rate // 5 * 2):  # 200 ms per message, as base64 pcm16
            chunk = base64.b64encode(pcm[i : i + rate // 5 * 2]).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))  # the question is over
        async for raw in ws:
            event = json.loads(raw)
            if event["type"] == "conversation.item.input_audio_transcription.completed":
                print("you:  ", event["transcript"])
            elif event["type"] == "response.output_audio.delta":
                reply += base64.b64decode(event["delta"])
            elif event["type"] == "error":
                print("error:", event["error"]["message"])
            elif event["type"] == "response.output_audio_transcript.done":
                print("agent:", event["transcript"])
            elif event["type"] == "response.done":
                break
    with wave.open(wav_out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(out_rate)
        w.writeframes(bytes(reply))
    return event["response"]["output"][0]["content"][0]["transcript"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wav", help="the question: 16-bit mono WAV")
    p.add_argument("--out", default="answer.wav", help="where to write the spoken answer (default: %(default)s)")
    p.add_argument("--url", default="ws://127.0.0.1:8000/v1/realtime", help="(default: %(default)s)")
    p.add_argument("--token", help="the server's --token, if it has one")
    args = p.parse_args()
    asyncio.run(ask(args.url, args.wav, args.out, args.token))


if __name__ == "__main__":
    main()
