// The supervisor console: sign-in, Ongoing Conversations, one monitor at a time.
// Plain ES modules, no build step. Stable ids and data-testid attributes for tests.

import * as api from "./api.js";
import { listen } from "./whep.js";
import { explainEnd, explainError, explainVoiceBlocked, explainNotMonitorable } from "./messages.js";

const $ = (id) => document.getElementById(id);
const EYE_SVG =
  '<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2" aria-hidden="true"><path d="M1 12s4-7 11-7 11 7 11 7-4 7-11 7S1 12 1 12z"/><circle cx="12" cy="12" r="3"/></svg>';

const state = {
  conversations: new Map(), // cid -> conversation (as GET /v1/conversations lists it)
  events: null, // { ws, closed, retry }
  monitor: null, // { mid, cid, channels, mode, voice, voiceKind, phoneUri, startedAt, quality, chat, lastSeq, ended }
  me: null, // GET /v1/me: { username, teams, phone_uri }
};

// A SIP URI as the gateway accepts one (gateway/api/models.py SIP_URI_PATTERN).
const SIP_URI = /^sips?:[A-Za-z0-9\-_.!~*'()%;:@&=+$,/?[\]]+$/;
const LISTEN_KEY = "gateway-console.listen."; // + username: "browser" | "phone" (this browser's choice)

// --------------------------------------------------------------------------- small helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "html") node.innerHTML = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function showError(errOrText) {
  const text = typeof errOrText === "string" ? errOrText : explainError(errOrText);
  $("error-text").textContent = text;
  $("error-banner").dataset.code = (errOrText && errOrText.code) || "";
  $("error-banner").hidden = !text;
}

function clearError() {
  const extra = document.getElementById("monitor-chat-only");
  if (extra) extra.remove();
  $("error-banner").hidden = true;
  $("error-text").textContent = "";
  $("error-banner").dataset.code = "";
}

/** "m:ss" or "h:mm:ss" for a number of seconds. */
function formatDuration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

/** Every element with data-since (epoch seconds) shows how long ago that was; once a second. */
function tickDurations() {
  const now = Date.now() / 1000;
  for (const node of document.querySelectorAll("[data-since]")) {
    const since = Number(node.dataset.since);
    if (!Number.isFinite(since) || since <= 0) continue;
    const text = formatDuration(now - since);
    const prefix = node.dataset.prefix || "";
    if (node.textContent !== prefix + text) node.textContent = prefix + text;
    node.dataset.seconds = String(Math.max(0, Math.floor(now - since)));
  }
}

