// The supervisor console: sign-in, Ongoing Conversations, one monitor at a time.
// Plain ES modules, no build step. Stable ids and data-testid attributes for tests.

import * as api from "./api.js";
import { listen } from "./whep.js";
import { explainEnd, explainError, explainVoiceBlocked } from "./messages.js";

const $ = (id) => document.getElementById(id);
const EYE_SVG =
  '<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2" aria-hidden="true"><path d="M1 12s4-7 11-7 11 7 11 7-4 7-11 7S1 12 1 12z"/><circle cx="12" cy="12" r="3"/></svg>';

const state = {
  conversations: new Map(), // cid -> conversation (as GET /v1/conversations lists it)
  events: null, // { ws, closed, retry }
  monitor: null, // { mid, cid, channels, mode, voice, chat, lastSeq, ended }
};

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
  await refreshConversations();
  connectEvents();
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

function renderConversations() {
  const body = $("conversations-body");
  body.replaceChildren();
  const rows = [...state.conversations.values()].sort((a, b) => a.id.localeCompare(b.id));
  $("conversations-empty").hidden = rows.length > 0;
  const mine = state.monitor && !state.monitor.ended ? state.monitor.cid : null;
  for (const c of rows) {
    const monitors = c.monitors || [];
    const who = monitors.map((m) => m.supervisor + ((m.channels || []).includes("voice") ? " (listening)" : "")).join(", ");
    const canMonitor = !mine && ((c.sessions && (c.sessions.chat || c.sessions.voice)) || false);
    const row = el(
      "tr",
      { "data-testid": `conv-row-${c.id}`, "data-conversation": c.id, "data-monitored": String(!!c.monitored), class: c.id === mine ? "current" : "" },
      el("td", { class: "col-eye" }, c.monitored ? el("span", { class: "eye", title: `Monitored by ${who}`, "data-testid": `monitored-${c.id}`, html: EYE_SVG }) : null),
      el("td", {}, el("strong", { text: c.id }), c.customer && c.customer.name ? el("div", { class: "muted", text: c.customer.name }) : null),
      el("td", { text: c.agent || "" }),
      el("td", { text: c.team || "" }),
      sessionPills(c),
      el(
        "td",
        {},
        c.monitored ? el("div", { class: "monitored-by", "data-testid": `monitored-by-${c.id}`, text: `monitored by ${who}` }) : el("span", { class: "muted", text: c.direction === "outbound" ? "outbound" : c.transferred ? "transferred" : "" }),
      ),
      el(
        "td",
        {},
        el("button", {
          class: "btn btn-primary btn-small",
          "data-testid": `monitor-${c.id}`,
          disabled: !canMonitor,
          title: c.sessions && c.sessions.voice ? "Listen and follow the chat" : "Follow the chat",
          text: c.id === mine ? "Monitoring" : "Monitor",
          onclick: () => startMonitoring(c.id),
        }),
      ),
    );
    body.append(row);
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
  let monitor;
  try {
    monitor = await api.startMonitor(cid, wantsVoice);
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
        await beginMonitor(cid, await api.startMonitor(cid, false));
      } catch (e) {
        showError(e);
      }
    },
  });
  $("error-text").after(btn);
}

async function beginMonitor(cid, monitor) {
  state.monitor = { mid: monitor.id, cid, channels: monitor.channels || ["chat"], mode: monitor.mode || "silent", voice: null, chat: null, lastSeq: 0, ended: false };
  openPanel(monitor);
  renderConversations();
  refreshSoon();
  if (state.monitor.channels.includes("voice")) startVoice();
  openChat();
}

function applyMonitor(m) {
  const cur = state.monitor;
  if (!cur) return;
  if (m.channels) cur.channels = m.channels;
  if (m.mode) cur.mode = m.mode;
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
}

function openPanel(monitor) {
  $("monitor-panel").hidden = false;
  $("monitor-panel").dataset.monitor = monitor.id;
  $("monitor-conversation").textContent = state.monitor.cid;
  $("monitor-ended").hidden = true;
  $("chat-log").replaceChildren();
  $("leave-btn").textContent = "Leave";
  $("leave-btn").disabled = false;
  $("barge-btn").disabled = false;
  $("whisper-input").disabled = false;
  $("message-input").disabled = false;
  $("voice-box").hidden = !state.monitor.channels.includes("voice");
  $("voice-state").textContent = "connecting…";
  $("voice-state").dataset.state = "connecting";
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
    $(`meter-${leg}-value`).textContent = v <= -96 ? "–" : `${v.toFixed(0)} dB`;
  }
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
  const log = $("chat-log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(node);
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function appendNote(text, cls = "system") {
  $("chat-log").append(el("div", { class: `msg ${cls}`, "data-testid": `chat-${cls}`, text }));
}

// --------------------------------------------------------------------------- actions
function selectTab(tab) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === tab);
  $("whisper-form").hidden = tab !== "whisper" || (state.monitor && state.monitor.ended);
  if (tab === "whisper") $("whisper-input").focus();
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
  if (cur.ended) {
    closePanel();
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
  closePanel();
}

function closePanel() {
  state.monitor = null;
  $("monitor-panel").hidden = true;
  $("monitor-panel").dataset.monitor = "";
  renderConversations();
  refreshSoon();
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
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => selectTab(b.dataset.tab));
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

// Exposed for tests and debugging in the browser console.
window.consoleState = state;
