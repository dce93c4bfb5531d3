"""The libraries run natively, the way their own tools measure throughput, as benchmark peers.

Each baseline returns a blocking `call()` (or runs its own async loop) so the same load
generator measures it; the vendor APIs are used directly here, not through Hetero's executors.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import onnx

from hetero.bench.load import BenchResult
from hetero.executors import default_threads


def openvino_throughput(model: onnx.ModelProto, feeds: dict, duration: float,
                        precision: str = "f32") -> BenchResult:
    """OpenVINO with the THROUGHPUT hint and its optimal number of async infer requests, each
    restarted as soon as it finishes, as benchmark_app runs it.

    No Python callbacks: OpenVINO's stream threads would then need the GIL, and freeing the
    compiled model (which joins them, GIL held) can deadlock."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": precision})
    count = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    requests = [compiled.create_infer_request() for _ in range(count)]
    inputs = {compiled.input(name): value for name, value in feeds.items()}
    for request in requests:  # warm-up
        request.infer(inputs)
    latencies: list[float] = []
    start = time.perf_counter()
    for request in requests:
        request.start_async(inputs)
    in_flight = deque(requests)
    while in_flight:
        request = in_flight.popleft()
        request.wait()
        latencies.append(request.latency / 1e3)
        if time.perf_counter() - start < duration:
            request.start_async(inputs)
            in_flight.append(request)
    elapsed = time.perf_counter() - start
    streams = compiled.get_property("NUM_STREAMS")
    return BenchResult(f"openvino THROUGHPUT hint ({streams} streams, {count} requests)", len(latencies),
                       elapsed, latencies, precision="fp32" if precision == "f32" else precision)


def onnxruntime_sessions(model: onnx.ModelProto) -> tuple[str, Callable[[dict], object], int]:
    """One ONNX Runtime session per core, one thread each: (name, call(feeds), concurrency)."""
    import onnxruntime as ort

    count = default_threads()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    sessions = [ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for _ in range(count)]
    free = list(sessions)
    lock = threading.Lock()

    def call(feeds: dict) -> object:
        with lock:
            session = free.pop()
        try:
            return session.run(None, feeds)
        finally:
            with lock:
                free.append(session)

    return f"onnxruntime ({count} sessions x 1 thread)", call, count


def onnxruntime_latency(model: onnx.ModelProto) -> Callable[[dict], object]:
    """One ONNX Runtime session using every core: the native single-request path."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = default_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def openvino_latency(model: onnx.ModelProto, precision: str = "f32") -> Callable[[dict], object]:
    """OpenVINO with the LATENCY hint: the native single-request path."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    return lambda feeds: request.infer(feeds)
