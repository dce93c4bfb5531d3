"""Object detection as one ONNX model: a camera frame in, labelled boxes out.

The graph chains standard ONNX pre-processing, the NanoDet-g network, a custom `BoxDecode` op and
the standard NonMaxSuppression. No vendor library knows `com.hetero.vision::BoxDecode`: importing
this module registers its kernel, and Hetero places the rest of the graph on the libraries present,
so the whole pipeline is one file that one `hetero.compile` runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.compose
from onnx import TensorProto, helper, numpy_helper

import hetero

NANODET = Path(__file__).resolve().parents[2] / "models" / "nanodet-g-coco.onnx"
DOMAIN = "com.hetero.vision"
INPUT_SIZE = 416
STRIDES = (8, 16, 32)
BINS = 11  # distances per box side, 0 to 10 strides
MEAN = (103.53, 116.28, 123.675)  # BGR, as NanoDet was trained
STD = (57.375, 57.12, 58.395)
# NanoDet-g's outputs per stride: (class scores [1, N, 80], box-side distributions [1, N, 44]).
HEADS = {8: ("Identity:0", "Identity_3:0"), 16: ("Identity_1:0", "Identity_4:0"),
         32: ("Identity_2:0", "Identity_5:0")}

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


@cache
def anchors(strides: tuple[int, ...], input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres [N, 2] (x, y) and strides [N, 1] of every anchor point, grids row-major."""
    centres, sizes = [], []
    for stride in strides:
        cells = input_size // stride
        y, x = np.divmod(np.arange(cells * cells), cells)
        centres.append((np.stack([x, y], axis=1) + 0.5) * stride)
        sizes.append(np.full((cells * cells, 1), stride))
    return np.concatenate(centres).astype(np.float32), np.concatenate(sizes).astype(np.float32)


