"""Shared test helpers: a stub executor with its own memory space and settable behaviour."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest

from hetero.errors import CompileError
from hetero.executors import CompiledPartition, Device, Executor, ExecutorInfo, host_all_finite
from hetero.executors.numpy_executor import NumpyExecutor
from hetero.graph import Model, Node


class DeviceArray:
    """An array 'on' a stub device: only the stub executor can read it."""

    def __init__(self, array: np.ndarray, device: str):
        self.array = array
        self.device = device
        self.nbytes = array.nbytes


class _StubPartition(CompiledPartition):
    def __init__(self, inner: CompiledPartition, stub: StubExecutor, ops: list[str]):
        self.inner, self.stub, self.ops = inner, stub, ops
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        self.stub.calls += 1
        for value in inputs:
            assert isinstance(value, DeviceArray) and value.device == str(self.stub.device), \
                "a value reached the stub without a transfer"
        if any(op in self.stub.run_fail_ops for op in self.ops):
            raise RuntimeError(f"stub kernel crashed in node '{self.stub.last_node}'")
        if self.stub.seconds_per_call:
            time.sleep(self.stub.seconds_per_call)
        outputs = self.inner([v.array for v in inputs])
        return [DeviceArray(np.asarray(o), str(self.stub.device)) for o in outputs]


class StubExecutor(Executor):
    """A pretend accelerator: numpy semantics, its own memory space, configurable failures and speed."""

    library = "stub"
    extra = ""
    accelerator = True

    def __init__(self, index: int = 0, ops: set[str] | None = None, *, compile_fail_ops: Sequence[str] = (),
                 run_fail_ops: Sequence[str] = (), seconds_per_call: float = 0.0,
                 seconds_per_transfer: float = 0.0):
        super().__init__(Device("stub", index))
        self.ops = ops
        self.compile_fail_ops = set(compile_fail_ops)
        self.run_fail_ops = set(run_fail_ops)
        self.seconds_per_call = seconds_per_call
        self.seconds_per_transfer = seconds_per_transfer
        self.calls = 0
        self.compiles = 0
        self.last_node = ""
        self._numpy = NumpyExecutor()

    @classmethod
    def discover(cls) -> list[Executor]:
        return [cls()]

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(self.name, "stub", "0", str(self.device), "stub device", 1, "fp32")

    def supports_op(self, node: Node, model: Model) -> bool:
        return (self.ops is None or node.op_type in self.ops) and self._numpy.supports_op(node, model)

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        self.compiles += 1
        bad = [n.name for n in part.graph.node if n.op_type in self.compile_fail_ops]
        if bad:
            raise CompileError(f"stub cannot compile {bad}", tuple(bad))
        runs = [n for n in part.graph.node if n.op_type in self.run_fail_ops]
        self.last_node = runs[0].name if runs else ""
        return _StubPartition(self._numpy.compile(part), self, [n.op_type for n in part.graph.node])

    def to_device(self, array: np.ndarray) -> DeviceArray:
        time.sleep(self.seconds_per_transfer)
        return DeviceArray(np.array(array), str(self.device))

    def to_host(self, value: DeviceArray) -> np.ndarray:
        return value.array

    def all_finite(self, value: Any) -> Any:
        return host_all_finite(value.array) if isinstance(value, DeviceArray) else super().all_finite(value)


@pytest.fixture
def stub() -> StubExecutor:
    return StubExecutor()
