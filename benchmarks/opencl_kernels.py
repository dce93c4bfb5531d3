"""OpenCL GEMM and Conv GFLOP/s next to numpy/BLAS on the same shapes, in the same run.

    python benchmarks/opencl_kernels.py [--device opencl:0] [--repeats 5] [--seconds 1]

Ours is one compiled single-node partition called on device-resident inputs (packing, im2col
and the kernels included, host transfers not); numpy is `np.matmul` and the numpy executor's
convolution (strided im2col + BLAS, shifted multiply-adds for depthwise) on host arrays. Each
side takes its best of alternating runs, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hetero.executors import resolve
from hetero.executors.array_kernels import conv

# (label, input shape, weight shape, strides, pads, group)
CONVS = [
    ("resnet50 3x3 64->64 56x56", (1, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1),
    ("resnet50 1x1 256->64 56x56", (1, 256, 56, 56), (64, 256, 1, 1), 1, 0, 1),
    ("resnet50 1x1 64->256 56x56", (1, 64, 56, 56), (256, 64, 1, 1), 1, 0, 1),
    ("resnet50 3x3 256->256 14x14", (1, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1),
    ("nanodet 3x3 s2 3->32 416", (1, 3, 418, 418), (32, 3, 3, 3), 2, 0, 1),
    ("nanodet 3x3 32->32 104x104", (1, 32, 106, 106), (32, 32, 3, 3), 1, 0, 1),
    ("nanodet 3x3 128->128 52x52", (1, 128, 54, 54), (128, 128, 3, 3), 1, 0, 1),
    ("nanodet 1x1 128->124 52x52", (1, 128, 52, 52), (124, 128, 1, 1), 1, 0, 1),
    ("depthwise 3x3 128ch 56x56", (1, 128, 56, 56), (128, 1, 3, 3), 1, 1, 128),
]


def _model(node: onnx.NodeProto, inputs: dict[str, tuple], output: tuple, weights: dict[str, np.ndarray]):
    graph = helper.make_graph(
        [node], "bench", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, output)],
        initializer=[numpy_helper.from_array(v, n) for n, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _best(ours: Callable[[], object], theirs: Callable[[], object], repeats: int,
          seconds: float) -> tuple[float, float]:
    """Best times of alternating blocks of `repeats` runs each, until `seconds` have passed.

    The best run is the one least disturbed by other processes on the same cores. Blocks, with a
    pause between them, keep each side's worker threads (BLAS, PoCL) from spinning on the cores
    while the other side runs.
    """
    times: tuple[list[float], list[float]] = ([], [])
    deadline = time.perf_counter() + seconds
    while not times[0] or time.perf_counter() < deadline:
        for fn, spent in ((ours, times[0]), (theirs, times[1])):
            fn()  # warm up: kernel builds, first-touch pages, BLAS threads
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                spent.append(time.perf_counter() - start)
            time.sleep(0.05)
    return min(times[0]), min(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="", help="OpenCL device, e.g. opencl:1 (default: the first)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per shape and side, at least")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per shape, at least")
    args = parser.parse_args()
    executor = resolve([f"opencl@{args.device}" if args.device else "opencl"])[0]
    print(f"{executor.info().device_name}; numpy {np.__version__}")
    rng = np.random.default_rng(0)
    rows = []

    def measure(label: str, flops: float, model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                reference: Callable[[], object]) -> None:
        compiled = executor.compile(model)
        on_device = [executor.to_device(feeds[n]) for n in compiled.input_names]
        ours, theirs = _best(lambda: compiled(on_device), reference, args.repeats, args.seconds)
        rows.append((label, flops / ours / 1e9, flops / theirs / 1e9))
        print(f"{label:<32} {rows[-1][1]:>9.1f} {rows[-1][2]:>11.1f} {rows[-1][1] / rows[-1][2]:>7.2f}",
              flush=True)

    print(f"{'shape':<32} {'ours GF/s':>9} {'numpy GF/s':>11} {'ratio':>7}")
    for n in (256, 512, 1024):
        a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        measure(f"gemm {n}x{n}x{n}", 2.0 * n**3, _model(node, {"a": a.shape, "b": b.shape}, (n, n), {}),
                {"a": a, "b": b}, lambda a=a, b=b: a @ b)
    for label, x_shape, w_shape, stride, pad, group in CONVS:
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        out = [(s + 2 * pad - k) // stride + 1 for s, k in zip(x_shape[2:], w_shape[2:], strict=True)]
        node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[stride] * 2, pads=[pad] * 4, group=group)
        flops = 2.0 * x_shape[0] * w_shape[0] * math.prod(out) * math.prod(w_shape[1:])
        model = _model(node, {"x": x_shape}, (x_shape[0], w_shape[0], *out), {"w": w})
        measure(label, flops, model, {"x": x},
                lambda x=x, w=w, stride=stride, pad=pad, group=group: conv(
                    x, w, strides=[stride] * 2, pads=[pad] * 4, group=group))
    ratios = [ours / theirs for _, ours, theirs in rows]
    print(f"geometric mean ratio {math.exp(np.mean(np.log(ratios))):.2f}; "
          f"{executor.name} built {executor.compiles} programs")


if __name__ == "__main__":
    main()
