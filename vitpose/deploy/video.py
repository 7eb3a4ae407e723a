"""Video in and out with PyAV (FFmpeg's libraries in the ``av`` wheel; no system FFmpeg needed).

``read_video(path)`` yields ``Frame``s (index, RGB array, time in seconds) and knows the stream's frame rate;
a file that is not a video is a ``VideoError`` naming it, and a video that stops decoding part-way ends the
iteration there with ``reader.error`` saying where (the frames before it are kept). ``VideoWriter`` writes RGB
frames to an H.264 mp4 (libx264, in the PyPI wheel), or MPEG-4 part 2 where that encoder is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import numpy as np

VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
DEFAULT_FPS = 30.0  # for a stream that does not say its rate


class VideoError(ValueError):
    """A file that cannot be read or written as a video; the message names it and says why."""


@dataclass(frozen=True)
class Frame:
    index: int
    rgb: np.ndarray  # (H, W, 3) uint8
    seconds: float


class VideoReader:
    """The frames of one video file, in order (see the module doc)."""

    def __init__(self, path: str | Path):
        import av

        self.path = Path(path)
        try:
            self.container = av.open(str(self.path))
        except FileNotFoundError:
            raise VideoError(f"{self.path}: no such file") from None
        except av.error.FFmpegError as err:
            raise VideoError(f"{self.path}: not a video FFmpeg can read ({err.strerror or err})") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"{self.path}: has no video stream")
        stream = self.container.streams.video[0]
        self.fps = float(stream.average_rate) if stream.average_rate else DEFAULT_FPS
        self.frames = stream.frames or None  # what the container says; None when it does not
        self.error: str | None = None

    def __iter__(self) -> Iterator[Frame]:
        import av

        index = 0
        try:
            for frame in self.container.decode(video=0):
                seconds = float(frame.time) if frame.time is not None else index / self.fps
                yield Frame(index, frame.to_ndarray(format="rgb24"), seconds)
                index += 1
        except av.error.FFmpegError as err:
            self.error = f"{self.path}: decoding stopped at frame {index} ({err.strerror or err})"
        finally:
            self.container.close()


def read_video(path: str | Path) -> VideoReader:
    return VideoReader(path)


class VideoWriter:
    """``with VideoWriter(path, fps) as out: out.write(rgb)``; the size is the first frame's (rounded down to even,
    as H.264's 4:2:0 sampling needs)."""

    def __init__(self, path: str | Path, fps: float):
        self.path, self.fps = Path(path), fps
        self.container = None
        self.stream = None
        self.written = 0

    def __enter__(self) -> VideoWriter:
        return self

    def _open(self, width: int, height: int) -> None:
        import av

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.path), mode="w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1001))
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"

    def write(self, rgb: np.ndarray) -> None:
        import av

        h, w = (rgb.shape[0] // 2) * 2, (rgb.shape[1] // 2) * 2
        if self.container is None:
            self._open(w, h)
        if (w, h) != (self.stream.width, self.stream.height):
            raise VideoError(f"{self.path}: frame {self.written} is {w}x{h}, the video {self.stream.width}x"
                             f"{self.stream.height}")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
        self.container.mux(self.stream.encode(frame))
        self.written += 1

    def close(self) -> None:
        if self.container is not None:
            self.container.mux(self.stream.encode(None))
            self.container.close()
            self.container = None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()  # also on an error: the frames written so far stay a playable video