function debounce(fn, ms) {
  let t = null;
  return (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
}

// --------------------------------------------------------------------------- sign-in
async function onLogin(ev) {
  ev.preventDefault();
  $("login-error").hidden = true;
  $("login-submit").disabled = true;
  try {
    await api.signIn($("username").value.trim(), $("password").value);
    $("password").value = "";
    await enterDashboard();
  } catch (e) {
    $("login-error").textContent = explainError(e);
    $("login-error").dataset.code = e.code || "";
    $("login-error").hidden = false;
  } finally {
    $("login-submit").disabled = false;
  }
}

async function onSso() {
  $("sso-error").hidden = true;
  $("sso-btn").disabled = true;
  try {
    await api.beginSso(); // navigates away to the identity provider
  } catch (e) {
    showSsoError(e);
    $("sso-btn").disabled = false;
  }
}

function showSsoError(e) {
  $("sso-error").textContent = explainError(e);
  $("sso-error").dataset.code = e.code || "";
  $("sso-error").hidden = false;
}

/** The password form is for the embedded dev realm only; single sign-on is always offered. */
function applyLoginMethods(config) {
  const passwordAllowed = config.embedded_idp !== false;
  $("login-form").hidden = !passwordAllowed;
  $("sso-divider").hidden = !passwordAllowed;
}

async function enterDashboard() {
  const s = api.currentSession();
  $("user-name").textContent = s.username;
  $("user-box").hidden = false;
  $("login-view").hidden = true;
  $("dashboard-view").hidden = false;
  clearError();
  await Promise.all([refreshConversations(), loadMe()]);
  connectEvents();
}

// --------------------------------------------------------------------------- where to listen
/** The gateway remembers the supervisor's phone per username: pre-fill it. */
async function loadMe() {
  const username = api.currentSession().username;
  let choice = null;
  try {
    choice = localStorage.getItem(LISTEN_KEY + username);
  } catch (_) {}
  try {
    state.me = await api.getMe();
  } catch (e) {
    state.me = null;
    if (e.status !== 401) showError(e);
  }
  $("phone-uri").value = (state.me && state.me.phone_uri) || "";
  setListenChoice(choice === "phone" || choice === "browser" ? choice : "browser");
  $("phone-status").textContent = state.me && state.me.phone_uri ? "Remembered for you by the gateway." : "";
  $("listen-on").dataset.loaded = "true";
}

function listenChoice() {
  return $("listen-phone").checked ? "phone" : "browser";
}

function setListenChoice(choice) {
  $("listen-phone").checked = choice === "phone";
  $("listen-browser").checked = choice !== "phone";
  onListenChoice();
}

function onListenChoice() {
  const phone = listenChoice() === "phone";
  $("phone-uri").disabled = !phone;
  $("phone-uri").required = phone;
  $("phone-uri-label").classList.toggle("off", !phone);
  const s = api.currentSession();
  try {
    if (s) localStorage.setItem(LISTEN_KEY + s.username, listenChoice());
  } catch (_) {}
}

function phoneUri() {
  return $("phone-uri").value.trim();
}

/** Save an edited phone address (PUT /v1/me/phone); starting a phone monitor saves it too. */
async function onPhoneEdited() {
  const uri = phoneUri();
  const input = $("phone-uri");
  if (!uri) return;
  if (!SIP_URI.test(uri)) {
    input.setAttribute("aria-invalid", "true");
    $("phone-status").textContent = explainError({ code: "invalid_sip_uri" });
    return;
  }
  input.removeAttribute("aria-invalid");
  if (state.me && state.me.phone_uri === uri) return;
  try {
    state.me = await api.putPhone(uri);
    $("phone-status").textContent = "Saved.";
  } catch (e) {
    if (e.code === "invalid_sip_uri") input.setAttribute("aria-invalid", "true");
    $("phone-status").textContent = explainError(e);
  }
}

/** The voice part of a monitor start: null (chat only), the browser, or the phone. */
function voiceRequest() {
  if (listenChoice() !== "phone") return { kind: "webrtc" };
  return { kind: "sip", uri: phoneUri() };
}

async function logout() {
  if (state.monitor && !state.monitor.ended) await leave();
  closeEvents();
  await api.signOut();
  state.conversations.clear();
  renderConversations();
  $("user-box").hidden = true;
  $("dashboard-view").hidden = true;
  $("login-view").hidden = false;
}

// --------------------------------------------------------------------------- dashboard
async function refreshConversations() {
  try {
    const list = await api.listConversations();
    state.conversations = new Map(list.map((c) => [c.id, c]));
    renderConversations();
  } catch (e) {
    if (e.status === 401) return logout();
    showError(e);
  }
}
const refreshSoon = debounce(refreshConversations, 150);

function sessionPills(c) {
  const s = c.sessions || {};
  return el(
    "td",
    { class: "sessions" },
    el("span", { class: `pill ${s.chat ? "on" : ""}`, "data-testid": `session-chat-${c.id}`, "data-active": String(!!s.chat), text: "chat" }),
    el("span", { class: `pill ${s.voice ? "on" : ""}`, "data-testid": `session-voice-${c.id}`, "data-active": String(!!s.voice), text: "voice" }),
  );
}

/** When the whole conversation started: its earliest active session (epoch seconds). */
function conversationSince(c) {
  const starts = Object.values(c.session_started || {}).filter((t) => typeof t === "number");
  return starts.length ? Math.min(...starts) : null;
}

/** Why this conversation can not be monitored, as the code the gateway would refuse with. */
function notMonitorableCode(c) {
  if (c.direction === "outbound") return "outbound_not_supported";
  if (c.transferred) return "transferred_not_supported";
  return null;
}

function renderConversations() {
  const body = $("conversations-body");
  // Re-rendering must not lose the keyboard focus of a row's button.
  const focused = document.activeElement && body.contains(document.activeElement) ? document.activeElement.dataset.testid : null;
  body.replaceChildren();
  const rows = [...state.conversations.values()].sort((a, b) => a.id.localeCompare(b.id));
  $("conversations-empty").hidden = rows.length > 0;
  const mine = state.monitor && !state.monitor.ended ? state.monitor.cid : null;
  for (const c of rows) {
    const monitors = c.monitors || [];
    const who = monitors.map((m) => m.supervisor + ((m.channels || []).includes("voice") ? " (listening)" : "")).join(", ");
    const refusal = notMonitorableCode(c);
    const canMonitor = !mine && !refusal && ((c.sessions && (c.sessions.chat || c.sessions.voice)) || false);
    const since = conversationSince(c);
    const row = el(
      "tr",
      { "data-testid": `conv-row-${c.id}`, "data-conversation": c.id, "data-monitored": String(!!c.monitored), class: c.id === mine ? "current" : "" },
      el("td", { class: "col-eye" }, c.monitored ? el("span", { class: "eye", role: "img", "aria-label": `Monitored by ${who}`, title: `Monitored by ${who}`, "data-testid": `monitored-${c.id}`, html: EYE_SVG }) : null),
      el("td", {}, el("strong", { text: c.id }), c.customer && c.customer.name ? el("div", { class: "muted", text: c.customer.name }) : null),
      el("td", { text: c.agent || "" }),
      el("td", { text: c.team || "" }),
      sessionPills(c),
      el("td", { class: "duration" }, since ? el("span", { "data-testid": `conv-duration-${c.id}`, "data-since": String(since), text: formatDuration(Date.now() / 1000 - since) }) : null),
      el(
        "td",
        {},
        c.monitored ? el("div", { class: "monitored-by", "data-testid": `monitored-by-${c.id}`, text: `monitored by ${who}` }) : null,
        refusal ? el("div", { class: "why-not", id: `why-not-${c.id}`, "data-testid": `why-not-${c.id}`, "data-code": refusal, text: explainNotMonitorable(refusal) }) : null,
      ),
      el(
        "td",
        {},
        el("button", {
          type: "button",
          class: "btn btn-primary btn-small",
          "data-testid": `monitor-${c.id}`,
          disabled: !canMonitor,
          "aria-label": `${c.id === mine ? "Monitoring" : "Monitor"} ${c.id}${c.customer && c.customer.name ? ` (${c.customer.name})` : ""}`,
          "aria-describedby": refusal ? `why-not-${c.id}` : null,
          title: refusal ? explainNotMonitorable(refusal) : c.sessions && c.sessions.voice ? "Listen and follow the chat" : "Follow the chat",
          text: c.id === mine ? "Monitoring" : "Monitor",
          onclick: () => startMonitoring(c.id),
        }),
      ),
    );
    body.append(row);
  }
  if (focused) {
    const again = body.querySelector(`[data-testid="${focused}"]`);
    if (again && !again.disabled) again.focus();
  }
}

function upsertConversation(item) {
  if (!item || !item.id) return refreshSoon();
  state.conversations.set(item.id, item);
  renderConversations();
}

// --------------------------------------------------------------------------- /v1/events
function connectEvents() {
  closeEvents();
  const ev = { ws: null, closed: false, retry: 500 };
  state.events = ev;
  const open = async () => {
    if (ev.closed || !api.currentSession()) return;
    let url;
    try {
      url = await api.wsUrl("/v1/events");
    } catch (_) {
      return;
    }
    const ws = new WebSocket(url);
    ev.ws = ws;
    ws.onopen = () => {
      ev.retry = 500;
      $("events-status").textContent = "live";
      $("events-status").setAttribute("aria-label", "Live updates: live");
      $("events-status").classList.add("live");
      refreshSoon(); // catch up on anything missed while disconnected
    };
    ws.onmessage = (m) => {
      try {
        onEvent(JSON.parse(m.data));
      } catch (e) {
        console.warn("bad event", e);
      }
    };
    ws.onclose = () => {
      $("events-status").textContent = "offline";
      $("events-status").setAttribute("aria-label", "Live updates: offline");
      $("events-status").classList.remove("live");
      if (ev.closed) return;
      setTimeout(open, ev.retry);
      ev.retry = Math.min(ev.retry * 2, 10000);
    };
  };
  open();
}

function closeEvents() {
  if (!state.events) return;
  state.events.closed = true;
  if (state.events.ws) state.events.ws.close();
  state.events = null;
}

const monitorId = (m) => (m && typeof m === "object" ? m.id : m);

function onEvent(msg) {
  switch (msg.type) {
    case "levels":
      if (state.monitor && monitorId(msg.monitor) === state.monitor.mid) setLevels(msg.agent, msg.customer);
      return;
    case "monitor_quality":
      if (state.monitor && monitorId(msg.monitor) === state.monitor.mid) renderQuality(msg.quality);
      return;
    case "conversation_updated":
      return upsertConversation(msg.item || msg.conversation_item || (typeof msg.conversation === "object" ? msg.conversation : null));
    case "conversation_ended": {
      const cid = typeof msg.conversation === "object" ? msg.conversation.id : msg.conversation;
      state.conversations.delete(cid);
      renderConversations();
      if (state.monitor && state.monitor.cid === cid && !state.monitor.ended) monitorEnded(msg.reason || "ended");
      return;
    }
    case "monitor_started":
    case "monitor_updated":
      if (state.monitor && typeof msg.monitor === "object" && msg.monitor.id === state.monitor.mid) applyMonitor(msg.monitor);
      return refreshSoon();
    case "monitor_ended":
      if (state.monitor && monitorId(msg.monitor) === state.monitor.mid && !state.monitor.ended) {
        monitorEnded(msg.reason || (msg.monitor && msg.monitor.end_reason) || "ended");
      }
      return refreshSoon();
    default:
      return undefined;
  }
}

// --------------------------------------------------------------------------- monitoring
async function startMonitoring(cid) {
  clearError();
  const conv = state.conversations.get(cid);
  if (!conv) return;
  const wantsVoice = !!(conv.sessions && conv.sessions.voice);
  const voice = wantsVoice ? voiceRequest() : null;
  if (voice && voice.kind === "sip" && !SIP_URI.test(voice.uri)) {
    showError({ code: "invalid_sip_uri" });
    $("phone-uri").setAttribute("aria-invalid", "true");
    $("phone-uri").focus();
    return;
  }
  let monitor;
  try {
    monitor = await api.startMonitor(cid, voice);
    if (voice && voice.kind === "sip") {
      // the gateway remembered it (per username): keep the page in step
      state.me = { ...(state.me || {}), phone_uri: voice.uri };
      $("phone-uri").removeAttribute("aria-invalid");
    }
  } catch (e) {
    showError(e);
    // R8: voice has one listener, chat may have several -- offer the chat on its own.
    if (e.code === "voice_monitor_busy" && conv.sessions && conv.sessions.chat) offerChatOnly(cid);
    return;
  }
  await beginMonitor(cid, monitor);
}

function offerChatOnly(cid) {
  const btn = el("button", {
    class: "btn btn-small",
    id: "monitor-chat-only",
    "data-testid": "monitor-chat-only",
    text: "Follow the chat only",
    onclick: async () => {
      btn.remove();
      clearError();
      try {
        await beginMonitor(cid, await api.startMonitor(cid, null));
      } catch (e) {
        showError(e);
      }
    },
  });
  $("error-text").after(btn);
}

async function beginMonitor(cid, monitor) {
  const v = monitor.voice || null;
  state.monitor = {
    mid: monitor.id,
    cid,
    channels: monitor.channels || ["chat"],
    mode: monitor.mode || "silent",
    voice: null,
    voiceKind: v ? v.kind : null,
    phoneUri: v && v.kind === "sip" ? v.uri : null,
    startedAt: monitor.started_at || Date.now() / 1000,
    quality: null,
    chat: null,
    lastSeq: 0,
    ended: false,
  };
  openPanel(monitor);
  renderConversations();
  refreshSoon();
  if (state.monitor.channels.includes("voice")) {
    if (state.monitor.voiceKind === "sip") showPhone();
    else startVoice();
  }
  openChat();
  // Keyboard and screen-reader users land on the panel they just opened.
  $("monitor-title").focus();
}

/** Voice on the supervisor's SIP phone: the gateway rings it; nothing plays in the page. */
function showPhone() {
  const cur = state.monitor;
  $("meters").hidden = true;
  $("voice-state").dataset.state = "phone";
  $("voice-state").textContent = `Ringing your phone ${cur.phoneUri}: answer it to listen.`;
}

function applyMonitor(m) {
  const cur = state.monitor;
  if (!cur) return;
  if (m.channels) cur.channels = m.channels;
  if (m.mode) cur.mode = m.mode;
  if ("quality" in m) renderQuality(m.quality);
  $("monitor-mode").textContent = cur.mode;
  $("monitor-mode").classList.toggle("barged", cur.mode === "barged");
  $("monitor-channels").textContent = cur.channels.join(" + ");
  $("monitor-channels").dataset.channels = cur.channels.join(",");
  const note = explainVoiceBlocked(m.voice_blocked_reason && m.voice_blocked_reason !== "voice_not_requested" ? m.voice_blocked_reason : null);
  $("voice-note").textContent = note;
  $("voice-note").dataset.code = m.voice_blocked_reason || "";
  $("voice-note").hidden = !note;
  const barged = cur.mode === "barged";
  $("barge-btn").hidden = barged;
  $("message-form").hidden = !barged || cur.ended;
  if (!cur.channels.includes("voice") && cur.voice) stopVoice();
  if (!cur.channels.includes("voice") && cur.voiceKind === "sip" && $("voice-state").dataset.state === "phone") {
    $("voice-state").dataset.state = "stopped";
    $("voice-state").textContent = "Your phone is no longer connected.";
  }
}

function openPanel(monitor) {
  $("monitor-panel").hidden = false;
  $("monitor-panel").dataset.monitor = monitor.id;
  $("monitor-conversation").textContent = state.monitor.cid;
  $("monitor-ended").hidden = true;
  $("chat-log").replaceChildren(chatSpacer());
  $("leave-btn").textContent = "Leave";
  $("leave-btn").disabled = false;
  $("barge-btn").disabled = false;
  $("whisper-input").disabled = false;
  $("message-input").disabled = false;
  $("voice-box").hidden = !state.monitor.channels.includes("voice");
  $("meters").hidden = false;
  $("voice-state").textContent = "connecting…";
  $("voice-state").dataset.state = "connecting";
  const elapsed = $("monitor-elapsed");
  elapsed.dataset.since = String(state.monitor.startedAt);
  elapsed.dataset.prefix = "listening for ";
  elapsed.textContent = "listening for " + formatDuration(Date.now() / 1000 - state.monitor.startedAt);
  renderQuality(null);
  setLevels(-96, -96);
  selectTab("chat");
  applyMonitor(monitor);
}

async function startVoice() {
  const cur = state.monitor;
  try {
    cur.voice = await listen(cur.mid, $("monitor-audio"), {
      onState: (s) => {
        $("voice-state").dataset.state = s;
        $("voice-state").textContent = { connected: "listening", connecting: "connecting…", new: "connecting…", failed: "audio connection failed", disconnected: "audio interrupted", closed: "stopped", autoplay_blocked: "click anywhere to hear the audio" }[s] || s;
      },
    });
    $("voice-box").dataset.location = cur.voice.location || "";
    if (cur.ended || state.monitor !== cur) await cur.voice.stop();
  } catch (e) {
    $("voice-state").textContent = "no audio";
    $("voice-state").dataset.state = "error";
    showError(e);
  }
}

async function stopVoice() {
  const cur = state.monitor;
  if (!cur || !cur.voice) return;
  const v = cur.voice;
  cur.voice = null;
  await v.stop();
  $("voice-state").textContent = "stopped";
  $("voice-state").dataset.state = "stopped";
  setLevels(-96, -96);
}

function setLevels(agent, customer) {
  for (const [leg, db] of [["agent", agent], ["customer", customer]]) {
    const v = typeof db === "number" ? db : -96;
    const pct = Math.max(0, Math.min(100, ((v + 60) / 60) * 100)); // -60 dBFS .. 0 dBFS
    const fill = $(`meter-${leg}`);
    fill.style.width = `${pct}%`;
    fill.dataset.dbfs = String(v);
    $(`meter-${leg}-bar`).setAttribute("aria-valuenow", String(Math.max(-60, Math.min(0, Math.round(v)))));
    $(`meter-${leg}-value`).textContent = v <= -96 ? "–" : `${v.toFixed(0)} dB`;
  }
}

// --------------------------------------------------------------------------- audio quality
// The badge grades the voice path the gateway measures (GET /v1/monitors/{mid} "quality",
// pushed as monitor_quality events): the worst figure decides. Thresholds (README):
//   poor: loss > 5 %, or jitter > 60 ms, or added latency > 400 ms
//   fair: loss > 1 %, or jitter > 30 ms, or added latency > 150 ms (ITU-T G.114's one-way budget)
//   good: anything better. A figure that is null (not measured yet) does not count.
const QUALITY_LIMITS = {
  fair: { loss_pct: 1, jitter_ms: 30, added_latency_ms: 150 },
  poor: { loss_pct: 5, jitter_ms: 60, added_latency_ms: 400 },
};
const LEG_NAMES = { agent: "Agent", customer: "Customer", mixed: "Both legs (mixed)" };

function isNum(x) {
  return typeof x === "number" && Number.isFinite(x);
}

/** "good" | "fair" | "poor" for a quality object (null when there is nothing to grade). */
function qualityLevel(q) {
  const legs = Object.values(q.legs || {});
  const figures = [["added_latency_ms", q.added_latency_ms]];
  for (const leg of legs) if (leg) figures.push(["loss_pct", leg.loss_pct], ["jitter_ms", leg.jitter_ms]);
  const measured = figures.filter(([, v]) => isNum(v));
  if (!measured.length) return null;
  for (const level of ["poor", "fair"]) {
    if (measured.some(([k, v]) => v > QUALITY_LIMITS[level][k])) return level;
  }
  return "good";
}

function renderQuality(q) {
  const badge = $("quality-badge");
  const tip = $("quality-tip");
  if (state.monitor) state.monitor.quality = q || null;
  const level = q ? qualityLevel(q) : null;
  if (!q || !level) {
    badge.hidden = true;
    badge.dataset.level = "";
    tip.replaceChildren();
    return;
  }
  const fmt = (v, unit, digits = 0) => (isNum(v) ? `${v.toFixed(digits)} ${unit}` : "not measured");
  const lines = [`Added latency: ${fmt(q.added_latency_ms, "ms")}`];
  for (const [name, leg] of Object.entries(q.legs || {})) {
    if (!leg) continue;
    const packets = isNum(leg.packets) ? `, ${leg.packets} packets` : "";
    lines.push(`${LEG_NAMES[name] || name}: loss ${fmt(leg.loss_pct, "%", 1)}, jitter ${fmt(leg.jitter_ms, "ms", 1)}${packets}`);
  }
  // updated_at: ISO 8601 (the gateway's) or epoch seconds
  const at = isNum(q.updated_at) ? q.updated_at * 1000 : typeof q.updated_at === "string" ? Date.parse(q.updated_at) : NaN;
  if (Number.isFinite(at)) lines.push(`Measured at ${new Date(at).toLocaleTimeString()}`);
  badge.hidden = false;
  badge.className = `pill quality ${level}`;
  badge.dataset.level = level;
  badge.textContent = `audio ${level}`;
  tip.replaceChildren(...lines.map((line) => el("span", { class: "tip-line", "data-testid": "quality-line", text: line })));
}

// --------------------------------------------------------------------------- chat mirror
function openChat() {
  const cur = state.monitor;
  const chat = { ws: null, closed: false, retry: 500 };
  cur.chat = chat;
  const open = async () => {
    if (chat.closed || cur.ended) return;
    const ws = new WebSocket(await api.wsUrl(`/v1/monitors/${encodeURIComponent(cur.mid)}/chat`, { after: cur.lastSeq }));
    chat.ws = ws;
    ws.onopen = () => (chat.retry = 500);
    ws.onmessage = (m) => {
      let msg;
      try {
        msg = JSON.parse(m.data);
      } catch (_) {
        return;
      }
      if (msg.type === "entry") {
        if (msg.seq <= cur.lastSeq) return; // replay overlap after a reconnect
        cur.lastSeq = msg.seq;
        appendEntry(msg);
      } else if (msg.type === "gap") {
        appendNote(`Messages ${msg.from}–${msg.to} are no longer available.`, "gap");
        if (typeof msg.to === "number") cur.lastSeq = Math.max(cur.lastSeq, msg.to);
      } else if (msg.type === "end") {
        chat.closed = true;
        if (!cur.ended && msg.reason) monitorEnded(msg.reason);
      }
    };
    ws.onclose = (ev) => {
      if (chat.closed || cur.ended) return;
      if (ev.code === 4401 || ev.code === 1008) return; // refused: do not hammer
      setTimeout(open, chat.retry);
      chat.retry = Math.min(chat.retry * 2, 10000);
    };
  };
  open().catch((e) => showError(e));
}

function closeChat() {
  const cur = state.monitor;
  if (!cur || !cur.chat) return;
  cur.chat.closed = true;
  if (cur.chat.ws) cur.chat.ws.close();
}

function appendEntry(e) {
  const kind = e.kind === "whisper" ? "whisper" : e.kind === "system" ? "system" : e.sender;
  const label = e.kind === "whisper" ? `Whisper · ${e.author || "supervisor"}` : e.kind === "system" ? "" : e.author ? `${e.sender} · ${e.author}` : e.sender;
  const node = el(
    "div",
    { class: `msg ${kind}`, "data-testid": "chat-entry", "data-seq": String(e.seq), "data-kind": e.kind, "data-sender": e.sender, "data-visibility": e.visibility || "" },
    label ? el("div", { class: "who", text: label }) : null,
    el("div", { class: "text", text: e.text }),
  );
  chatAppend(node);
}

function appendNote(text, cls = "system") {
  chatAppend(el("div", { class: `msg ${cls}`, "data-testid": `chat-${cls}`, text }));
}

// The chat view: the newest message stays in view, and the top edge of the view is always a
// bubble's top edge (never half a bubble). A spacer after the last bubble makes the furthest
// scroll position land on a bubble's top with the newest bubble whole below it; scroll snapping
// (style.css) keeps reading back through the history aligned the same way.
function chatSpacer() {
  return el("div", { class: "chat-spacer", "aria-hidden": "true" });
}

let chatLayoutQueued = false;
let chatUserScrollAt = -1e9; // when the user last wheeled, touched, dragged or keyed in the chat view

function chatAppend(node) {
  const log = $("chat-log");
  const spacer = log.querySelector(".chat-spacer") || log.appendChild(chatSpacer());
  const follow = chatAtBottom(log);
  log.insertBefore(node, spacer);
  if (follow) log.dataset.follow = "true";
  scheduleChatLayout();
}

function chatAtBottom(log) {
  return log.dataset.follow !== "false" || log.scrollHeight - log.scrollTop - log.clientHeight < 8;
}

function scheduleChatLayout() {
  if (chatLayoutQueued) return;
  chatLayoutQueued = true;
  requestAnimationFrame(() => {
    chatLayoutQueued = false;
    layoutChat();
  });
}

/** Size the spacer so the last scroll position shows whole bubbles only, the newest at the end. */
function layoutChat() {
  const log = $("chat-log");
  const spacer = log.querySelector(".chat-spacer");
  if (!spacer || !log.clientHeight) return;
  const bubbles = [...log.children].filter((n) => n !== spacer);
  spacer.style.height = "0px";
  if (!bubbles.length) return;
  const styles = getComputedStyle(log);
  const padTop = parseFloat(styles.paddingTop) || 0;
  const padBottom = parseFloat(styles.paddingBottom) || 0;
  const view = log.clientHeight;
  // positions in the scrolled content, unrounded (offsetTop rounds to whole pixels)
  const origin = log.getBoundingClientRect().top + log.clientTop - log.scrollTop;
  const top = (n) => n.getBoundingClientRect().top - origin;
  const height = (n) => n.getBoundingClientRect().height;
  const last = bubbles[bubbles.length - 1];
  const end = top(last) + height(last) + padBottom;
  // the earliest bubble whose top edge can be the view's top edge with the newest bubble whole
  let first = bubbles.length - 1;
  while (first > 0 && end - (top(bubbles[first - 1]) - padTop) <= view) first -= 1;
  const scrollTo = Math.max(0, top(bubbles[first]) - padTop);
  if (scrollTo === 0) return; // everything fits: nothing to scroll
  spacer.style.height = `${Math.max(0, scrollTo + view - end)}px`;
  if (log.dataset.follow !== "false") log.scrollTop = log.scrollHeight;
}

function onChatScroll() {
  const log = $("chat-log");
  // Only the user's own scrolling decides (ours, and the browser's re-snapping while entries
  // arrive, would otherwise look like reading back). Reading back: stop following; back at the
  // end: follow again.
  if (performance.now() - chatUserScrollAt > 1500) return;
  log.dataset.follow = String(log.scrollHeight - log.scrollTop - log.clientHeight < 8);
}

// --------------------------------------------------------------------------- actions
function selectTab(tab, { focusInput = true } = {}) {
  for (const b of document.querySelectorAll(".tab")) {
    const on = b.dataset.tab === tab;
    b.classList.toggle("active", on);
    b.setAttribute("aria-selected", String(on));
    b.tabIndex = on ? 0 : -1; // roving tabindex: Tab enters the tab list on the selected tab
  }
  $("chat-panel").setAttribute("aria-labelledby", `tab-${tab}`);
  $("whisper-form").hidden = tab !== "whisper" || (state.monitor && state.monitor.ended);
  if (tab === "whisper" && focusInput) $("whisper-input").focus();
}

/** Arrow keys, Home and End move between the tabs (the ARIA tabs pattern). */
function onTabKey(ev) {
  const tabs = [...document.querySelectorAll(".tab")];
  const i = tabs.indexOf(ev.currentTarget);
  let next = null;
  if (ev.key === "ArrowRight" || ev.key === "ArrowDown") next = tabs[(i + 1) % tabs.length];
  else if (ev.key === "ArrowLeft" || ev.key === "ArrowUp") next = tabs[(i - 1 + tabs.length) % tabs.length];
  else if (ev.key === "Home") next = tabs[0];
  else if (ev.key === "End") next = tabs[tabs.length - 1];
  if (!next) return;
  ev.preventDefault();
  selectTab(next.dataset.tab, { focusInput: false });
  next.focus();
}

/** Send the text of one of the monitor's input boxes with `send(mid, text)`; clear it once sent. */
async function sendInput(ev, inputId, send) {
  ev.preventDefault();
  const text = $(inputId).value.trim();
  if (!text || !state.monitor) return;
  try {
    await send(state.monitor.mid, text);
    $(inputId).value = "";
    clearError();
  } catch (e) {
    showError(e);
  }
}

function onWhisper(ev) {
  return sendInput(ev, "whisper-input", api.whisper);
}

async function onBarge() {
  if (!state.monitor) return;
  try {
    const m = await api.barge(state.monitor.mid);
    applyMonitor({ ...(m || {}), mode: (m && m.mode) || "barged" });
    clearError();
    $("message-input").focus();
  } catch (e) {
    showError(e);
  }
}

function onMessage(ev) {
  return sendInput(ev, "message-input", api.sendMessage);
}

async function leave() {
  const cur = state.monitor;
  if (!cur) return;
  const hadFocus = $("monitor-panel").contains(document.activeElement);
  if (cur.ended) {
    closePanel(hadFocus);
    return;
  }
  cur.ended = true;
  $("leave-btn").disabled = true;
  closeChat();
  await stopVoice();
  try {
    await api.endMonitor(cur.mid);
  } catch (e) {
    if (e.status !== 404) showError(e);
  }
  closePanel(hadFocus);
}

function closePanel(restoreFocus = false) {
  const cid = state.monitor ? state.monitor.cid : null;
  state.monitor = null;
  $("monitor-panel").hidden = true;
  $("monitor-panel").dataset.monitor = "";
  delete $("monitor-elapsed").dataset.since;
  renderConversations();
  refreshSoon();
  // Back to where the keyboard user came from: the row's Monitor button.
  const back = cid && document.querySelector(`[data-testid="monitor-${cid}"]`);
  if (restoreFocus && back) back.focus();
}

/** The gateway ended this monitor (agent left, transferred, ...): say so, stop audio. */
function monitorEnded(reason) {
  const cur = state.monitor;
  if (!cur || cur.ended) return;
  cur.ended = true;
  stopVoice();
  closeChat();
  const box = $("monitor-ended");
  box.textContent = explainEnd(reason);
  box.dataset.reason = reason;
  box.hidden = false;
  $("whisper-form").hidden = true;
  $("message-form").hidden = true;
  $("barge-btn").disabled = true;
  $("leave-btn").textContent = "Close";
  $("leave-btn").disabled = false;
  delete $("monitor-elapsed").dataset.since; // the clock stops where the monitoring ended
  renderQuality(null);
  renderConversations();
}

// --------------------------------------------------------------------------- start-up
async function main() {
  $("login-form").addEventListener("submit", onLogin);
  $("logout-btn").addEventListener("click", logout);
  $("sso-btn").addEventListener("click", onSso);
  $("refresh-btn").addEventListener("click", refreshConversations);
  $("error-close").addEventListener("click", clearError);
  $("leave-btn").addEventListener("click", leave);
  $("barge-btn").addEventListener("click", onBarge);
  $("whisper-form").addEventListener("submit", onWhisper);
  $("message-form").addEventListener("submit", onMessage);
  for (const b of document.querySelectorAll(".tab")) {
    b.addEventListener("click", () => selectTab(b.dataset.tab));
    b.addEventListener("keydown", onTabKey);
  }
  $("listen-browser").addEventListener("change", onListenChoice);
  $("listen-phone").addEventListener("change", onListenChoice);
  $("phone-uri").addEventListener("change", onPhoneEdited);
  $("chat-log").addEventListener("scroll", onChatScroll, { passive: true });
  for (const kind of ["wheel", "touchstart", "pointerdown", "keydown"]) {
    $("chat-log").addEventListener(kind, () => (chatUserScrollAt = performance.now()), { passive: true });
  }
  new ResizeObserver(() => scheduleChatLayout()).observe($("chat-log"));
  setInterval(tickDurations, 1000);
  // Autoplay policies: a click anywhere resumes a blocked <audio>.
  document.addEventListener("click", () => {
    const a = $("monitor-audio");
    if (a.srcObject && a.paused) a.play().catch(() => {});
  });
  window.addEventListener("pagehide", () => {
    // Closing or reloading the tab is leaving (R12): free the voice slot (R8) and end the
    // monitor; keepalive lets the requests outlive the page.
    const cur = state.monitor;
    if (!cur || cur.ended) return;
    cur.ended = true;
    if (cur.voice) cur.voice.stop({ keepalive: true });
    api.endMonitor(cur.mid, { keepalive: true }).catch(() => {});
  });
  applyLoginMethods(await api.loadConfig());
  // Back from the identity provider (?code=&state=): finish single sign-on first.
  let ssoSession = null;
  let ssoError = null;
  try {
    ssoSession = await api.completeSso();
  } catch (e) {
    ssoError = e;
  }
  document.body.dataset.ready = "true";
  if (ssoError) showSsoError(ssoError);
  else if (ssoSession) await enterDashboard();
  else if (api.restoreSession()) await enterDashboard();
}

main();

// Exposed for tests and debugging in the browser console: the state, and the /v1/events
// handler (tests feed it events the gateway may send, e.g. monitor_quality).
window.consoleState = state;
window.consoleEvents = onEvent;
