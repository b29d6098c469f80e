// The page: one call at a time. Microphone → transport (WebRTC, else WebSocket) → protocol events →
// views. `window.voice` exposes what happened (transcripts, replies, timelines) for tests and curious users.
import { WebRTCTransport, WebSocketTransport } from './transport.js';
import { Conversation, renderLatency } from './views.js';

const $ = (sel) => document.querySelector(sel);
const AUDIBLE_RMS = 0.01; // −40 dBFS: the reply counts as heard from here (shared/DESIGN.md)
const SETTINGS = ['threshold', 'block_size', 'end_ms', 'echo_guard_ms'];

const conversation = new Conversation($('#turns'));
let call = null; // {transport, mic, ctx, analyser, meter}
const heard = new Map(); // turn → {stoppedAt, heardAt} in performance.now() ms

const state = window.voice = {
  transport: null,
  session: null,
  transcripts: [],
  replies: {},
  denoiseSteps: 0,
  turns: [], // {timeline, heardMs}
  errors: [],
  audioStats: async () => (call ? call.transport.audioStats() : null),
};

function setStatus(text, kind = 'info') {
  const s = $('#status');
  s.textContent = text;
  s.dataset.state = kind;
}

function setLive(live) {
  $('#talk').textContent = live ? 'Hang up' : 'Start talking';
  $('#talk').classList.toggle('live', live);
  $('#interrupt').disabled = !live;
  $('#transport').disabled = live;
}

async function openMic() {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error('The microphone needs a secure page: open this over https, or http://localhost.');
  }
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
  } catch (e) {
    if (e.name === 'NotAllowedError' || e.name === 'SecurityError') {
      throw new Error('Microphone access was denied. Allow it for this site (the icon in the address bar) and press the button again.');
    }
    if (e.name === 'NotFoundError') throw new Error('No microphone was found.');
    throw new Error(`The microphone could not start: ${e.message}`);
  }
}

function transportsToTry() {
  const choice = $('#transport').value;
  if (choice === 'websocket' || !window.RTCPeerConnection) return [WebSocketTransport];
  return choice === 'webrtc' ? [WebRTCTransport] : [WebRTCTransport, WebSocketTransport];
}

async function start() {
  setLive(true);
  setStatus('Asking for the microphone…');
  let mic;
  try {
    mic = await openMic();
  } catch (e) {
    setLive(false);
    return setStatus(e.message, 'error');
  }
  const ctx = new AudioContext();
  await ctx.resume();
  const analyser = ctx.createAnalyser(); // the agent's voice as heard, whichever transport brings it
  analyser.fftSize = 1024;
  call = { mic, ctx, analyser, transport: null };

  const token = $('#settings').elements.token.value || null;
  const failures = [];
  for (const Kind of transportsToTry()) {
    const t = new Kind({ onEvent, onClose: (why) => dropped(t, why), token, audioElement: $('#remote') });
    setStatus(`Connecting over ${t.name}…`);
    try {
      await t.connect(mic, ctx, analyser);
      call.transport = t;
      break;
    } catch (e) {
      t.close();
      failures.push(`${t.name}: ${e.message}`);
      console.warn(`${t.name} failed`, e);
    }
  }
  if (!call?.transport) {
    stop();
    return setStatus(`Could not connect. ${failures.join(' · ')}`, 'error');
  }
  state.transport = call.transport.name;
  $('#link').textContent = `over ${call.transport.name}`;
  const instructions = $('#settings').elements.instructions.value.trim();
  call.transport.send({ type: 'session.update', session: { denoise_steps: true, ...(instructions && { instructions }) } });
  call.meter = setInterval(listen, 10);
  setStatus('Listening: speak whenever you like.', 'live');
}

function stop() {
  if (!call) return;
  clearInterval(call.meter);
  call.transport?.close();
  call.mic.getTracks().forEach((t) => t.stop());
  call.ctx.close();
  call = null;
  $('#link').textContent = '';
  setLive(false);
}

function dropped(transport, why) {
  if (call?.transport !== transport) return;
  stop();
  setStatus(`Connection lost (${why}). Press the button to call again.`, 'error');
}

