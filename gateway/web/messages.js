// Plain-words explanations for the API's stable error codes and monitor end reasons.
// tests/test_errors.py checks every key of GATEWAY_ERRORS against gateway/errors.py, and the
// reasons against gateway/policy/rules.py.

/** Codes the gateway answers ({"error": {"code": ...}}). */
const GATEWAY_ERRORS = {
  voice_monitor_busy: "Another supervisor is already listening to this call.",
  not_team_supervisor: "You are not a supervisor of this agent's team.",
  conversation_not_active: "This conversation has no active session any more, so it can not be monitored.",
  outbound_not_supported: "Outbound conversations can not be monitored.",
  transferred_not_supported: "Transferred conversations can not be monitored.",
  whisper_chat_only: "Whisper is only available for chat, not for calls.",
  barge_chat_only: "Barge-in is only available for chat, not for calls.",
  monitor_cannot_message_customer: "While monitoring silently you can not message the customer. Barge in first.",
  monitor_cannot_transfer: "A silent monitor can not transfer the conversation.",
  monitor_cannot_conference: "A silent monitor can not start a conference.",
  invalid_token: "Your sign-in has expired. Please sign in again.",
  forbidden: "You are not allowed to do that.",
  not_found: "That conversation or monitor no longer exists.",
  monitor_ended: "This monitoring session has already ended.",
  already_monitoring: "You are already monitoring this conversation.",
  rate_limited: "Too many messages at once. Please wait a moment.",
  monitor_rate_limited: "You started monitoring too often in a short time. Please wait a moment.",
  message_too_long: "That message is too long.",
  identity_unavailable: "The identity service is not answering. Try again shortly.",
  state_unavailable: "The gateway cannot reach its shared state. Try again shortly.",
  invalid_sip_uri: "That is not a SIP address: write it as sip:name@host (or sips:).",
  phone_unreachable: "Your phone could not be called.",
};

/** Codes of the identity provider (OAuth 2.0 errors) and of the console itself. */
const CONSOLE_ERRORS = {
  invalid_grant: "Wrong username or password.",
  invalid_client: "The console is not registered with the identity provider.",
  unauthorized_client: "This console may not sign in with a password.",
  network_error: "The gateway can not be reached. Check your connection.",
  webrtc_failed: "The audio connection could not be set up.",
  sso_state_mismatch: "Sign-in was refused: the answer from the identity provider did not match this sign-in attempt. Please sign in again.",
  sso_failed: "Single sign-on failed. Please sign in again.",
  sso_insecure_context: "Single sign-on needs a secure connection (https or localhost).",
};

const ERRORS = { ...GATEWAY_ERRORS, ...CONSOLE_ERRORS };

const END_REASONS = {
  left: "You left the conversation.",
  agent_left: "The agent left the conversation, so monitoring ended.",
  transferred: "The conversation was transferred, so monitoring ended.",
  voice_ended: "The call ended.",
  chat_ended: "The chat ended.",
  ended: "The conversation ended.",
  media_failure: "The audio path failed, so monitoring ended.",
  session_ended: "Your sign-in session ended, so monitoring ended.",
  shutdown: "The gateway is restarting; monitoring ended.",
};

const VOICE_BLOCKED = {
  voice_monitor_busy: "Chat only: another supervisor is already listening to this call.",
  voice_started_after_chat_monitoring: "Chat only: the call started after chat monitoring began.",
  voice_not_active: "Chat only: there is no active call.",
  voice_not_requested: "Chat only: you did not ask to listen.",
  phone_unreachable: "Chat only: your phone could not be called.",
};

/** One sentence for an ApiError-like {code, message}. */
export function explainError(err) {
  if (!err) return "";
  if (err.code && ERRORS[err.code]) return ERRORS[err.code];
  if (err.status === 401) return ERRORS.invalid_token;
  if (err.status === 403) return ERRORS.forbidden;
  return err.message || "Something went wrong.";
}

/** Why a row's Monitor button is disabled (the code the gateway would refuse the start with). */
export function explainNotMonitorable(code) {
  return ERRORS[code] || code;
}

export function explainEnd(reason) {
  return END_REASONS[reason] || `Monitoring ended (${reason || "unknown reason"}).`;
}

export function explainVoiceBlocked(code) {
  if (!code) return "";
  return VOICE_BLOCKED[code] || (ERRORS[code] ? `Chat only: ${ERRORS[code]}` : `Chat only (${code}).`);
}