def box_decode(scores: np.ndarray, distributions: np.ndarray, *, strides: Sequence[int],
               input_size: int, frame_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The numpy kernel of BoxDecode: NanoDet's anchor outputs -> boxes in frame pixels.

    scores [1, N, C] (sigmoid) and distributions [1, N, 4 * bins] (per side, logits over `bins`
    distances in strides) give boxes [N, 4] (x1, y1, x2, y2, clipped to the frame of
    `frame_size` = (width, height)), each anchor's best score [N] and its class [N] (int64).
    """
    centres, stride = anchors(tuple(strides), int(input_size))
    count = len(centres)
    if scores.shape[1] != count or distributions.shape[1] != count:
        raise ValueError(f"strides {tuple(strides)} at input size {input_size} give {count} anchors; "
                         f"got scores {scores.shape} and distributions {distributions.shape}")
    logits = distributions.reshape(count, 4, -1)
    weights = np.exp(logits - logits.max(axis=2, keepdims=True))
    sides = weights @ np.arange(logits.shape[2], dtype=np.float32) / weights.sum(axis=2) * stride
    corners = np.concatenate([centres - sides[:, :2], centres + sides[:, 2:]], axis=1)
    width, height = frame_size
    limits = np.array([width, height, width, height], np.float32)
    boxes = np.clip(corners * (limits / input_size), 0, limits).astype(np.float32)
    per_class = scores.reshape(count, -1)
    classes = per_class.argmax(axis=1)
    return boxes, per_class[np.arange(count), classes].astype(np.float32), classes.astype(np.int64)


def infer_box_decode(dtypes: Sequence, shapes: Sequence, attributes: Mapping) -> list:
    """BoxDecode's output types and shapes, for planning (ONNX shape inference knows no custom op)."""
    count = shapes[0][1] if shapes[0] else None
    return [(np.dtype(np.float32), (count, 4)), (np.dtype(np.float32), (count,)),
            (np.dtype(np.int64), (count,))]


BOX_DECODE_CL = """
// One work-item per anchor: the same decode as `box_decode`, anchors found from the strides.
__kernel void box_decode(__global const float *scores, __global const float *distributions,
                         __constant const int *strides, const int levels, const int input_size,
                         const int class_count, const int bins, const float width, const float height,
                         __global float *boxes, __global float *best, __global long *classes) {
    const int n = get_global_id(0);
    int first = 0, stride = 0, cells = 0;
    for (int level = 0; level < levels; ++level) {
        stride = strides[level];
        cells = input_size / stride;
        if (n < first + cells * cells) break;
        first += cells * cells;
    }
    const int cell = n - first;
    const float centre[2] = {(cell % cells + 0.5f) * stride, (cell / cells + 0.5f) * stride};
    const float limit[2] = {width, height};
    for (int side = 0; side < 4; ++side) {
        __global const float *logits = distributions + ((long)n * 4 + side) * bins;
        float top = logits[0], total = 0.0f, expected = 0.0f;
        for (int b = 1; b < bins; ++b) top = fmax(top, logits[b]);
        for (int b = 0; b < bins; ++b) {
            const float weight = exp(logits[b] - top);
            total += weight;
            expected += weight * b;
        }
        const float distance = expected / total * stride;
        const float corner = side < 2 ? centre[side % 2] - distance : centre[side % 2] + distance;
        boxes[4 * n + side] = clamp(corner * (limit[side % 2] / input_size), 0.0f, limit[side % 2]);
    }
    __global const float *row = scores + (long)n * class_count;
    int arg = 0;
    for (int c = 1; c < class_count; ++c) if (row[c] > row[arg]) arg = c;
    best[n] = row[arg];
    classes[n] = arg;
}
"""


def launch_box_decode(context: Any, queue: Any, program: Any, inputs: Sequence[Any], *,
                      strides: Sequence[int], input_size: int, frame_size: Sequence[int]) -> tuple[Any, ...]:
    """The OpenCL launcher of BoxDecode (the `fn=` convention of `hetero.executors.opencl_executor`)."""
    import pyopencl as cl
    import pyopencl.array as cla

    scores, distributions = inputs
    count, class_count = scores.shape[1], scores.shape[2]
    if count != len(anchors(tuple(strides), int(input_size))[0]) or distributions.shape[1] != count:
        raise ValueError(f"strides {tuple(strides)} at input size {input_size} do not give the "
                         f"{count} anchors of scores {scores.shape} and distributions {distributions.shape}")
    outputs = (cla.empty(queue, (count, 4), np.float32), cla.empty(queue, (count,), np.float32),
               cla.empty(queue, (count,), np.int64))
    levels = cla.to_device(queue, np.array(strides, np.int32))
    width, height = frame_size
    # A kernel object per call: launches from several threads never share argument state.
    cl.Kernel(program, "box_decode")(
        queue, (count,), None, scores.data, distributions.data, levels.data, np.int32(len(strides)),
        np.int32(input_size), np.int32(class_count), np.int32(distributions.shape[2] // 4),
        np.float32(width), np.float32(height), *(output.data for output in outputs))
    return outputs


hetero.kernel(DOMAIN, "BoxDecode", executor="numpy", infer=infer_box_decode)(box_decode)
hetero.kernel(DOMAIN, "BoxDecode", executor="opencl", source=BOX_DECODE_CL, fn=launch_box_decode,
              infer=infer_box_decode)


Stage = tuple[list[onnx.NodeProto], list[onnx.TensorProto]]


def _constants(**values: np.ndarray) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(value, name) for name, value in values.items()]


def _named(stage: str, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes named `stage/first output`, so plans read well and the stages can be told apart."""
    for node in nodes:
        node.name = f"{stage}/{node.output[0]}"
    return nodes


def _preprocess(image: str) -> Stage:
    """uint8 BGR `frame` [H, W, 3] -> NanoDet's normalised `image` [1, 3, 416, 416]."""
    nodes = [
        helper.make_node("Cast", ["frame"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Resize", ["pixels", "", "", "input_size"], ["resized"], mode="linear"),
        helper.make_node("Sub", ["resized", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["normalised"]),
        helper.make_node("Transpose", ["normalised"], ["planar"], perm=[2, 0, 1]),
        helper.make_node("Unsqueeze", ["planar", "batch_axis"], [image]),
    ]
    return _named("preprocess", nodes), _constants(
        input_size=np.array([INPUT_SIZE, INPUT_SIZE, 3]), mean=np.float32(MEAN), std=np.float32(STD),
        batch_axis=np.array([0]))


def _postprocess(height: int, width: int, heads: Mapping[int, tuple[str, str]], score_threshold: float,
                 iou_threshold: float, max_per_class: int) -> Stage:
    """NanoDet's head outputs -> `boxes` [K, 4], `scores` [K], `classes` [K] after per-class NMS."""
    scores, distributions = zip(*(heads[stride] for stride in STRIDES), strict=True)
    nodes = [
        helper.make_node("Concat", scores, ["class_scores"], axis=1),
        helper.make_node("Concat", distributions, ["distributions"], axis=1),
        helper.make_node("BoxDecode", ["class_scores", "distributions"],
                         ["anchor_boxes", "anchor_scores", "anchor_classes"], domain=DOMAIN,
                         strides=list(STRIDES), input_size=INPUT_SIZE, frame_size=[width, height]),
        # NMS wants scores per class [1, C, N]: each anchor scores only for its best class.
        helper.make_node("OneHot", ["anchor_classes", "class_count", "off_on"], ["class_mask"], axis=0),
        helper.make_node("Mul", ["class_mask", "anchor_scores"], ["masked_scores"]),
        helper.make_node("Unsqueeze", ["masked_scores", "nms_batch_axis"], ["nms_scores"]),
        helper.make_node("Unsqueeze", ["anchor_boxes", "nms_batch_axis"], ["nms_boxes"]),
        helper.make_node("NonMaxSuppression", ["nms_boxes", "nms_scores", "max_per_class", "iou_threshold",
                                               "score_threshold"], ["selected"]),
        helper.make_node("Gather", ["selected", "box_column"], ["kept"], axis=1),
        helper.make_node("Gather", ["anchor_boxes", "kept"], ["boxes"], axis=0),
        helper.make_node("Gather", ["anchor_scores", "kept"], ["scores"], axis=0),
        helper.make_node("Gather", ["anchor_classes", "kept"], ["classes"], axis=0),
    ]
    return _named("decode", nodes), _constants(
        class_count=np.array(len(COCO_CLASSES)), off_on=np.float32([0, 1]), nms_batch_axis=np.array([0]),
        max_per_class=np.array([max_per_class]), iou_threshold=np.float32([iou_threshold]),
        score_threshold=np.float32([score_threshold]), box_column=np.array(2))


def _head_infos(heads: Mapping[int, tuple[str, str]]) -> list[onnx.ValueInfoProto]:
    """The head outputs' shapes, which the converted network leaves unknown: planning and
    `split_detector_model` need them."""
    return [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, (INPUT_SIZE // stride) ** 2, size])
            for stride, names in heads.items()
            for name, size in zip(names, (len(COCO_CLASSES), 4 * BINS), strict=True)]


def detector_model(height: int, width: int, *, score_threshold: float = 0.35, iou_threshold: float = 0.5,
                   max_per_class: int = 100, nanodet: Path = NANODET) -> onnx.ModelProto:
    """The whole pipeline for frames of one size, as one ONNX model.

    Input `frame`: uint8 BGR [H, W, 3]. Outputs `boxes` [K, 4] (x1, y1, x2, y2 in frame pixels),
    `scores` [K] and `classes` [K] (int64 index into COCO_CLASSES), grouped by class.
    """
    network = onnx.compose.add_prefix(onnx.load(str(nanodet)), "nanodet/")
    pre_nodes, pre_constants = _preprocess(network.graph.input[0].name)
    heads = {stride: tuple(f"nanodet/{name}" for name in names) for stride, names in HEADS.items()}
    post_nodes, post_constants = _postprocess(height, width, heads, score_threshold, iou_threshold,
                                              max_per_class)
    graph = helper.make_graph(
        [*pre_nodes, *network.graph.node, *post_nodes], f"nanodet-g pipeline {width}x{height}",
        [helper.make_tensor_value_info("frame", TensorProto.UINT8, [height, width, 3])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["detections", 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["detections"]),
         helper.make_tensor_value_info("classes", TensorProto.INT64, ["detections"])],
        [*pre_constants, *network.graph.initializer, *post_constants], value_info=_head_infos(heads))
    model = helper.make_model(graph, opset_imports=[*network.opset_import, helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = network.ir_version
    return model


def split_detector_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Cut a `detector_model` behind the network: `frame` -> the six head outputs, in standard ops
    only (so any ONNX server runs it), and the head outputs -> detections (BoxDecode and NMS)."""
    loaded = hetero.load(model)
    decoder = [node for node in loaded.nodes if node.name.startswith("decode/")]
    network = [node for node in loaded.nodes if not node.name.startswith("decode/")]
    return (loaded.extract(network, loaded.proto.graph.name + " network"),
            loaded.extract(decoder, loaded.proto.graph.name + " decoder"))


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in frame pixels


def detections(outputs: Mapping[str, np.ndarray]) -> list[Detection]:
    """The pipeline's outputs as labelled detections, best score first."""
    found = [Detection(COCO_CLASSES[int(c)], float(s), tuple(float(v) for v in b))
             for b, s, c in zip(outputs["boxes"], outputs["scores"], outputs["classes"], strict=True)]
    return sorted(found, key=lambda d: -d.score)
