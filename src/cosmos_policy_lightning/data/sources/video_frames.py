"""The frames of one camera for one episode, decoded from an mp4 file with PyAV at given timestamps.

LeRobot datasets store each camera as video; the frame of data row ``t`` is the one presented at
``from_timestamp + timestamp[t]`` seconds (``from_timestamp`` is where the episode starts inside a file
that holds several episodes, 0 when the file holds one). A frame counts as found when its presentation
time is within ``tolerance_s`` of that query (LeRobot's default is 1e-4 s).

Decoding is sequential: the first read seeks once to the keyframe at or before the episode's first
timestamp, and every later read continues the same decoder, so an episode costs one seek and each
frame is decoded once -- never one seek per frame. Frames before the episode (from the keyframe on)
are decoded but not converted to RGB. Reads come in blocks (``FrameSource.blocks``), so memory holds
one block of RGB frames, not the episode. A read that goes backwards (no caller in this package does)
seeks again.

Demuxers index keyframes by decode time; where decode time runs ahead of presentation time (HEVC with
open GOPs and B-frames), a seek can land on a keyframe presented after the target. The first decoded
frame shows it, and the seek is retried once from 1 s earlier (then 4, 16, 64 s, then the file start).

PyAV (``av``) wraps FFmpeg; its wheels include the AV1 (dav1d), H.264 and HEVC decoders.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DataError

#: LeRobot's default tolerance between a data timestamp and a video frame's presentation time, seconds.
TOLERANCE_S = 1e-4
#: How far before the target a seek retries when the demuxer lands after it (open-GOP HEVC, say), seconds.
_BACKOFF_S = (1.0, 4.0, 16.0, 64.0)


class VideoFrames:
    """``(T, H, W, 3)`` uint8 RGB frames of one video at ``T`` timestamps, read like an array.

    Only slicing with increasing, contiguous ranges is efficient (``frames[a:b]`` then ``frames[b:c]``);
    that is how :class:`~cosmos_policy_lightning.data.episode.FrameSource` reads.

    Args:
        path: the mp4 file.
        timestamps: ``(T,)`` seconds from the episode's start (LeRobot's ``timestamp`` column),
            non-decreasing.
        from_timestamp: where the episode starts in the file, seconds (0 for one episode per file).
        where: ``"<root>: episode <id>: key <feature>"`` prefix of error messages.
        tolerance_s: largest accepted gap between a query time and a frame's presentation time, seconds.
        handles: where the open container is registered so that the reader's ``close()`` closes it.
        threads: FFmpeg decoder threads (1: conversion parallelism comes from worker processes).

    Attributes:
        shape: ``(T, H, W, 3)``; ``H, W`` from the stream.
        dtype: uint8.
        seeks: seeks done so far (1 per episode when read in order).

    Raises:
        DataError: missing or unreadable file, no video stream, decreasing timestamps; on reading, a
            timestamp with no frame within ``tolerance_s`` (naming the step and the timestamp).
    """

    def __init__(self, path: str | Path, timestamps: np.ndarray, where: str, from_timestamp: float = 0.0,
                 tolerance_s: float = TOLERANCE_S, handles: MutableMapping[str, Any] | None = None,
                 threads: int = 1):
        import av

        self.path, self.where, self.tolerance_s = Path(path), where, float(tolerance_s)
        self.timestamps = np.asarray(timestamps, dtype=np.float64).reshape(-1)
        self.from_timestamp = float(from_timestamp)
        if not self.path.is_file():
            raise DataError(f"{where}: video file {self.path} not found")
        if not (np.all(np.isfinite(self.timestamps)) and math.isfinite(self.from_timestamp)):
            raise DataError(f"{where}: timestamps contain NaN or inf")
        back = np.flatnonzero(np.diff(self.timestamps) < 0)
        if len(back):
            t = int(back[0]) + 1
            raise DataError(f"{where}: timestamps decrease at step {t} ({self.timestamps[t - 1]:.4f} s then "
                            f"{self.timestamps[t]:.4f} s); expected non-decreasing timestamps")
        self.times = self.from_timestamp + self.timestamps  # presentation times in the file
        try:
            self._container = av.open(str(self.path))
        except Exception as err:  # av.error.* for a corrupt or non-video file
            raise DataError(f"{where}: {self.path}: not a readable video ({type(err).__name__}: "
                            f"{_first_line(err)})") from None
        if handles is not None:
            handles[f"{self.path}#{id(self)}"] = self._container
        if not self._container.streams.video:
            self._container.close()
            raise DataError(f"{where}: {self.path}: no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.codec_context.thread_count = max(1, int(threads))
        ctx = self._stream.codec_context
        self.shape = (len(self.times), int(ctx.height), int(ctx.width), 3)
        self.dtype = np.dtype(np.uint8)
        self.seeks = 0
        self._decoder = None
        self._next = 0              # next row a sequential read continues from
        self._frame = None          # the decoded frame not yet passed
        self._time = -math.inf      # its presentation time (inf after the end of the stream)
        self._prev_time = -math.inf
        self._rgb: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        """Close the container (also done by the reader's ``close()``)."""
        self._container.close()

    def __getitem__(self, index: slice) -> np.ndarray:
        """Frames of rows ``index`` (a slice with step 1) as ``(n, H, W, 3)`` uint8."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("VideoFrames supports only contiguous slices")
        start, stop, _ = index.indices(len(self))
        out = np.empty((max(stop - start, 0), *self.shape[1:]), np.uint8)
        if stop <= start:
            return out
        if self._decoder is None or start != self._next:
            self._restart(start)
        tol = self.tolerance_s
        for row in range(start, stop):
            query = self.times[row]
            while self._time < query - tol:
                self._advance()
            if self._time > query + tol:
                self._missing(row, query)
            if self._rgb is None:
                self._rgb = self._frame.to_ndarray(format="rgb24")
                if self._rgb.shape != self.shape[1:]:
                    raise DataError(f"{self.where}: {self.path}: frame at {self._time:.4f} s is "
                                    f"{self._rgb.shape[1]}x{self._rgb.shape[0]}, the stream is "
                                    f"{self.shape[2]}x{self.shape[1]}")
            out[row - start] = self._rgb
        self._next = stop
        return out

    # ------------------------------------------------------------------ decoding
    def _restart(self, row: int) -> None:
        """Seek to the keyframe at or before ``times[row]`` and decode up to the first frame; seek
        further back if the demuxer landed after the target."""
        target = max(0.0, self.times[row] - self.tolerance_s)
        for backoff in (0.0, *_BACKOFF_S, math.inf):
            start = max(0.0, target - backoff)
            self._seek(start)
            self._advance()
            if self._time <= target or start == 0.0:
                break
        self._next = row

    def _seek(self, seconds: float) -> None:
        tb = self._stream.time_base
        offset = int(math.floor(seconds / float(tb))) if tb else 0
        self._container.seek(offset, stream=self._stream, backward=True, any_frame=False)
        self.seeks += 1
        self._decoder = self._container.decode(self._stream)
        self._frame, self._rgb = None, None
        self._time = self._prev_time = -math.inf

    def _advance(self) -> None:
        """Decode the next frame (presentation order); past the end ``_time`` becomes inf."""
        self._prev_time = self._time
        self._rgb = None
        try:
            frame = next(self._decoder)
        except StopIteration:
            self._frame, self._time = None, math.inf
            return
        except Exception as err:  # av.error.InvalidDataError on a corrupt packet
            raise DataError(f"{self.where}: {self.path}: cannot decode after {self._prev_time:.4f} s "
                            f"({type(err).__name__}: {_first_line(err)})") from None
        if frame.pts is None:
            raise DataError(f"{self.where}: {self.path}: a frame has no presentation timestamp")
        self._frame, self._time = frame, float(frame.pts * frame.time_base)

    def _missing(self, row: int, query: float) -> None:
        near = [t for t in (self._prev_time, self._time) if math.isfinite(t)]
        nearest = min(near, key=lambda t: abs(t - query)) if near else None
        found = f"nearest frame at {nearest:.4f} s" if nearest is not None else "no frame decoded"
        raise DataError(f"{self.where}: no frame of {self.path} within {self.tolerance_s:g} s of timestamp "
                        f"{self.timestamps[row]:.4f} s (step {row}; from_timestamp {self.from_timestamp:.4f} s, so "
                        f"{query:.4f} s in the file); {found}")


def _first_line(err: BaseException) -> str:
    text = str(err)
    return text.splitlines()[0] if text else ""


__all__ = ["VideoFrames", "TOLERANCE_S"]
