// Talking to the gateway: configuration, sign-in, authorised fetch, websockets.
// No framework, no build step: an ES module the browser loads as is.

const DEFAULT_CONFIG = { idp_url: "", realm: "cx", client_id: "gateway-console", api_url: "" };

/** An error the API answered with ({"error":{"code","message"}}) or a network failure. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code);
    this.status = status;
    this.code = code;
  }
}

let config = { ...DEFAULT_CONFIG };
let session = null; // { access_token, refresh_token, expires_at, refresh_expires_at, username }
let refreshTimer = null;
const SESSION_KEY = "gateway-console.session";

/** Load /config.json (falls back to the embedded identity provider on this origin). */
export async function loadConfig() {
  try {
    const res = await fetch("/config.json", { cache: "no-store" });
    if (res.ok) config = { ...DEFAULT_CONFIG, ...(await res.json()) };
  } catch (_) {
    /* keep defaults */
  }
  return config;
}

export function getConfig() {
  return config;
}

function idpBase() {
  const base = (config.idp_url || window.location.origin).replace(/\/$/, "");
  return `${base}/realms/${encodeURIComponent(config.realm)}/protocol/openid-connect`;
}

function apiUrl(path) {
  const base = (config.api_url || "").replace(/\/$/, "");
  return `${base}${path}`;
}

function decodeJwt(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(decodeURIComponent(escape(atob(part))));
  } catch (_) {
    return {};
  }
}

function storeSession(tok) {
  const now = Date.now();
  const claims = decodeJwt(tok.access_token);
  session = {
    access_token: tok.access_token,
    refresh_token: tok.refresh_token || null,
    expires_at: now + (tok.expires_in || 300) * 1000,
    refresh_expires_at: tok.refresh_expires_in ? now + tok.refresh_expires_in * 1000 : null,
    username: claims.preferred_username || claims.sub || "",
    roles: (claims.realm_access && claims.realm_access.roles) || [],
  };
  try {
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
  } catch (_) {}
  scheduleRefresh();
  return session;
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  if (!session || !session.refresh_token) return;
  const delay = Math.max(5000, session.expires_at - Date.now() - 30000);
  refreshTimer = setTimeout(() => refresh().catch(() => {}), delay);
}

async function tokenRequest(params) {
  let res;
  try {
    res = await fetch(`${idpBase()}/token`, {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ client_id: config.client_id, ...params }),
    });
  } catch (e) {
    throw new ApiError(0, "network_error", "The identity provider can not be reached.");
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const code = body.error && typeof body.error === "string" ? body.error : "invalid_grant";
    throw new ApiError(res.status, code, body.error_description || "Sign-in failed.");
  }
  return body;
}

/** Password grant against the realm's token endpoint (Keycloak's path). */
export async function signIn(username, password) {
  const tok = await tokenRequest({ grant_type: "password", username, password, scope: "openid" });
  return storeSession(tok);
}

// --- authorization code + PKCE (S256): single sign-on against the realm ------------------
const PKCE_KEY = "gateway-console.pkce";
const AUTH_RESPONSE_PARAMS = ["code", "state", "session_state", "iss", "error", "error_description", "error_uri"];

function base64url(bytes) {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomToken(bytes) {
  return base64url(crypto.getRandomValues(new Uint8Array(bytes)));
}

/** The console's own URL without the query string: where the provider sends the browser back. */
export function redirectUri() {
  return window.location.origin + window.location.pathname;
}

/**
 * Start single sign-on: keep a fresh code verifier and state in sessionStorage and send the
 * browser to the realm's authorization endpoint with the S256 code challenge.
 */
export async function beginSso() {
  if (!window.crypto || !crypto.subtle) {
    throw new ApiError(0, "sso_insecure_context", "Single sign-on needs a secure context (https or localhost).");
  }
  const verifier = randomToken(48); // 64 characters of [A-Za-z0-9-_] (RFC 7636: 43..128)
  const state = randomToken(24);
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  const challenge = base64url(new Uint8Array(digest));
  const redirect = redirectUri();
  sessionStorage.setItem(PKCE_KEY, JSON.stringify({ verifier, state, redirect_uri: redirect }));
  const url = new URL(`${idpBase()}/auth`);
  url.search = new URLSearchParams({
    response_type: "code",
    client_id: config.client_id,
    redirect_uri: redirect,
    scope: "openid",
    state,
    code_challenge: challenge,
    code_challenge_method: "S256",
  }).toString();
  window.location.assign(url.toString());
}

/**
 * Finish single sign-on if this page load is the provider's answer (?code=&state= or ?error=):
 * clean the URL, check the state, exchange the code with the verifier. Returns the session,
 * null when the URL carries no authorization response; throws an ApiError otherwise.
 */
export async function completeSso() {
  const here = new URL(window.location.href);
  const params = here.searchParams;
  if (!params.has("code") && !params.has("error")) return null;
  const answer = Object.fromEntries(AUTH_RESPONSE_PARAMS.filter((k) => params.has(k)).map((k) => [k, params.get(k)]));
  for (const k of AUTH_RESPONSE_PARAMS) params.delete(k);
  history.replaceState(history.state, "", here.pathname + (params.toString() ? `?${params}` : "") + here.hash);
  let saved = null;
  try {
    saved = JSON.parse(sessionStorage.getItem(PKCE_KEY) || "null");
  } catch (_) {}
  try {
    sessionStorage.removeItem(PKCE_KEY); // one use only
  } catch (_) {}
  if (!saved || !saved.state || !answer.state || answer.state !== saved.state) {
    throw new ApiError(400, "sso_state_mismatch", "The sign-in answer did not match this sign-in attempt.");
  }
  if (answer.error) {
    throw new ApiError(400, "sso_failed", answer.error_description || answer.error);
  }
  let tok;
  try {
    tok = await tokenRequest({
      grant_type: "authorization_code",
      code: answer.code,
      code_verifier: saved.verifier,
      redirect_uri: saved.redirect_uri,
    });
  } catch (e) {
    if (e.code === "network_error") throw e;
    throw new ApiError(e.status, "sso_failed", e.message);
  }
  return storeSession(tok);
}

async function refresh() {
  if (!session || !session.refresh_token) throw new ApiError(401, "invalid_token", "Signed out.");
  const tok = await tokenRequest({ grant_type: "refresh_token", refresh_token: session.refresh_token });
  return storeSession(tok);
}

/** Restore a session kept in sessionStorage (same tab reload); null if none or expired. */
export function restoreSession() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
    if (saved && saved.expires_at > Date.now() + 5000) {
      session = saved;
      scheduleRefresh();
      return session;
    }
  } catch (_) {}
  return null;
}

