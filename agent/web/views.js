// What the page shows: the conversation (with the diffusion decoding of each reply) and the latency
// waterfall. Pure DOM rendering from protocol events; no networking here.

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// One <li> per turn: what the user said, then the reply. The reply is committed text (solid) followed
// by the block being denoised: every position not yet streamed, masked or already decided.
export class Conversation {
  constructor(list) {
    this.list = list;
    this.turns = new Map();
  }

  entry(turn) {
    let t = this.turns.get(turn);
    if (!t) {
      const li = el('li');
      li.dataset.turn = turn;
      const user = el('div', 'user');
      if (turn > 0) li.append(user);
      const agent = el('div', 'agent');
      const committed = el('span', 'committed');
      const slots = el('span', 'slots');
      const caption = el('small', 'decoding');
      agent.append(committed, slots, caption);
      agent.hidden = true;
      li.append(agent);
      this.list.append(li);
      t = { li, user, agent, committed, slots, caption, block: null, blocks: 0, steps: 0 };
      this.turns.set(turn, t);
    }
    return t;
  }

  userState(turn, text, pending) {
    const t = this.entry(turn);
    t.user.textContent = text;
    t.user.classList.toggle('listening', pending);
    this.scroll();
  }

  denoise(turn, step) {
    const t = this.entry(turn);
    t.agent.hidden = false;
    if (!t.block || t.block.index !== step.block) {
      t.block = { index: step.block, tokens: new Array(step.block_size).fill(null) };
      t.blocks += 1;
    }
    t.steps += 1;
    step.positions.forEach((p, i) => { t.block.tokens[p] = step.tokens[i]; });
    this.renderSlots(t);
  }

  renderSlots(t) {
    const tokens = t.block ? t.block.tokens : [];
    const streamed = tokens.indexOf(null); // the contiguous prefix is streamed as text.delta
    t.slots.replaceChildren(...(streamed < 0 ? [] : tokens.slice(streamed)).map((tok) =>
      tok === null ? el('span', 'slot masked') : el('span', 'slot decided', tok.trim() || '·')));
  }

  text(turn, delta) {
    const t = this.entry(turn);
    t.agent.hidden = false;
    t.committed.textContent += delta;
    this.scroll();
  }

  done(turn, text, interrupted) {
    const t = this.entry(turn);
    t.block = null;
    t.slots.replaceChildren();
    if (t.steps) t.caption.textContent = `decoded in ${t.blocks} block${t.blocks > 1 ? 's' : ''}, ${t.steps} denoising step${t.steps > 1 ? 's' : ''}`;
    if (!t.committed.textContent && text) t.committed.textContent = text;
    t.agent.hidden = !t.committed.textContent;
    t.agent.classList.toggle('interrupted', interrupted);
  }

  remove(turn) { // the user went on with this turn: its words and the reply it cut short leave the page
    this.turns.get(turn)?.li.remove();
    this.turns.delete(turn);
  }

  scroll() { this.list.scrollTop = this.list.scrollHeight; }
}

// Stages of the per-turn timeline (agent/metrics.py), in ms after the user's speech ended, plus
// the one only the browser knows: when the reply became audible here.
export const STAGES = [
  ['endpoint', 'endpoint', 's-endpoint'],
  ['asr_final', 'ASR final', 's-asr'],
  ['llm_first_text', 'first block', 's-llm'],
  ['first_sentence', 'first sentence', 's-sentence'],
  ['tts_first_audio', 'TTS first audio', 's-tts'],
  ['first_audio_sent', 'audio sent', 's-sent'],
  ['heard', 'heard here', 's-heard'],
];

function marks(turn) {
  return { ...turn.timeline.stages_ms, heard: turn.heardMs ?? null };
}

// Each stage is a bar from the previous stage reached to its own mark, on one time axis.
function segments(turn) {
  const m = marks(turn);
  let prev = 0;
  return STAGES.filter(([key]) => m[key] !== null && m[key] !== undefined).map(([key, label, cls]) => {
    const seg = { key, label, cls, from: Math.min(prev, m[key]), to: Math.max(prev, m[key]), at: m[key] };
    prev = Math.max(prev, m[key]);
    return seg;
  });
}

export function voiceToVoice(turn) {
  return turn.heardMs ?? turn.timeline.server_voice_to_voice_ms;
}

export function renderLatency(root, turns) {
  const turn = turns[turns.length - 1];
  if (!turn) return;
  const v2v = voiceToVoice(turn);
  root.querySelector('#v2v').textContent = v2v === null || v2v === undefined ? '–' : Math.round(v2v);
  root.querySelector('#latency-turn').textContent = `turn ${turn.timeline.turn}${turn.timeline.speculative ? ' · speculative start kept' : ''}${turn.timeline.interrupted ? ' · interrupted' : ''}`;
  const server = turn.timeline.server_voice_to_voice_ms;
  root.querySelector('#v2v-detail').textContent = [
    turn.heardMs !== null && turn.heardMs !== undefined ? 'from the end of your speech to the first audible reply here' : 'server: speech end → first audio sent',
    server !== null ? `server ${Math.round(server)} ms` : null,
  ].filter(Boolean).join(' · ');

  const segs = segments(turn);
  const span = Math.max(1, ...segs.map((s) => s.to)) * 1.1;
  const pct = (v) => `${(100 * v / span).toFixed(2)}%`;
  root.querySelector('#waterfall').replaceChildren(...segs.flatMap((s) => {
    const lane = el('div', 'lane');
    lane.dataset.stage = s.key;
    const bar = el('div', `bar ${s.cls}`);
    bar.style.left = pct(s.from);
    bar.style.width = pct(s.to - s.from);
    const ms = el('span', 'ms', `${Math.round(s.at)}`);
    ms.style.left = pct(s.to);
    lane.append(bar, ms);
    return [el('span', 'label', s.label), lane];
  }));

  root.querySelector('#history').replaceChildren(...turns.slice(-8).reverse().map((t) => {
    const li = el('li');
    const mini = el('div', 'mini');
    const ss = segments(t);
    const total = Math.max(1, ...ss.map((s) => s.to));
    ss.forEach((s) => {
      const part = el('span', s.cls);
      part.style.width = `${(100 * (s.to - s.from) / total).toFixed(2)}%`;
      part.title = `${s.label}: ${Math.round(s.at)} ms`;
      mini.append(part);
    });
    const v = voiceToVoice(t);
    li.append(el('span', '', `#${t.timeline.turn}`), el('span', '', v === null || v === undefined ? '–' : `${Math.round(v)} ms`), mini);
    return li;
  }));
}
