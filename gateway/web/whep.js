// Receive-only WebRTC listening over WHEP: one recvonly audio transceiver, never a microphone.

import { request, resolve, ApiError } from "./api.js";

const GATHER_TIMEOUT_MS = 2000;

function waitForIceGathering(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((done) => {
    const timer = setTimeout(done, GATHER_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(timer);
        done();
      }
    });
  });
}

// Ask for stereo Opus (stereo=1): the gateway may send agent left / customer right.
function preferStereo(sdp) {
  const m = sdp.match(/a=rtpmap:(\d+) opus\/48000/i);
  if (!m) return sdp;
  const pt = m[1];
  const fmtp = new RegExp(`a=fmtp:${pt} ([^\\r\\n]*)`);
  if (fmtp.test(sdp)) return sdp.replace(fmtp, (line, params) => (params.includes("stereo=1") ? line : `${line};stereo=1`));
  return sdp.replace(m[0], `${m[0]}\r\na=fmtp:${pt} stereo=1`);
}

/**
 * Start listening to monitor `mid`. Returns a handle { pc, location, stop(), stats() }.
 * `audio` is the <audio> element that plays the stream.
 */
export async function listen(mid, audio, { onState } = {}) {
  const pc = new RTCPeerConnection({ iceServers: [] });
  pc.addTransceiver("audio", { direction: "recvonly" });
  pc.addEventListener("track", (ev) => {
    const stream = ev.streams && ev.streams[0] ? ev.streams[0] : new MediaStream([ev.track]);
    audio.srcObject = stream;
    const p = audio.play();
    if (p && p.catch) p.catch(() => onState && onState("autoplay_blocked"));
  });
  pc.addEventListener("connectionstatechange", () => onState && onState(pc.connectionState));

  let location = null;
  try {
    const offer = await pc.createOffer();
    await pc.setLocalDescription({ type: "offer", sdp: preferStereo(offer.sdp) });
    await waitForIceGathering(pc);
    const res = await request("POST", `/v1/monitors/${encodeURIComponent(mid)}/whep`, {
      body: pc.localDescription.sdp,
      contentType: "application/sdp",
      accept: "application/sdp",
    });
    location = res.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: res.data });
  } catch (e) {
    pc.close();
    if (location) request("DELETE", location).catch(() => {});
    throw e instanceof ApiError ? e : new ApiError(0, "webrtc_failed", String(e && e.message ? e.message : e));
  }

  let stopped = false;
  return {
    pc,
    location: location ? resolve(location) : null,
    async stop({ keepalive = false } = {}) {
      if (stopped) return;
      stopped = true;
      audio.pause();
      audio.srcObject = null;
      pc.close();
      if (location) {
        try {
          await request("DELETE", location, { keepalive });
        } catch (_) {
          /* the monitor may already be gone; leaving is always allowed */
        }
      }
    },
    async stats() {
      const report = await pc.getStats();
      for (const s of report.values()) if (s.type === "inbound-rtp" && s.kind === "audio") return s;
      return null;
    },
  };
}
