"""Mixer, level meter, upsampler, the pre-encoded Opus and G.711 paths and the track: no network."""

from __future__ import annotations

import asyncio

import av
import numpy as np
import pytest

from devtools.fake_taps import PollableToneTap, ToneTap, tone
from gateway.media.levels import FLOOR_DBFS, LevelMeter, rms_dbfs
from gateway.media.mixer import Upsampler, interleave_stereo, mix_mono
from gateway.media.opus import OpusPacketEncoder
from gateway.media.track import LegTapTrack

pytestmark = pytest.mark.unit


def test_mix_mono_sums_and_saturates() -> None:
    a = np.array([1000, 30000, -30000, 0], dtype=np.int16)
    c = np.array([2000, 30000, -30000, -5], dtype=np.int16)
    out = mix_mono(a, c)
    assert out.dtype == np.int16
    assert out.tolist() == [3000, 32767, -32768, -5]
    with pytest.raises(ValueError):
        mix_mono(a, c[:2])


def test_interleave_stereo_agent_left() -> None:
    a = np.array([1, 2, 3], dtype=np.int16)
    c = np.array([-1, -2, -3], dtype=np.int16)
    assert interleave_stereo(a, c).tolist() == [1, -1, 2, -2, 3, -3]


def _dominant_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spec)])


def test_upsampler_8k_to_48k_keeps_tone_and_level_across_frames() -> None:
    up = Upsampler(8000, 48000)
    frames = [up.process(tone(1000, 160, 8000, start=i * 160)) for i in range(20)]
    assert all(f.shape == (960,) and f.dtype == np.int16 for f in frames)
    y = np.concatenate(frames)[960:]  # skip the filter's start-up
    assert abs(_dominant_hz(y.astype(float), 48000) - 1000) < 30
    assert abs(rms_dbfs(y) - rms_dbfs(tone(1000, 8000, 8000))) < 0.5
    # seamless: no image energy above 4 kHz (zero-stuffing images at 7, 9, 15, 17 kHz ...)
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y)))) ** 2
    freqs = np.fft.rfftfreq(len(y), 1 / 48000)
    assert spec[freqs > 4500].sum() / spec.sum() < 1e-3


def test_upsampler_stereo_keeps_channels_apart() -> None:
    up = Upsampler(8000, 48000, channels=2)
    out = [
        up.process(interleave_stereo(tone(600, 160, 8000, i * 160), tone(1000, 160, 8000, i * 160))) for i in range(10)
    ]
    y = np.concatenate(out).reshape(-1, 2)[960:]
    assert abs(_dominant_hz(y[:, 0].astype(float), 48000) - 600) < 30
    assert abs(_dominant_hz(y[:, 1].astype(float), 48000) - 1000) < 30


def test_rms_dbfs_and_meter() -> None:
    assert rms_dbfs(np.zeros(160, np.int16)) == FLOOR_DBFS
    assert abs(rms_dbfs(tone(1000, 8000, 8000, amplitude=32767)) - (-3.0)) < 0.1
    seen: list[tuple[float, float]] = []
    meter = LevelMeter(lambda a, c: seen.append((a, c)), interval_frames=5)
    for i in range(12):
        meter.feed(tone(600, 160, 8000, i * 160, amplitude=8000), np.zeros(160, np.int16))
    assert len(seen) == 2
    assert abs(seen[0][0] - (-15.2)) < 0.3 and seen[0][1] == FLOOR_DBFS


def test_meter_survives_a_broken_callback() -> None:
    def boom(a: float, c: float) -> None:
        raise RuntimeError("observer bug")

    meter = LevelMeter(boom, interval_frames=1)
    meter.feed(np.ones(160, np.int16), np.ones(160, np.int16))
    assert meter.feed(np.ones(160, np.int16), np.ones(160, np.int16)) is None  # disabled, no raise


@pytest.mark.parametrize("channels", [1, 2])
def test_opus_packets_decode_back(channels: int) -> None:
    enc = OpusPacketEncoder(8000, channels=channels)
    dec = av.CodecContext.create("libopus", "r")
    dec.sample_rate = 48000
    dec.layout = "stereo"
    dec.format = "s16"
    pcm_out = []
    for i in range(25):
        a, c = tone(600, 160, 8000, i * 160), tone(1000, 160, 8000, i * 160)
        pkt = enc.encode(interleave_stereo(a, c) if channels == 2 else mix_mono(a, c), i)
        assert isinstance(pkt, av.Packet)
        assert pkt.pts == i * 960 and pkt.time_base.denominator == 48000  # RTP clock ticks
        for f in dec.decode(av.Packet(bytes(pkt))):
            pcm_out.append(f.to_ndarray().reshape(-1, 2))
    y = np.concatenate(pcm_out)[4800:].astype(float)
    if channels == 2:
        assert abs(_dominant_hz(y[:, 0], 48000) - 600) < 30
        assert abs(_dominant_hz(y[:, 1], 48000) - 1000) < 30


@pytest.mark.parametrize("tap_class", [ToneTap, PollableToneTap])
async def test_track_paces_sends_silence_when_tap_is_late_and_bounds_buffer(tap_class: type[ToneTap]) -> None:
    tap = tap_class("c-t", frames=10)
    track = LegTapTrack(tap, stereo=False)
    assert (track._pump_task is None) == (tap_class is PollableToneTap)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    outs = [await track.recv() for _ in range(30)]
    elapsed = loop.time() - t0
    # 29 ticks of 20 ms after the first: paced, never faster than real time. How much slower
    # depends on the machine's load (a loaded CI machine took 3.3 s), so no upper bound here.
    assert elapsed > 0.5
    assert all(isinstance(p, av.Packet) for p in outs)
    assert [p.pts for p in outs] == [i * 960 for i in range(30)]
    assert track.stats.frames_in == 10 and track.stats.underruns == 20  # EOF -> silence
    assert track.tap_ended
    track.stop()
    tap.close()


@pytest.mark.parametrize("tap_class", [ToneTap, PollableToneTap])
async def test_track_drops_oldest_when_reader_stalls(tap_class: type[ToneTap]) -> None:
    tap = tap_class("c-d", capacity=50)
    track = LegTapTrack(tap, max_delay_frames=3)
    await asyncio.sleep(0.25)  # ~12 frames produced, nobody reading
    await track.recv()
    assert track.stats.dropped >= 10  # at most 3 were kept, then only the newest was sent
    assert track.stats.frames_in == 1
    assert not track._buffer
    track.stop()
    tap.close()


@pytest.mark.parametrize("codec", ["pcmu", "pcma"])
def test_g711_packets_match_ffmpeg(codec: str) -> None:
    from gateway.media.g711 import G711PacketEncoder

    x = np.concatenate(
        [tone(1000, 160, 8000, amplitude=30000)[:80], np.array([-32768, 32767, 0, -1, 1] * 16, dtype=np.int16)]
    )
    ctx = av.CodecContext.create({"pcmu": "pcm_mulaw", "pcma": "pcm_alaw"}[codec], "w")
    ctx.sample_rate, ctx.layout, ctx.format = 8000, "mono", "s16"
    frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 8000
    expected = b"".join(bytes(p) for p in ctx.encode(frame))
    pkt = G711PacketEncoder(codec).encode(x, 3)
    assert bytes(pkt) == expected
    half = (x // 2).astype(np.int16)
    assert (
        G711PacketEncoder(codec).payload(mix_mono(half, (x - half).astype(np.int16)), 0) == expected
    )  # mix then encode
    assert pkt.pts == 3 * 160 and pkt.time_base.denominator == 8000
