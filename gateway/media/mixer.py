"""Mixing the two legs of a conversation for one listener.

Pure numpy, no I/O. Three operations, each cheap enough to run per 20 ms frame per listener:

* :func:`mix_mono` -- agent + customer, summed in int32 and saturated back to int16 (a sum,
  not an average: each leg keeps its loudness, and clipping only happens when both legs are
  loud at once, which is what a listener on a conference bridge hears too).
* :func:`interleave_stereo` -- agent on the left channel, customer on the right, interleaved
  (``L R L R ...``) as packed s16 audio frames expect.
* :class:`Upsampler` -- integer-factor polyphase FIR resampling (8 kHz -> 48 kHz for Opus by
  default), stateful so frame boundaries are seamless.
* :class:`Downsampler` -- integer-factor low-pass and decimation (16 kHz wideband legs -> 8 kHz
  for a G.711 listener), stateful likewise.

Note on Opus: libopus accepts 8/12/16/24/48 kHz input natively and its RTP clock is always
48 kHz, so the WebRTC track feeds telephony audio to the encoder at its own rate (cheaper, and
the content above 4 kHz is empty anyway). :class:`Upsampler` is there for leg rates libopus
does not accept (:class:`~.opus.OpusPacketEncoder`).
"""

from __future__ import annotations

import numpy as np

OPUS_RATE = 48_000


def mix_mono(agent: np.ndarray, customer: np.ndarray) -> np.ndarray:
    """Sum two int16 legs with saturation; returns a new int16 array of the same length."""
    if agent.shape != customer.shape:
        raise ValueError(f"leg lengths differ: {agent.shape} != {customer.shape}")
    total = agent.astype(np.int32)
    total += customer
    # np.minimum/np.maximum in place: half the cost of np.clip's Python wrapper per frame
    np.minimum(total, 32767, out=total)
    np.maximum(total, -32768, out=total)
    return total.astype(np.int16)


def interleave_stereo(agent: np.ndarray, customer: np.ndarray) -> np.ndarray:
    """Agent left, customer right: returns int16 ``[a0, c0, a1, c1, ...]`` (length 2*S)."""
    if agent.shape != customer.shape:
        raise ValueError(f"leg lengths differ: {agent.shape} != {customer.shape}")
    out = np.empty(agent.shape[0] * 2, dtype=np.int16)
    out[0::2] = agent
    out[1::2] = customer
    return out


def _lowpass(factor: int, taps_per_phase: int) -> np.ndarray:
    """Windowed-sinc low-pass at the input Nyquist (slightly below), gain ``factor``."""
    n_taps = factor * taps_per_phase
    n = np.arange(n_taps) - (n_taps - 1) / 2.0
    cutoff = 0.45 / factor  # cycles per output sample: just under the input Nyquist
    h: np.ndarray = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(n_taps, 8.0)
    h *= factor / h.sum()  # zero-stuffing divides the level by `factor`; give it back
    return h


class Upsampler:
    """Integer-factor polyphase upsampler for int16 audio with 1 or 2 interleaved channels.

    ``Upsampler(8000, 48000)`` turns 160-sample frames into 960-sample frames. It keeps the
    last ``taps_per_phase - 1`` input samples so consecutive frames join without clicks; the
    filter delay is ``taps_per_phase / 2`` input samples (1 ms at 8 kHz with the default).
    """

    def __init__(self, in_rate: int, out_rate: int = OPUS_RATE, *, channels: int = 1, taps_per_phase: int = 16) -> None:
        if out_rate % in_rate:
            raise ValueError(f"{out_rate} is not an integer multiple of {in_rate}")
        if channels not in (1, 2):
            raise ValueError("channels must be 1 or 2")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.factor = out_rate // in_rate
        self.channels = channels
        self._k = taps_per_phase
        h = _lowpass(self.factor, taps_per_phase).astype(np.float32)
        # phases[k, p] = h[p + k*factor]: output sample n*factor+p = sum_k x[n-k] * phases[k, p]
        self._phases = np.ascontiguousarray(h.reshape(taps_per_phase, self.factor))
        self._history = np.zeros((channels, taps_per_phase - 1), dtype=np.float32)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Resample one frame (int16, interleaved if stereo); returns int16, interleaved."""
        if self.factor == 1:
            return samples.astype(np.int16, copy=True)
        chans = samples.reshape(-1, self.channels).T.astype(np.float32)  # (channels, n)
        n = chans.shape[1]
        out = np.empty((n * self.factor, self.channels), dtype=np.float32)
        for c in range(self.channels):
            x = np.concatenate((self._history[c], chans[c]))
            self._history[c] = x[n:] if self._k > 1 else self._history[c]
            # windows[i, k] = x[i + K - 1 - k]  (newest first), one row per input sample
            windows = np.lib.stride_tricks.sliding_window_view(x, self._k)[:, ::-1]
            out[:, c] = (windows @ self._phases).reshape(-1)
        np.clip(out, -32768, 32767, out=out)
        return np.rint(out).astype(np.int16).reshape(-1)


class Downsampler:
    """Integer-factor decimator for int16 mono audio: low-pass just under the output Nyquist,
    then every ``factor``-th sample.

    ``Downsampler(16000, 8000)`` turns a wideband leg's 320-sample frames into 160-sample
    frames a G.711 listener can take; what is above ~3.6 kHz is removed rather than folded
    back as aliases. Keeps the last ``taps - 1`` input samples so frames join without clicks.
    """

    def __init__(self, in_rate: int, out_rate: int, *, taps_per_phase: int = 24) -> None:
        if in_rate % out_rate:
            raise ValueError(f"{in_rate} is not an integer multiple of {out_rate}")
        self.factor = in_rate // out_rate
        # _lowpass(f) cuts at 0.45 of the *lower* rate's Nyquist with gain f: divide it back.
        self._h = (_lowpass(self.factor, taps_per_phase) / self.factor).astype(np.float32)
        self._history = np.zeros(self._h.shape[0] - 1, dtype=np.float32)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Decimate one frame (int16, length a multiple of ``factor``); returns int16."""
        if self.factor == 1:
            return samples.astype(np.int16, copy=True)
        x = np.concatenate((self._history, samples.astype(np.float32)))
        self._history = x[samples.shape[0] :]
        # "valid" convolution: one output per input sample once the history is full
        y = np.convolve(x, self._h, mode="valid")[:: self.factor]
        np.clip(y, -32768, 32767, out=y)
        return np.rint(y).astype(np.int16)
