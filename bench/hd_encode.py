"""What a WebRTC media process spends per 20 ms frame to encode one conversation, by leg rate and codec.

    python bench/hd_encode.py [--listeners 1 2 5] [--frames 2000]

No network: the encoding step of :mod:`gateway.media.batch` on synthetic frames (a tone per
leg), timed with ``time.process_time`` over ``--frames`` frames. Per row, the CPU per frame
for all ``L`` listeners of one conversation:

* ``pcmu 8k``: narrowband legs, the batched G.711 pass (mix + 64 Ki lookup, all listeners in
  one numpy pass; what G.711 conversations cost);
* ``pcmu 16k``: wideband legs heard by a G.711 listener (decimated first, one listener at a time);
* ``opus 16k shared``: wideband legs, Opus, one encoder per conversation (``SharedOpus``:
  what HD voice costs since this branch);
* ``opus 16k each``: the same with one encoder per listener (before: per-listener encoders).

Prints one table; no asserts. RTP, SRTP and ``sendto`` (per listener in every case) are not
included: ``bench/voice_webrtc.py`` measures the whole path.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np

from devtools.fake_taps import tone
from gateway.media.batch import SharedOpus
from gateway.media.encoder import ListenerEncoder
from gateway.media.frames import LegFrame
from gateway.media.g711 import index_table


def frames(rate: int, count: int) -> list[LegFrame]:
    n = rate // 50
    return [LegFrame("c-1", i, rate, tone(600, n, rate, i * n), tone(1000, n, rate, i * n)) for i in range(count)]


def g711_batched(fs: list[LegFrame], listeners: int) -> Callable[[], None]:
    lut = index_table("pcmu")

    def run() -> None:
        for f in fs:  # as batch._send_g711: stack, sum, saturate, look up, for every listener
            legs = np.zeros((listeners, 2, f.samples), dtype=np.int16)
            legs[:, 0], legs[:, 1] = f.agent, f.customer
            wide = legs.astype(np.int32)
            mix = wide[:, 0] + wide[:, 1]
            np.minimum(mix, 32767, out=mix)
            np.maximum(mix, -32768, out=mix)
            lut[mix.astype(np.int16).view(np.uint16)].tobytes()

    return run


def per_listener(fs: list[LegFrame], listeners: int, codec: str) -> Callable[[], None]:
    encoders = [
        ListenerEncoder(codec, stereo=False, sample_rate=fs[0].sample_rate, on_levels=None) for _ in range(listeners)
    ]

    def run() -> None:
        for i, f in enumerate(fs):
            for e in encoders:
                e.payload(e.pcm(f), i)

    return run


def shared_opus(fs: list[LegFrame], listeners: int) -> Callable[[], None]:
    encoders = [
        ListenerEncoder("opus", stereo=False, sample_rate=fs[0].sample_rate, on_levels=None) for _ in range(listeners)
    ]
    shared = SharedOpus(fs[0].sample_rate, False)

    def run() -> None:
        for f in fs:
            for e in encoders:  # as BatchTrack.send_shared: meter per listener, encode once
                agent, customer = e.legs(f)
                e.meter.feed(agent, customer)
                shared.payload(f, e.mix, agent, customer)

    return run


def measure(run: Callable[[], None], count: int) -> float:
    run()  # warm up (tables, libopus)
    t0 = time.process_time()
    run()
    return (time.process_time() - t0) / count * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listeners", type=int, nargs="+", default=[1, 2, 5])
    p.add_argument("--frames", type=int, default=2000)
    args = p.parse_args()
    narrow, wide = frames(8000, args.frames), frames(16000, args.frames)
    print(f"\nEncoding one conversation per 20 ms frame, µs of CPU ({args.frames} frames per cell)")
    print(f"{'variant':>18} " + " ".join(f"{f'{n} listener(s)':>14}" for n in args.listeners))
    variants: list[tuple[str, Callable[[int], Callable[[], None]]]] = [
        ("pcmu 8k batched", lambda n: g711_batched(narrow, n)),
        ("pcmu 16k", lambda n: per_listener(wide, n, "pcmu")),
        ("opus 16k shared", lambda n: shared_opus(wide, n)),
        ("opus 16k each", lambda n: per_listener(wide, n, "opus")),
    ]
    for name, make in variants:
        cells = [measure(make(n), args.frames) for n in args.listeners]
        print(f"{name:>18} " + " ".join(f"{c:>14.1f}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
