"""The traffic-camera demo: count pedestrians and vehicles in a video on every device at once.

The detection pipeline (`detection.detector_model`, one ONNX model) is replicated over the host's
devices by a `ReplicaPool`: one replica per accelerator plus CPU streams. Frames stream through
`pool.map(..., ordered=True)`, so however the replicas share the work, the annotated video comes
out in frame order.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import cv2
except ImportError as exc:  # video in and out is an optional extra
    raise ImportError("the traffic demo needs OpenCV: pip install 'hetero[demo]'", name=exc.name) from exc

import hetero
from hetero.apps.detection import detections, detector_model

VIDEO = Path(__file__).resolve().parents[2] / "samples" / "vtest.avi"
PEDESTRIANS = frozenset({"person"})
VEHICLES = frozenset({"bicycle", "car", "motorcycle", "bus", "truck"})
SHEET_FRAMES = 12
SHEET_COLUMNS = 4
_COLOURS = {"pedestrian": (80, 200, 60), "vehicle": (40, 140, 255), "other": (200, 200, 200)}  # BGR


@dataclass(frozen=True)
class ReplicaStats:
    """One replica's share of a run: how many frames it took and how long it was busy."""

    name: str
    frames: int
    busy_seconds: float

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.busy_seconds if self.busy_seconds else 0.0


@dataclass(frozen=True)
class TrafficReport:
    """What the demo did: counts per frame, per-replica throughput and the files it wrote."""

    counts: list[Counter]  # per frame: {"pedestrian": n, "vehicle": n, "other": n}
    seconds: float
    replicas: list[ReplicaStats]
    plan: hetero.Plan
    video: Path
    sheet: Path
    codec: str = "avc1"  # H.264, which browsers play; "mp4v" (MPEG-4 Part 2) where OpenCV has no H.264

    @property
    def playable(self) -> bool:
        """Whether a browser plays the video as written (H.264); if not, `convert` says how."""
        return self.codec == "avc1"

    @property
    def convert(self) -> str:
        return f"ffmpeg -i {self.video} -c:v libx264 -pix_fmt yuv420p {self.video.with_suffix('')}-h264.mp4"


def category(label: str) -> str:
    return "pedestrian" if label in PEDESTRIANS else "vehicle" if label in VEHICLES else "other"


def probe(video: Path) -> tuple[int, int, int, float]:
    """Frame count, width, height and frame rate of a video file."""
    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise hetero.InputError(f"cannot open video {str(video)!r}")
    try:
        props = (cv2.CAP_PROP_FRAME_COUNT, cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT)
        count, width, height = (int(capture.get(p)) for p in props)
        return count, width, height, capture.get(cv2.CAP_PROP_FPS) or 10.0
    finally:
        capture.release()


def read_frames(video: Path, limit: int | None = None) -> Iterator[np.ndarray]:
    """BGR frames of a video file, the first `limit` of them when given."""
    capture = cv2.VideoCapture(str(video))
    try:
        index = 0
        while limit is None or index < limit:
            ok, frame = capture.read()
            if not ok:
                return
            yield frame
            index += 1
    finally:
        capture.release()


def annotate(frame: np.ndarray, outputs: dict[str, np.ndarray], index: int) -> tuple[np.ndarray, Counter]:
    """A copy of the frame with boxes, labels and counts drawn; and the counts per category."""
    image = frame.copy()
    counts: Counter = Counter({"pedestrian": 0, "vehicle": 0})
    for found in detections(outputs):
        kind = category(found.label)
        counts[kind] += 1
        x1, y1, x2, y2 = (round(v) for v in found.box)
        cv2.rectangle(image, (x1, y1), (x2, y2), _COLOURS[kind], 2)
        cv2.putText(image, f"{found.label} {found.score:.2f}", (x1, max(12, y1 - 4)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, _COLOURS[kind], 1, cv2.LINE_AA)
    caption = f"frame {index}: {counts['pedestrian']} pedestrians, {counts['vehicle']} vehicles"
    cv2.rectangle(image, (0, 0), (len(caption) * 9 + 12, 24), (0, 0, 0), -1)
    cv2.putText(image, caption, (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    return image, counts


def contact_sheet(images: list[np.ndarray], columns: int = SHEET_COLUMNS) -> np.ndarray:
    """Images at half size in a grid, row by row; a short last row is padded with black."""
    small = [cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA) for image in images]
    small += [np.zeros_like(small[0])] * (-len(small) % columns)
    return np.vstack([np.hstack(small[i:i + columns]) for i in range(0, len(small), columns)])


def run(video: Path = VIDEO, frames: int | None = None, out_dir: Path = Path("out"), *,
        pool: hetero.ReplicaPool | None = None,
        on_frame: Callable[[int], None] | None = None) -> TrafficReport:
    """Detect, count and annotate the first `frames` frames (all by default) of a video.

    Writes `out_dir/traffic.mp4` and `out_dir/traffic_contact_sheet.png`. Without a `pool`, one
    is built for the video's frame size on every device present.
    """
    count, width, height, fps = probe(video)
    total = count if frames is None else min(count, frames)
    if total <= 0:
        raise hetero.InputError(f"video {str(video)!r}: no frames to run")
    own_pool = pool is None
    pool = pool or hetero.ReplicaPool.build(detector_model(height, width))
    out_dir.mkdir(parents=True, exist_ok=True)
    video_path, sheet_path = out_dir / "traffic.mp4", out_dir / "traffic_contact_sheet.png"
    writer, codec = video_writer(video_path, fps, (width, height))
    on_sheet = set(np.linspace(0, total - 1, min(SHEET_FRAMES, total)).round().astype(int).tolist())
    pending: deque[np.ndarray] = deque()

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        for frame in read_frames(video, total):
            pending.append(frame)
            yield {"frame": frame}

    counts, sheet = [], []
    before = [(r.served, r.busy_seconds) for r in pool.replicas]
    start = time.perf_counter()
    try:
        for index, outputs in enumerate(pool.map(feeds(), ordered=True)):
            image, found = annotate(pending.popleft(), outputs, index)
            writer.write(image)
            counts.append(found)
            if index in on_sheet:
                sheet.append(image)
            if on_frame:
                on_frame(index)
        seconds = time.perf_counter() - start
    finally:
        writer.release()
        if own_pool:
            pool.close()
    cv2.imwrite(str(sheet_path), contact_sheet(sheet))
    replicas = [ReplicaStats(r.name, r.served - served, r.busy_seconds - busy)
                for r, (served, busy) in zip(pool.replicas, before, strict=True)]
    return TrafficReport(counts, seconds, replicas, pool.plan, video_path, sheet_path, codec)


def video_writer(path: Path, fps: float, size: tuple[int, int]) -> tuple[cv2.VideoWriter, str]:
    """An MP4 writer: H.264 ('avc1') where this OpenCV build can encode it (browsers play it),
    else MPEG-4 Part 2 ('mp4v', which every OpenCV wheel writes but browsers do not play)."""
    for codec in ("avc1", "mp4v"):
        with _quiet_stderr():  # FFmpeg says on stderr why it has no H.264 encoder
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size)
        if writer.isOpened():
            return writer, codec
    raise hetero.HeteroError(f"OpenCV cannot write {str(path)!r} (neither avc1 nor mp4v codec)")


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

