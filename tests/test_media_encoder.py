"""The one frame -> PCM -> payload step both senders use (gateway/media/encoder.py): no network."""

from __future__ import annotations

import numpy as np
import pytest

from devtools.fake_taps import ToneTap, tone
from gateway.media.batch import BatchTrack
from gateway.media.encoder import ListenerEncoder
from gateway.media.frames import LegFrame
from gateway.media.levels import FLOOR_DBFS
from gateway.media.mixer import interleave_stereo, mix_mono

pytestmark = pytest.mark.unit

G711_SILENCE = bytes([0xFF]) * 160  # mu-law of 0


def _frame(index: int, rate: int = 8000) -> LegFrame:
    n = rate // 50
    return LegFrame("c-e", index, rate, tone(600, n, rate, index * n), tone(1000, n, rate, index * n))


@pytest.mark.parametrize("codec,stereo", [("pcmu", False), ("pcma", False), ("opus", False), ("opus", True)])
def test_track_packets_and_batch_payloads_are_the_same_bytes(codec: str, stereo: bool) -> None:
    for_track = ListenerEncoder(codec, stereo=stereo, sample_rate=8000, on_levels=None)
    for_batch = ListenerEncoder(codec, stereo=stereo, sample_rate=8000, on_levels=None)
    for i in range(10):
        packet = for_track.packet(for_track.pcm(_frame(i)), i)
        assert packet is not None
        assert bytes(packet) == for_batch.payload(for_batch.pcm(_frame(i)), i)
        assert packet.pts == i * for_track.ticks_per_frame
    assert for_track.ticks_per_frame == (960 if codec == "opus" else 160)


def test_mono_mixes_stereo_interleaves_and_g711_is_always_mono() -> None:
    frame = _frame(0)
    assert np.array_equal(
        ListenerEncoder("opus", stereo=False, sample_rate=8000, on_levels=None).pcm(frame),
        mix_mono(frame.agent, frame.customer),
    )
    assert np.array_equal(
        ListenerEncoder("opus", stereo=True, sample_rate=8000, on_levels=None).pcm(frame),
        interleave_stereo(frame.agent, frame.customer),
    )
    g711 = ListenerEncoder("PCMU", stereo=True, sample_rate=8000, on_levels=None)
    assert g711.codec == "pcmu" and not g711.stereo
    assert np.array_equal(g711.pcm(frame), mix_mono(frame.agent, frame.customer))


def test_no_frame_is_metered_and_sent_as_silence() -> None:
    levels: list[tuple[float, float]] = []
    enc = ListenerEncoder("pcmu", stereo=False, sample_rate=8000, on_levels=lambda a, c: levels.append((a, c)))
    for _ in range(5):
        pcm = enc.pcm(None)
    assert pcm.shape == (160,) and not pcm.any()
    assert levels == [(FLOOR_DBFS, FLOOR_DBFS)]
    assert enc.payload(pcm, 0) == G711_SILENCE


def test_wideband_legs_are_decimated_for_g711_and_kept_for_opus() -> None:
    enc = ListenerEncoder("pcmu", stereo=False, sample_rate=8000, on_levels=None)
    assert enc.pre_encodes and enc.g711_mono == "pcmu"
    pcms = []
    for i in range(25):  # wideband legs: 600 Hz agent plus a 6 kHz tone G.711 can not carry
        n = 320
        agent = (tone(600, n, 16000, i * n).astype(np.int32) + tone(6000, n, 16000, i * n)).astype(np.int16)
        pcm = enc.pcm(LegFrame("c-e", i, 16000, agent, tone(1000, n, 16000, i * n)))
        assert pcm.shape == (160,) and enc.pre_encodes  # decimated to 8 kHz, still encoded here
        assert enc.payload(pcm, i) is not None and len(enc.payload(pcm, i) or b"") == 160
        pcms.append(pcm)
    heard = np.concatenate(pcms[5:]).astype(float)
    spectrum = np.abs(np.fft.rfft(heard * np.hanning(len(heard))))
    hz = np.fft.rfftfreq(len(heard), 1 / 8000)
    peak = spectrum.max()
    level = {f: spectrum[(hz > f - 15) & (hz < f + 15)].max() / peak for f in (600, 1000, 2000)}
    # both legs pass; the 6 kHz tone is filtered out, not folded back to 8000 - 6000 = 2000 Hz
    assert level[600] > 0.5 and level[1000] > 0.5 and level[2000] < 0.01, level
    assert enc.audio_frame(pcm, 1).sample_rate == 8000
    opus = ListenerEncoder("opus", stereo=False, sample_rate=8000, on_levels=None)
    packet = opus.packet(opus.pcm(_frame(1, rate=16000)), 1)
    assert packet is not None and packet.pts == 960  # libopus takes 16 kHz as it is


def test_g722_is_left_to_aiortc_in_stereo_too() -> None:
    enc = ListenerEncoder("g722", stereo=True, sample_rate=8000, on_levels=None)
    assert not enc.pre_encodes and enc.stereo
    out = enc.audio_frame(enc.pcm(_frame(2)), 2)
    assert out.layout.name == "stereo" and out.samples == 160 and out.pts == 320


async def test_a_send_tick_phase_shift_moves_the_rtp_clock_with_it() -> None:
    # The batched sender moves its tick 10 ms later when most frames land just after it:
    # every later packet leaves 10 ms later, so its RTP time stamp must say so (80 ticks at
    # 8 kHz), or the move stays in the stream as lateness against its own clock.
    track = BatchTrack(ToneTap("c-1"), codec="pcmu", stereo=False)
    try:
        before = track._ts
        track.delay(0.010)
        assert (track._ts - before) & 0xFFFFFFFF == 80
    finally:
        track.stop()