export async function signOut() {
  clearTimeout(refreshTimer);
  const s = session;
  session = null;
  try {
    sessionStorage.removeItem(SESSION_KEY);
  } catch (_) {}
  if (s && s.refresh_token) {
    fetch(`${idpBase()}/logout`, {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ client_id: config.client_id, refresh_token: s.refresh_token }),
    }).catch(() => {});
  }
}

export function currentSession() {
  return session;
}

async function token() {
  if (!session) throw new ApiError(401, "invalid_token", "Please sign in.");
  if (session.expires_at - Date.now() < 10000 && session.refresh_token) {
    try {
      await refresh();
    } catch (_) {
      /* fall through with the old token; the API will say 401 */
    }
  }
  return session.access_token;
}

async function errorFrom(res) {
  let code = `http_${res.status}`;
  let message = res.statusText || "Request failed";
  try {
    const body = await res.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch (_) {}
  return new ApiError(res.status, code, message);
}

/**
 * Authorised request. `body` objects are sent as JSON; strings with `contentType`.
 * Returns { status, headers, data } with data parsed per content type (JSON or text).
 */
export async function request(method, path, { body, contentType, accept, keepalive } = {}) {
  const headers = { Authorization: `Bearer ${await token()}` };
  let payload;
  if (body !== undefined && body !== null && typeof body !== "string") {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  } else if (typeof body === "string") {
    headers["Content-Type"] = contentType || "text/plain";
    payload = body;
  }
  if (accept) headers.Accept = accept;
  let res;
  try {
    res = await fetch(apiUrl(path), { method, headers, body: payload, keepalive: !!keepalive });
  } catch (e) {
    throw new ApiError(0, "network_error", "The gateway can not be reached.");
  }
  if (!res.ok) throw await errorFrom(res);
  const type = res.headers.get("Content-Type") || "";
  let data = null;
  if (res.status !== 204) data = type.includes("json") ? await res.json() : await res.text();
  return { status: res.status, headers: res.headers, data };
}

/** Absolute URL of a path the API returned (e.g. a WHEP Location). */
export function resolve(path) {
  return new URL(path, new URL(apiUrl("/"), window.location.href)).toString();
}

/**
 * A websocket URL with the access token as `?access_token=`: browsers can not set an
 * Authorization header on a websocket, so the gateway accepts the token there.
 */
export async function wsUrl(path, params = {}) {
  const url = new URL(apiUrl(path), window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, String(v));
  url.searchParams.set("access_token", await token());
  return url.toString();
}

// --- the calls the console makes ---------------------------------------------------------
export const listConversations = async () => (await request("GET", "/v1/conversations")).data;
/** `voice`: null (chat only), {kind: "webrtc"} (this browser) or {kind: "sip", uri} (a phone). */
export const startMonitor = async (cid, voice) =>
  (await request("POST", `/v1/conversations/${encodeURIComponent(cid)}/monitors`, { body: { voice: voice || null } })).data;
export const getMe = async () => (await request("GET", "/v1/me")).data;
export const putPhone = async (uri) => (await request("PUT", "/v1/me/phone", { body: { uri } })).data;
export const endMonitor = (mid, { keepalive = false } = {}) => request("DELETE", `/v1/monitors/${encodeURIComponent(mid)}`, { keepalive });
export const whisper = async (mid, text) => (await request("POST", `/v1/monitors/${encodeURIComponent(mid)}/whisper`, { body: { text } })).data;
export const barge = async (mid) => (await request("POST", `/v1/monitors/${encodeURIComponent(mid)}/barge`, { body: {} })).data;
export const sendMessage = async (mid, text) => (await request("POST", `/v1/monitors/${encodeURIComponent(mid)}/messages`, { body: { text } })).data;