// The first audible reply sample after the user's speech ended: the caller's voice-to-voice.
function listen() {
  const waiting = [...heard.entries()].find(([, h]) => h.heardAt === undefined);
  if (!waiting || !call) return;
  const buf = new Float32Array(call.analyser.fftSize);
  call.analyser.getFloatTimeDomainData(buf);
  const rms = Math.sqrt(buf.reduce((s, x) => s + x * x, 0) / buf.length);
  if (rms < AUDIBLE_RMS) return;
  const [turn, h] = waiting;
  h.heardAt = performance.now();
  const t = state.turns.find((x) => x.timeline.turn === turn);
  if (t) {
    t.heardMs = heardMs(t.timeline, h);
    renderLatency(document, state.turns);
  }
}

// speech_stopped leaves the server at its endpoint decision, `endpoint` ms after the speech ended.
function heardMs(timeline, h) {
  const endpoint = timeline.stages_ms.endpoint;
  if (h?.heardAt === undefined || endpoint === null) return null;
  return endpoint + (h.heardAt - h.stoppedAt);
}

function onEvent(msg) {
  const turn = msg.turn;
  switch (msg.type) {
    case 'session.created':
    case 'session.updated':
      state.session = msg.session;
      showSettings(msg.session);
      break;
    case 'input_audio_buffer.speech_started':
      conversation.userState(turn, 'listening…', true);
      break;
    case 'input_audio_buffer.speech_stopped':
      heard.set(turn, { stoppedAt: performance.now() });
      conversation.userState(turn, 'transcribing…', true);
      break;
    case 'conversation.item.input_audio_transcription.completed':
      state.transcripts.push(msg.transcript);
      conversation.userState(turn, msg.transcript || '(nothing understood)', false);
      break;
    case 'response.denoise.step':
      state.denoiseSteps += 1;
      conversation.denoise(turn, msg);
      break;
    case 'response.output_audio_transcript.delta':
      state.replies[turn] = (state.replies[turn] || '') + msg.delta;
      conversation.text(turn, msg.delta);
      break;
    case 'response.interrupted':
      call?.transport.stopPlayback(turn);
      break;
    case 'turn.continued':
      conversation.remove(msg.previous);
      break;
    case 'response.done':
      conversation.done(turn, msg.response.output[0]?.content[0]?.transcript ?? '', msg.response.status === 'cancelled');
      break;
    case 'turn.metrics': {
      const t = { timeline: msg.timeline, heardMs: null };
      t.heardMs = heardMs(msg.timeline, heard.get(turn));
      state.turns.push(t);
      renderLatency(document, state.turns);
      break;
    }
    case 'error':
      state.errors.push(msg.error);
      setStatus(`The server said: ${msg.error.message}`, 'error');
      break;
    case 'session.hangup':
      setStatus(`The agent hung up (${msg.reason}).`);
      break;
    default:
      break;
  }
}

// ---- settings: shown as the session has them, sent as session.update on change --------------

function showSettings(session) {
  const form = $('#settings');
  for (const key of SETTINGS) {
    const input = form.elements[key];
    if (session[key] === undefined || document.activeElement === input) continue;
    input.value = session[key];
    const shown = form.querySelector(`output[for="${key}"]`);
    if (shown) shown.textContent = session[key];
  }
  if (document.activeElement !== form.elements.instructions) form.elements.instructions.value = session.instructions ?? '';
}

$('#settings').addEventListener('input', (e) => {
  const shown = $('#settings').querySelector(`output[for="${e.target.name}"]`);
  if (shown) shown.textContent = e.target.value;
});

$('#settings').addEventListener('change', (e) => {
  const { name, value } = e.target;
  if (name === 'token') return localStorage.setItem('voice-agent-token', value);
  if (SETTINGS.includes(name)) call?.transport.send({ type: 'session.update', session: { [name]: Number(value) } });
  if (name === 'instructions') call?.transport.send({ type: 'session.update', session: { instructions: value } });
});

$('#talk').addEventListener('click', () => (call ? (stop(), setStatus('Call ended.')) : start()));
$('#interrupt').addEventListener('click', () => {
  call?.transport.send({ type: 'response.cancel' });
});

// A token field only where the server asks for one.
fetch('/health').then((r) => r.json()).then((h) => {
  $('#token-row').hidden = !h.auth_required;
  $('#settings').elements.token.value = localStorage.getItem('voice-agent-token') || '';
}).catch(() => setStatus('The server is not answering /health.', 'error'));
