"""`session.update` translated, and the session described, field by field (agent/transports/realtime_config.py).

Pure functions, so every key of the three shapes, each refusal's exact message and each field of
`session.created` are checked directly; tests/test_realtime_protocol.py checks the connection that
applies them, tests/test_realtime.py a live server with the official client.
"""

from __future__ import annotations

import numpy as np
import pytest

from agent.transports.realtime_config import (
    AudioFormat,
    Context,
    Effective,
    Update,
    describe,
    translate,
)

PCM24 = AudioFormat("pcm16", 24000)
CTX = Context(input=PCM24, output=PCM24, voice="joe", default_max_tokens=48)
RATES = "8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000"


def test_an_empty_update_changes_nothing():
    assert translate({}, CTX) == Update()


def test_the_current_shape_field_by_field():
    cfg = {
        "type": "realtime", "instructions": "Be brief.", "output_modalities": ["text"], "max_output_tokens": 20,
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 16000},
                      "turn_detection": {"type": "semantic_vad", "silence_duration_ms": 700, "threshold": 0.6}},
            "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"},
        },
        "tools": [], "tracing": None, "model": "gpt-realtime",  # accepted, not honoured
    }
    assert translate(cfg, CTX) == Update(
        live={"max_new_tokens": 20, "push_to_talk": False, "end_ms": 700, "vad_threshold": 0.6}, instructions="Be brief.",
        input=AudioFormat("pcm16", 16000), output=AudioFormat("pcmu", 8000), text_only=True, beta=False,
    )


def test_the_beta_shape_field_by_field():
    cfg = {"modalities": ["text", "audio"], "input_audio_format": "g711_ulaw", "output_audio_format": "g711_alaw",
           "turn_detection": None, "voice": "alloy", "max_response_output_tokens": "inf", "temperature": 0.8}
    assert translate(cfg, CTX) == Update(
        live={"max_new_tokens": 48, "push_to_talk": True}, input=AudioFormat("pcmu", 8000), output=AudioFormat("pcma", 8000),
        text_only=False, beta=True,
    )


def test_the_projects_flat_keys():
    cfg = {"input_sample_rate": 16000, "output_sample_rate": 48000, "denoise_steps": True, "event_names": "beta", "end_ms": 600}
    assert translate(cfg, CTX) == Update(
        live={"end_ms": 600}, input=AudioFormat("pcm16", 16000), output=AudioFormat("pcm16", 48000), denoise_steps=True, beta=True,
    )


def test_live_settings_beside_realtime_keys_are_applied_and_the_apis_other_keys_ignored():
    cfg = {"type": "realtime", "barge_in_ms": 300, "speculation": False, "a_future_api_key": 1}
    assert translate(cfg, CTX).live == {"barge_in_ms": 300, "speculation": False}


def test_turn_detection_without_a_type_or_numbers_is_the_endpointer_as_it_is():
    assert translate({"turn_detection": {}}, CTX).live == {"push_to_talk": False}
    assert translate({"audio": {"input": {"turn_detection": {"type": "server_vad"}}}}, CTX).live == {"push_to_talk": False}


@pytest.mark.parametrize("voice", ["joe", "cedar", {"id": "verse"}])
def test_the_installed_voice_and_the_apis_names_are_accepted(voice):
    assert translate({"voice": voice}, CTX) == Update(beta=True)
    assert translate({"audio": {"output": {"voice": voice}}}, CTX) == Update()


@pytest.mark.parametrize("cfg,beta", [
    ({"type": "realtime"}, False),
    ({"voice": "alloy"}, True),  # a beta key, no type
    ({"instructions": "x"}, None),  # both shapes have it: the event names stay as they were
    ({"end_ms": 600}, None),
    ({"type": "realtime", "event_names": "beta"}, True),
    ({"voice": "alloy", "event_names": "current"}, False),
])
def test_the_shape_of_an_update_chooses_the_event_names(cfg, beta):
    assert translate(cfg, CTX).beta is beta


