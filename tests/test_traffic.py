"""The detection pipeline (one ONNX model holding a custom op) and the traffic demo, on the sample video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import hetero

cv2 = pytest.importorskip("cv2")
ort = pytest.importorskip("onnxruntime")

from hetero.apps import detection, traffic  # noqa: E402  (needs cv2)
from hetero.apps.detection import COCO_CLASSES, HEADS, INPUT_SIZE, MEAN, NANODET, STD, STRIDES  # noqa: E402

VEHICLES = {"car", "truck", "bus"}


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return list(traffic.read_frames(traffic.VIDEO, 5))


@pytest.fixture(scope="module")
def model(frames) -> hetero.Model:
    height, width = frames[0].shape[:2]
    return hetero.load(detection.detector_model(height, width))


@pytest.fixture(scope="module", params=["onnxruntime,numpy", "openvino,numpy", "onnxruntime,opencl,numpy"],
                ids=["numpy-kernel", "openvino", "opencl-kernel"])
def results(request, model, frames) -> list[dict[str, np.ndarray]]:
    try:
        session = hetero.compile(model, request.param)
    except hetero.ExecutorUnavailableError as exc:
        pytest.skip(str(exc))
    decode = next(n for n in model.nodes if n.op_type == "BoxDecode")
    assert session.plan.executor_of(decode).library == ("opencl" if "opencl" in request.param else "numpy")
    return [session.run({"frame": frame}) for frame in frames]


def test_people_and_vehicles_found_inside_the_frame(frames, results):
    labels = [COCO_CLASSES[c] for c in results[0]["classes"]]
    assert labels.count("person") >= 2
    assert VEHICLES & set(labels)
    height, width = frames[0].shape[:2]
    for outputs in results:
        boxes = outputs["boxes"]
        assert boxes.shape == (len(outputs["scores"]), 4) and len(boxes) == len(outputs["classes"])
        assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= width) and np.all(boxes[:, [1, 3]] <= height)
        assert np.all(boxes[:, :2] <= boxes[:, 2:]) and np.all(outputs["scores"] > 0.35)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """ONNX Resize, linear, half_pixel: one axis at a time."""
    for axis in (0, 1):
        length = image.shape[axis]
        where = np.clip((np.arange(size) + 0.5) * length / size - 0.5, 0, length - 1)
        low = np.floor(where).astype(int)
        high = np.minimum(low + 1, length - 1)
        weight = np.expand_dims(where - low, tuple(range(1, image.ndim - axis)))
        image = np.take(image, low, axis) * (1 - weight) + np.take(image, high, axis) * weight
    return image


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    width = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return width * height / (area(box) + area(others) - width * height)


def reference(network: ort.InferenceSession, frame: np.ndarray) -> tuple[np.ndarray, ...]:
    """NanoDet on ONNX Runtime alone, decoded and suppressed in plain numpy."""
    height, width = frame.shape[:2]
    image = (_resize(frame.astype(np.float64), INPUT_SIZE) - MEAN) / STD
    feeds = {network.get_inputs()[0].name: image.transpose(2, 0, 1)[None].astype(np.float32)}
    raw = dict(zip([o.name for o in network.get_outputs()], network.run(None, feeds), strict=True))
    boxes, scores, classes = [], [], []
    for stride in STRIDES:
        score_name, distribution_name = HEADS[stride]
        cells = INPUT_SIZE // stride
        y, x = np.mgrid[:cells, :cells].reshape(2, -1) + 0.5
        logits = raw[distribution_name][0].reshape(-1, 4, 11).astype(np.float64)
        odds = np.exp(logits - logits.max(axis=2, keepdims=True))
        sides = (odds * np.arange(11)).sum(axis=2) / odds.sum(axis=2) * stride
        corners = np.stack([x * stride - sides[:, 0], y * stride - sides[:, 1],
                            x * stride + sides[:, 2], y * stride + sides[:, 3]], axis=1)
        limits = np.array([width, height, width, height])
        boxes.append(np.clip(corners * limits / INPUT_SIZE, 0, limits))
        scores.append(raw[score_name][0].max(axis=1))
        classes.append(raw[score_name][0].argmax(axis=1))
    boxes, scores, classes = (np.concatenate(v) for v in (boxes, scores, classes))
    keep = []
    for label in np.unique(classes):
        order = np.flatnonzero((classes == label) & (scores > 0.35))
        order = order[np.argsort(-scores[order], kind="stable")]
        while order.size:
            keep.append(order[0])
            order = order[1:][_iou(boxes[order[0]], boxes[order[1:]]) <= 0.5]
    return boxes[keep], scores[keep], classes[keep]


def assert_same(outputs: dict[str, np.ndarray], expected: tuple[np.ndarray, ...]) -> None:
    """Same detections, in any order: classes exactly, boxes within 1e-3 px."""
    def canonical(boxes, scores, classes):
        order = np.lexsort((boxes[:, 0], classes))
        return boxes[order], scores[order], classes[order]

    boxes, scores, classes = canonical(outputs["boxes"], outputs["scores"], outputs["classes"])
    want_boxes, want_scores, want_classes = canonical(*expected)
    np.testing.assert_array_equal(classes, want_classes)
    np.testing.assert_allclose(boxes, want_boxes, rtol=0, atol=1e-3)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def network() -> ort.InferenceSession:
    return ort.InferenceSession(str(NANODET), providers=["CPUExecutionProvider"])


def test_pipeline_matches_numpy_decode_of_onnxruntime_outputs(network, frames, results):
    for frame, outputs in zip(frames, results, strict=True):
        assert_same(outputs, reference(network, frame))


def test_onnxruntime_refuses_the_custom_op_and_hetero_runs_it(model, frames):
    with pytest.raises(Exception, match="BoxDecode|com.hetero.vision"):
        ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    plan = hetero.plan(model)
    decode = next(n for n in model.nodes if n.op_type == "BoxDecode")
    assert plan.executor_of(decode).kernel_kind in ("numpy", "opencl")
    assert hetero.compile(model).run({"frame": frames[0]})["boxes"].size


def test_split_model_halves_compose_to_the_whole(network, model, frames):
    front, back = detection.split_detector_model(model.proto)
    assert {n.domain for n in front.graph.node} <= {"", "ai.onnx"}  # a plain ONNX server can run it
    heads = ort.InferenceSession(front.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = hetero.compile(back).run(dict(zip([o.name for o in front.graph.output],
                                                heads.run(None, {"frame": frames[0]}), strict=True)))
    assert_same(outputs, reference(network, frames[0]))


def test_demo_writes_video_and_contact_sheet(tmp_path: Path):
    from typer.testing import CliRunner

    from hetero.cli import app

    result = CliRunner().invoke(app, ["demo", "--frames", "8", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "pedestrians" in result.output and "frames/s" in result.output
    video = cv2.VideoCapture(str(tmp_path / "traffic.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 8
    sheet = cv2.imread(str(tmp_path / "traffic_contact_sheet.png"))
    assert sheet.shape == (2 * 288, 4 * 384, 3)  # 8 frames at half size, 4 per row


def test_the_video_is_h264_where_opencv_can_else_the_report_says_how_to_convert(tmp_path: Path):
    writer, codec = traffic.video_writer(tmp_path / "v.mp4", 10, (64, 48))
    writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    assert codec in ("avc1", "mp4v") and (tmp_path / "v.mp4").stat().st_size > 0
    report = traffic.TrafficReport([], 0.0, [], None, tmp_path / "v.mp4", tmp_path / "s.png", codec)
    assert report.playable == (codec == "avc1")
    video, copy = tmp_path / "v.mp4", tmp_path / "v-h264.mp4"
    assert report.convert == f"ffmpeg -i {video} -c:v libx264 -pix_fmt yuv420p {copy}"
