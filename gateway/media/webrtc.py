"""WebRTC plane, public surface: what the control plane imports.

* :func:`answer_whep` / :class:`WhepListener` / :class:`WhepSession` -- see :mod:`.whep`;
* :class:`LegTapTrack` -- the track (:mod:`.track`); :mod:`.ice` -- ICE settings.
"""

from .ice import rtc_configuration
from .track import LegTapTrack, TrackStats
from .whep import WhepError, WhepListener, WhepSession, answer_whep

__all__ = ["answer_whep", "WhepListener", "WhepSession", "WhepError", "LegTapTrack", "TrackStats", "rtc_configuration"]