def test_a_beta_pcm16_format_keeps_a_rate_chosen_before_and_resets_a_g711_one():
    at16k = Context(AudioFormat("pcm16", 16000), AudioFormat("pcmu", 8000), "joe", 48)
    u = translate({"input_audio_format": "pcm16", "output_audio_format": "pcm16"}, at16k)
    assert (u.input, u.output) == (AudioFormat("pcm16", 16000), AudioFormat("pcm16", 24000))
    u = translate({"input_audio_format": "pcm16", "input_sample_rate": 16000}, Context(AudioFormat("pcmu", 8000), PCM24, "joe", 48))
    assert u.input == AudioFormat("pcm16", 16000)
    u = translate({"audio": {"input": {"format": {"type": "audio/pcm"}}}}, at16k)  # the current shape's default rate
    assert u.input == PCM24


@pytest.mark.parametrize("cfg,message", [
    ({"type": "transcription"}, 'type must be "realtime" (this server has no transcription sessions)'),
    ({"instructions": 5}, "instructions must be a string"),
    ({"output_modalities": []}, 'output_modalities must be a list of "text" / "audio"'),
    ({"output_modalities": "audio"}, 'output_modalities must be a list of "text" / "audio"'),
    ({"modalities": ["text", "video"]}, 'modalities must be a list of "text" / "audio"'),
    ({"audio": 3}, "audio must be an object"),
    ({"audio": {"input": 3}}, "audio.input must be an object"),
    ({"audio": {"output": []}}, "audio.output must be an object"),
    ({"audio": {"input": {"format": {"type": "audio/wav"}}}},
     'audio.input.format must be an object with type "audio/pcm", "audio/pcmu" or "audio/pcma"'),
    ({"audio": {"output": {"format": "audio/pcm"}}},
     'audio.output.format must be an object with type "audio/pcm", "audio/pcmu" or "audio/pcma"'),
    ({"audio": {"input": {"format": {"type": 5}}}},
     'audio.input.format must be an object with type "audio/pcm", "audio/pcmu" or "audio/pcma"'),
    ({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 44000}}}}, f"audio.output.format.rate must be one of {RATES}"),
    ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": True}}}}, f"audio.input.format.rate must be one of {RATES}"),
    ({"audio": {"output": {"voice": "bob"}}}, 'audio.output.voice must be "joe" (the installed voice) or one of the Realtime API\'s names'),
    ({"voice": {"id": "bob"}}, 'voice must be "joe" (the installed voice) or one of the Realtime API\'s names'),
    ({"audio": {"input": {"turn_detection": {"type": "push"}}}},
     'audio.input.turn_detection must be null or an object with type "server_vad" or "semantic_vad"'),
    ({"turn_detection": "server_vad"}, 'turn_detection must be null or an object with type "server_vad" or "semantic_vad"'),
    ({"input_audio_format": "wav"}, 'input_audio_format must be "pcm16", "g711_ulaw" or "g711_alaw"'),
    ({"output_audio_format": None}, 'output_audio_format must be "pcm16", "g711_ulaw" or "g711_alaw"'),
    ({"input_sample_rate": 44000}, f"input_sample_rate must be one of {RATES}"),
    ({"output_sample_rate": "16000"}, f"output_sample_rate must be one of {RATES}"),
    ({"output_audio_format": "g711_alaw", "output_sample_rate": 16000}, "output_sample_rate must be left out: the output audio is G.711, 8000 Hz"),
    ({"denoise_steps": 1}, "denoise_steps must be true or false"),
    ({"event_names": "old"}, 'event_names must be "current" or "beta"'),
    ({"end_mz": 5}, "unknown setting(s): end_mz (known: "),
    ({"max_output_tokens": 0}, "max_new_tokens must be a whole number in [1, 1024], got 0"),
    ({"turn_detection": {"silence_duration_ms": 5}}, "end_ms must be a whole number in [40, 10000], got 5"),
    ({"audio": {"input": {"turn_detection": {"threshold": 1}}}}, "vad_threshold must be a number in [0.01, 0.99], got 1"),
])
def test_a_bad_value_is_refused_with_a_message_naming_it(cfg, message):
    with pytest.raises(ValueError) as refused:
        translate(cfg, CTX)
    assert str(refused.value).startswith(message) and (message.endswith("(known: ") or str(refused.value) == message)


def test_a_sample_rate_is_refused_on_a_g711_session():
    with pytest.raises(ValueError, match=r"^input_sample_rate must be left out: the input audio is G.711, 8000 Hz$"):
        translate({"input_sample_rate": 16000}, Context(AudioFormat("pcmu", 8000), PCM24, "joe", 48))


