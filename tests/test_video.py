"""Video in and out: frames written are read back in order with their times; a non-video and a video cut
off part-way are a clear error and the frames before the cut."""

from __future__ import annotations

import numpy as np
import pytest

from vitpose.deploy.video import VideoError, VideoWriter, read_video


def moving_square(frames: int, size=(96, 128)) -> list[np.ndarray]:
    out = []
    for t in range(frames):
        rgb = np.zeros((*size, 3), np.uint8)
        rgb[30:60, 10 + 3 * t:40 + 3 * t] = (240, 40, 40)
        out.append(rgb)
    return out


def test_frames_come_back_in_order_with_their_times(tmp_path):
    frames = moving_square(20)
    with VideoWriter(tmp_path / "walk.mp4", fps=25) as out:
        for rgb in frames:
            out.write(rgb)
    reader = read_video(tmp_path / "walk.mp4")
    assert reader.fps == pytest.approx(25)
    back = list(reader)
    assert [f.index for f in back] == list(range(20)) and reader.error is None
    assert back[10].seconds == pytest.approx(10 / 25, abs=1e-3)
    for got, sent in zip(back, frames, strict=True):
        assert got.rgb.shape == sent.shape
        assert np.abs(got.rgb.astype(int) - sent).mean() < 6  # lossy, but the same picture
    # The square's position is where it was drawn: frames are not reordered or repeated.
    centre = [np.argwhere(f.rgb[..., 0] > 128)[:, 1].mean() for f in back]
    assert np.allclose(np.diff(centre), 3, atol=0.5)


def test_what_is_not_a_video_and_a_cut_video(tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(VideoError, match="notes.mp4: not a video FFmpeg can read"):
        read_video(tmp_path / "notes.mp4")
    with pytest.raises(VideoError, match="missing.mp4: no such file"):
        read_video(tmp_path / "missing.mp4")
    for suffix in (".mp4", ".mkv"):
        with VideoWriter(tmp_path / f"long{suffix}", fps=25) as out:
            for rgb in moving_square(60, size=(240, 320)):
                out.write(rgb)
        data = (tmp_path / f"long{suffix}").read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])  # a copy that stopped half-way
    # An mp4 keeps its index at the end: cut, it does not open, and says so.
    with pytest.raises(VideoError, match="cut.mp4: not a video FFmpeg can read"):
        read_video(tmp_path / "cut.mp4")
    # A streamable container gives the frames before the cut, in order, and ends there.
    frames = list(read_video(tmp_path / "cut.mkv"))
    assert 5 < len(frames) < 60 and [f.index for f in frames] == list(range(len(frames)))
