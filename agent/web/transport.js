// The two ways to reach the agent. Both hand the server's JSON events (README, "WebSocket protocol")
// to onEvent, play the agent's voice, and feed it to `tap` too (an AudioNode the page analyses to
// tell when the reply became audible), so everything above this file is the same for both.

const RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000];

async function refusal(resp) {
  try { return (await resp.json()).error || resp.statusText; } catch { return resp.statusText; }
}

function within(promise, ms, what) {
  return Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error(`${what} timed out`)), ms))]);
}

// WebRTC: mic and voice as Opus tracks (the browser's jitter buffer, the server paces and knows
// what was played), events on a data channel. Signaling: one POST of the complete offer.
export class WebRTCTransport {
  name = 'WebRTC';

  constructor({ onEvent, onClose, token, audioElement }) {
    Object.assign(this, { onEvent, onClose, token, audioElement });
  }

  async connect(mic, ctx, tap) {
    const pc = this.pc = new RTCPeerConnection({ iceServers: [] });
    const dc = this.dc = pc.createDataChannel('events');
    mic.getAudioTracks().forEach((t) => pc.addTrack(t, mic));
    pc.ontrack = (e) => {
      const stream = e.streams[0] || new MediaStream([e.track]);
      this.audioElement.srcObject = stream; // the element plays it (Chromium feeds Web Audio only then)
      this.audioElement.play().catch(() => {});
      ctx.createMediaStreamSource(stream).connect(tap);
    };
    await pc.setLocalDescription(await pc.createOffer());
    await within(new Promise((resolve) => {
      if (pc.iceGatheringState === 'complete') return resolve();
      pc.addEventListener('icegatheringstatechange', () => pc.iceGatheringState === 'complete' && resolve());
    }), 5000, 'gathering network candidates');
    const headers = { 'Content-Type': 'application/json' };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    const resp = await fetch('/v1/webrtc/offer', { method: 'POST', headers, body: JSON.stringify(pc.localDescription) });
    if (!resp.ok) throw new Error(`the server refused the call (${resp.status}): ${await refusal(resp)}`);
    await pc.setRemoteDescription(await resp.json());
    dc.onmessage = (e) => this.onEvent(JSON.parse(e.data));
    await within(new Promise((resolve, reject) => {
      dc.onopen = resolve;
      dc.onerror = () => reject(new Error('the data channel failed'));
    }), 10000, 'connecting (no network path to the server?)');
    dc.onclose = () => this.onClose('the server closed the call');
    pc.onconnectionstatechange = () => {
      if (['failed', 'disconnected'].includes(pc.connectionState)) this.onClose(`connection ${pc.connectionState}`);
    };
  }

  send(msg) { if (this.dc?.readyState === 'open') this.dc.send(JSON.stringify(msg)); }

  stopPlayback() {} // the server clears its own track on response.interrupted

  // What actually arrived on the voice track: bytes and the decoder's audio energy.
  async audioStats() {
    const stats = { bytes: 0, energy: 0, packets: 0 };
    if (!this.pc) return stats;
    (await this.pc.getStats()).forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'audio') {
        stats.bytes += r.bytesReceived || 0;
        stats.packets += r.packetsReceived || 0;
        stats.energy += r.totalAudioEnergy || 0;
      }
    });
    return stats;
  }

  close() {
    for (const h of ['onclose', 'onconnectionstatechange']) { if (this.dc) this.dc[h] = null; if (this.pc) this.pc[h] = null; }
    this.pc?.close();
  }
}

// WebSocket: pcm16 both ways. The mic is captured by an AudioWorklet and sent as binary frames;
// reply audio arrives base64 in response.output_audio.delta and is scheduled back to back.
export class WebSocketTransport {
  name = 'WebSocket';

  constructor({ onEvent, onClose, token }) {
    Object.assign(this, { onEvent, onClose, token });
    this.sources = []; // {turn, node, start, duration}
    this.scheduled = {}; // turn → seconds of reply audio scheduled
    this.items = {}; // turn → the agent's item id (what conversation.item.truncate names)
    this.playHead = 0;
    this.bytes = 0;
  }