LIVE = {"push_to_talk": False, "vad_threshold": 0.5, "end_ms": 500, "max_new_tokens": 48, "barge_in_ms": 500}


def test_the_session_described_in_both_shapes_and_the_projects_keys():
    e = Effective(id="sess_1", model="llm-x", voice="joe", instructions="Be brief.", input=AudioFormat("pcm16", 16000),
                  output=AudioFormat("pcmu", 8000), text_only=False, beta=False, denoise_steps=False, agent_sample_rate=22050, live=LIVE)
    vad = {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500, "prefix_padding_ms": 320, "create_response": True,
           "interrupt_response": True, "idle_timeout_ms": None}
    transcription = {"model": "whisper", "language": "en"}
    assert describe(e) == {
        "id": "sess_1", "object": "realtime.session", "type": "realtime", "model": "llm-x", "instructions": "Be brief.",
        "output_modalities": ["audio"], "max_output_tokens": 48, "tools": [], "tool_choice": "none", "tracing": None,
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": vad, "transcription": transcription, "noise_reduction": None},
            "output": {"format": {"type": "audio/pcmu"}, "voice": "joe", "speed": 1.0},
        },
        "modalities": ["text", "audio"], "voice": "joe", "turn_detection": vad, "input_audio_format": "pcm16",
        "output_audio_format": "g711_ulaw", "input_audio_transcription": transcription, "max_response_output_tokens": 48,
        "event_names": "current", "input_sample_rate": 16000, "output_sample_rate": 8000, "agent_sample_rate": 22050,
        "denoise_steps": False, **LIVE,
    }


def test_a_text_only_push_to_talk_session_described():
    live = {**LIVE, "push_to_talk": True}
    e = Effective(id="s", model="m", voice="joe", instructions="", input=AudioFormat("pcma", 8000), output=PCM24,
                  text_only=True, beta=True, denoise_steps=True, agent_sample_rate=22050, live=live)
    d = describe(e)
    assert d["audio"]["input"]["turn_detection"] is None and d["turn_detection"] is None
    assert d["output_modalities"] == ["text"] and d["modalities"] == ["text"]
    assert d["audio"]["input"]["format"] == {"type": "audio/pcma"} and d["input_audio_format"] == "g711_alaw"
    assert d["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000} and d["output_audio_format"] == "pcm16"
    assert (d["event_names"], d["denoise_steps"], d["push_to_talk"]) == ("beta", True, True)


@pytest.mark.parametrize("cfg,where", [
    ({"input_audio_format": ["pcm16"]}, 'input_audio_format must be "pcm16", "g711_ulaw" or "g711_alaw"'),  # unhashable, still a clear refusal
    ({"input_sample_rate": 16000.0}, f"input_sample_rate must be one of {RATES}"),  # a rate is a whole number, not a float equal to one
])
def test_values_of_the_wrong_type_are_refused_too(cfg, where):
    with pytest.raises(ValueError) as refused:
        translate(cfg, CTX)
    assert str(refused.value) == where


def test_audio_formats_decode_and_encode_g711_and_pcm16():
    """Known G.711 code points (ITU-T G.711 tables): μ-law 0xFF is 0 and 0x00 is -32124; A-law 0xD5 is +8 and 0x55 is -8."""
    assert AudioFormat("pcmu", 8000).decode(bytes([0xFF, 0x00])).tolist() == [0, -32124]
    assert AudioFormat("pcma", 8000).decode(bytes([0xD5, 0x55])).tolist() == [8, -8]
    assert AudioFormat("pcm16", 16000).decode(b"\x01\x00\xff\xff").tolist() == [1, -1]
    with pytest.raises(ValueError, match=r"^pcm16 audio has an even number of bytes, got 5$"):
        AudioFormat().decode(b"\x00" * 5)
    silence = np.zeros(80, np.float32)
    assert AudioFormat("pcmu", 8000).encode(silence, 8000) == b"\xff" * 80
    assert AudioFormat("pcma", 8000).encode(silence, 8000) == b"\xd5" * 80
    assert AudioFormat("pcm16", 8000).encode(np.array([1.0, -1.0, 2.0], np.float32), 8000) == np.array([32767, -32767, 32767], "<i2").tobytes()
