"""`hetero serve` in a process of its own, for benchmarks and tests: a model repository, free ports,
start and stop, and the server's memory as Linux's /proc reports it."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

MiB = 1 << 20


def free_port() -> int:
    """A TCP port free on loopback now (another process may take it before it is bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def identity_repository(root: Path, name: str = "identity") -> Path:
    """Add model `name` to the repository at `root` and return `root`: Identity, FP32 input `x` of
    shape [n] to output `y`, on one ONNX Runtime CPU stream."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    (root / name / "1").mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              root / name / "1" / "model.onnx")
    (root / name / "config.yaml").write_text("executors: [onnxruntime]\ncpu_streams: 1\n")
    return root


def json_infer_body(nbytes: int) -> bytes:
    """A KServe v2 JSON infer request of about `nbytes` for `identity_repository`'s model: FP32 `x`
    written out as ~nbytes/13 numbers ("0.123456789, "), `y` asked for as binary data (a small
    answer)."""
    count = max(1, nbytes // 13)
    return (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [%d], "data": [' % count
            + b"0.123456789, " * (count - 1) + b'1]}], "outputs": [{"name": "y", '
            b'"parameters": {"binary_data": true}}]}')


@dataclass
class ServerProcess:
    process: subprocess.Popen
    http_port: int
    grpc_port: int

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def serve(repository: Path, *options: str, timeout_s: float = 300.0) -> Iterator[ServerProcess]:
    """`hetero serve REPOSITORY OPTIONS...` on free loopback ports, yielded once /v2/health/ready says
    so; on exit stopped with SIGTERM (killed if it has not stopped within a minute).

    Raises RuntimeError when the server exits or is not ready within `timeout_s`."""
    http_port, grpc_port = free_port(), free_port()
    process = subprocess.Popen([sys.executable, "-m", "hetero.cli", "serve", str(repository),
                                "--port", str(http_port), "--grpc-port", str(grpc_port),
                                "--log-level", "warning", *options])
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever *_proxy says
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with direct.open(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=5):
                    break
            except OSError:  # not listening yet (URLError) or not ready (HTTPError 503)
                if process.poll() is not None:
                    raise RuntimeError(f"hetero serve exited with status {process.returncode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"hetero serve was not ready within {timeout_s:g} s") from None
            time.sleep(0.2)
        yield ServerProcess(process, http_port, grpc_port)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of process `pid` in KiB from /proc/PID/status: VmRSS (resident now) or VmHWM
    (the resident peak)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


def reset_peak(pid: int) -> None:
    """Restart process `pid`'s resident peak (VmHWM) from its resident size now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
