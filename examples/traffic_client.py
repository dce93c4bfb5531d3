"""The traffic demo's per-frame detection, asked of `hetero serve` with tritonclient (KServe v2 / HTTP).

    python examples/traffic_client.py export REPO                  # write the model repository
    hetero serve REPO                                               # in another shell
    python examples/traffic_client.py detect --frames 40           # stream frames, print counts

The served model is the front of the detection pipeline (`hetero.apps.detection`): uint8 frame ->
NanoDet's six head outputs, in standard ONNX ops only, so the server needs nothing but the model
file (any KServe v2 server with an ONNX backend would do). The client runs the rest, the custom
BoxDecode op and NMS, with Hetero, where the kernel is registered.

To serve the whole pipeline instead (`export --whole`, `detect --whole`), the server process must
register the BoxDecode kernel before it loads the repository, by importing the module that does:

    python -c "import hetero.apps.detection, hetero.cli; hetero.cli.main()" serve REPO
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
import onnx
import tritonclient.http as triton

import hetero
from hetero.apps import traffic
from hetero.apps.detection import detections, detector_model, split_detector_model

FRONT, WHOLE = "nanodet_frame_to_heads", "nanodet_frame_to_detections"
CONFIG = "inputs: [frame]   # uint8 BGR [height, width, 3], the size the model was exported for\n"


def models(video: Path) -> tuple[onnx.ModelProto, onnx.ModelProto, onnx.ModelProto]:
    """The whole pipeline for the video's frame size, and its two halves."""
    _, width, height, _ = traffic.probe(video)
    whole = detector_model(height, width)
    return (whole, *split_detector_model(whole))


def export(repository: Path, video: Path, whole: bool) -> None:
    """Write REPO/<model>/1/model.onnx and REPO/<model>/config.yaml."""
    pipeline, front, _ = models(video)
    name, model = (WHOLE, pipeline) if whole else (FRONT, front)
    folder = repository / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "1" / "model.onnx")
    (folder / "config.yaml").write_text(CONFIG)
    print(f"wrote {folder}; serve it with: hetero serve {repository}")


def detect(url: str, video: Path, frames: int | None, whole: bool, in_flight: int) -> None:
    """Send frames, up to `in_flight` at once, and print what each holds, in frame order."""
    _, front, back = models(video)
    decoder = None if whole else hetero.compile(back)
    names = ["boxes", "scores", "classes"] if whole else [o.name for o in front.graph.output]
    client = triton.InferenceServerClient(url, concurrency=in_flight)
    wanted = [triton.InferRequestedOutput(name, binary_data=True) for name in names]

    def send(frame: np.ndarray) -> triton.InferAsyncRequest:
        given = triton.InferInput("frame", list(frame.shape), "UINT8")
        given.set_data_from_numpy(frame, binary_data=True)
        return client.async_infer(WHOLE if whole else FRONT, [given], outputs=wanted)

    def show(index: int, request: triton.InferAsyncRequest) -> None:
        result = request.get_result()
        outputs = {name: result.as_numpy(name) for name in names}
        found = detections(outputs if decoder is None else decoder.run(outputs))
        kinds = Counter(traffic.category(d.label) for d in found)
        labels = ", ".join(f"{label} x{n}" if n > 1 else label
                           for label, n in Counter(d.label for d in found).most_common())
        print(f"frame {index:4}: {kinds['pedestrian']} pedestrians, {kinds['vehicle']} vehicles  ({labels})")

    start, window, count = time.perf_counter(), deque(), 0
    for count, frame in enumerate(traffic.read_frames(video, frames), 1):
        window.append((count - 1, send(frame)))
        if len(window) >= in_flight:
            show(*window.popleft())
    while window:
        show(*window.popleft())
    seconds = time.perf_counter() - start
    print(f"{count} frames in {seconds:.1f} s: {count / seconds:.1f} frames/s")
    client.close()


def main() -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--video", type=Path, default=traffic.VIDEO)
    common.add_argument("--whole", action="store_true",
                        help="the whole pipeline on the server (which must register BoxDecode)")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("export", parents=[common], help="write the model repository").add_argument(
        "repository", type=Path)
    ask = commands.add_parser("detect", parents=[common], help="stream the video's frames to the server")
    ask.add_argument("--url", default="localhost:8000")
    ask.add_argument("--frames", type=int, default=None, help="only the first N frames")
    ask.add_argument("--in-flight", type=int, default=4, help="requests in flight at once")
    args = parser.parse_args()
    if args.command == "export":
        export(args.repository, args.video, args.whole)
    else:
        detect(args.url, args.video, args.frames, args.whole, args.in_flight)


if __name__ == "__main__":
    main()
