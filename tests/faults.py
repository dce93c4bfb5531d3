"""A fault-injecting executor for tests: on command it raises, hangs, returns NaN or dies mid-transfer.

    device = FaultyExecutor(80)
    device.inject("hang")             # the next partition call hangs until device.release()
    device.inject("raise", times=3)   # the next three calls raise
    device.inject("transfer")         # the next copy to or from the device dies half-way
    device.chaos(seed=1, rate=0.3)    # from now on, a random fault on 30% of calls and copies

A hung call returns normally once released, or after `hang_s` seconds.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from conftest import DeviceArray, StubExecutor

from hetero.executors import CompiledPartition

CALL_FAULTS = ("raise", "hang", "nan")
TRANSFER_FAULTS = ("transfer", "transfer-hang")


class FaultyExecutor(StubExecutor):
    """A stub accelerator (numpy semantics, its own memory space) that misbehaves on command."""

    def __init__(self, index: int, ops: set[str] | None = None, *, seconds_per_call: float = 0.0,
                 hang_s: float = 60.0):
        super().__init__(index, ops, seconds_per_call=seconds_per_call)
        self.hang_s = hang_s
        self.hanging = 0  # calls hung right now
        self.faults_done: list[str] = []
        self._calls: deque[str] = deque()
        self._transfers: deque[str] = deque()
        self._chaos: tuple[random.Random, float] | None = None
        self._released = threading.Event()
        self._lock = threading.Lock()

    def inject(self, fault: str, times: int = 1) -> None:
        """Make the next `times` partition calls ("raise", "hang", "nan") or copies ("transfer",
        "transfer-hang") fail that way."""
        if fault not in CALL_FAULTS + TRANSFER_FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        with self._lock:
            (self._calls if fault in CALL_FAULTS else self._transfers).extend([fault] * times)

    def chaos(self, seed: int, rate: float) -> None:
        """From now on, each call or copy fails with probability `rate`, in a random way."""
        with self._lock:
            self._chaos = random.Random(seed), rate

    def release(self) -> None:
        """Let every hung call (and every later hang) return at once."""
        self._released.set()

    def _next(self, queue: deque[str], kinds: Sequence[str]) -> str | None:
        with self._lock:
            if queue:
                fault = queue.popleft()
            elif self._chaos is not None and self._chaos[0].random() < self._chaos[1]:
                fault = self._chaos[0].choice(kinds)
            else:
                return None
            self.faults_done.append(fault)
            return fault

    def _hang(self) -> None:
        with self._lock:
            self.hanging += 1
        self._released.wait(self.hang_s)
        with self._lock:
            self.hanging -= 1

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        return _FaultyPartition(super().compile(part), self)

    def to_device(self, array: np.ndarray) -> DeviceArray:
        self._transfer_fault()
        return super().to_device(array)

    def to_host(self, value: DeviceArray) -> np.ndarray:
        self._transfer_fault()
        return super().to_host(value)

    def _transfer_fault(self) -> None:
        fault = self._next(self._transfers, TRANSFER_FAULTS)
        if fault == "transfer":
            raise ConnectionError(f"{self.name}: link died mid-transfer (injected)")
        if fault == "transfer-hang":
            self._hang()


class _FaultyPartition(CompiledPartition):
    def __init__(self, inner: CompiledPartition, device: FaultyExecutor):
        self.inner, self.device = inner, device
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        fault = self.device._next(self.device._calls, CALL_FAULTS)
        if fault == "raise":
            raise RuntimeError(f"{self.device.name}: kernel crashed (injected)")
        if fault == "hang":
            self.device._hang()
        outputs = self.inner(inputs)
        if fault == "nan":
            outputs = [DeviceArray(np.full_like(o.array, np.nan), o.device) if o.array.dtype.kind == "f"
                       else o for o in outputs]
        return outputs