  async connect(mic, ctx, tap) {
    this.ctx = ctx;
    this.out = ctx.createGain();
    this.out.connect(ctx.destination);
    this.out.connect(tap);
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const ws = this.ws = new WebSocket(`${scheme}://${location.host}/v1/realtime`);
    await within(new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onclose = (e) => reject(new Error(`the server refused the WebSocket (${e.code} ${e.reason || ''})`));
    }), 10000, 'opening the WebSocket');
    ws.onclose = (e) => this.onClose(`the WebSocket closed (${e.code}${e.reason ? ': ' + e.reason : ''})`);
    ws.onmessage = (e) => this.receive(JSON.parse(e.data));
    if (this.token) this.send({ type: 'session.auth', token: this.token });
    const inputRate = RATES.includes(ctx.sampleRate) ? ctx.sampleRate : 48000;
    this.send({ type: 'session.update', session: { input_sample_rate: inputRate } });

    await ctx.audioWorklet.addModule('mic-worklet.js');
    // No outputs: an automatic pull node, processed without a path to the speakers.
    this.worklet = new AudioWorkletNode(ctx, 'pcm16-mic', { numberOfOutputs: 0, processorOptions: { chunk: Math.round(inputRate / 50) } });
    this.worklet.port.onmessage = (e) => { if (ws.readyState === WebSocket.OPEN) ws.send(e.data); };
    this.micSource = ctx.createMediaStreamSource(mic);
    this.micSource.connect(this.worklet);
  }

  receive(msg) {
    if (msg.type === 'session.created') {
      // The agent's own voice rate: no resampling on the server; Web Audio resamples on playback.
      this.send({ type: 'session.update', session: { output_sample_rate: msg.session.agent_sample_rate } });
    } else if (msg.type === 'response.output_audio.delta') {
      this.play(msg);
    }
    this.onEvent(msg);
  }

  play(msg) {
    const bytes = Uint8Array.from(atob(msg.delta), (c) => c.charCodeAt(0));
    this.bytes += bytes.length;
    const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
    if (!pcm.length) return;
    const buffer = this.ctx.createBuffer(1, pcm.length, msg.sample_rate);
    const ch = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
    const node = this.ctx.createBufferSource();
    node.buffer = buffer;
    node.connect(this.out);
    const start = Math.max(this.playHead, this.ctx.currentTime + 0.02);
    node.start(start);
    this.playHead = start + buffer.duration;
    this.sources.push({ turn: msg.turn, node, start, duration: buffer.duration });
    this.items[msg.turn] = msg.item_id;
    this.scheduled[msg.turn] = (this.scheduled[msg.turn] || 0) + buffer.duration;
    node.onended = () => { this.sources = this.sources.filter((s) => s.node !== node); };
  }

  // Barge-in or the interrupt button: silence now, and tell the server how much of the turn was heard.
  stopPlayback(turn) {
    const now = this.ctx?.currentTime ?? 0;
    const mine = this.sources.filter((s) => s.turn === turn);
    if (!mine.length) return;
    const unplayed = mine.reduce((sum, s) => sum + Math.max(0, Math.min(s.duration, s.start + s.duration - now)), 0);
    mine.forEach((s) => { s.node.onended = null; s.node.stop(); });
    this.sources = this.sources.filter((s) => s.turn !== turn);
    this.playHead = now;
    const played = Math.round(Math.max(0, this.scheduled[turn] - unplayed) * 1000);
    this.send({ type: 'conversation.item.truncate', item_id: this.items[turn], content_index: 0, audio_end_ms: played });
  }

  send(msg) { if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(msg)); }

  async audioStats() { return { bytes: this.bytes, energy: null, packets: null }; }

  close() {
    this.micSource?.disconnect();
    this.worklet?.disconnect();
    this.sources.forEach((s) => s.node.stop());
    if (this.ws) { this.ws.onclose = null; this.ws.close(1000); }
  }
}
