"""`sim@sim:N`: simulated accelerator cards, so the code paths of a multi-card host run in CI.

A devices file (`read_devices`) declares each card: the host library whose kernels compute its
values (`like`), its speed relative to that library on this host, a call overhead, its PCIe link
to host memory (bandwidth, and latency per copy, each direction) and direct links to other cards.

A card has a memory space of its own: its tensors are `SimArray`s, which host code cannot read
without a transfer. Its work is asynchronous, as a GPU's is: a partition call computes the values
with the host library, then books the card's time line (one partition at a time, after its inputs
have arrived) and returns arrays that become readable once the booked time has passed; `to_host`,
peer copies and `synchronize` wait for that. Copies are booked on their link's time line the same
way. So the runtime sees the declared times, as long as the host library computes the values in
less time than the card is declared to take. When it does not (a card declared faster than the
host library, or a loaded host), the call ends when the host is done and the card counts an
overrun, which `SimExecutor.report()` states: such figures are the host's, not the card's.

The file may also declare the host CPU (`host:`), simulated as `sim@cpu`: the library paced to a
declared speed, in host memory, taking turns with the other host libraries. A card 4x faster than
such a host can be paced honestly on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from hetero.cache import JsonStore
from hetero.errors import ExecutorUnavailableError, PlanError, RunError
from hetero.executors.base import CompiledPartition, Device, Executor, ExecutorInfo, host_all_finite
from hetero.graph import Model, Node

#: Where `hetero ... --simulate FILE` puts the devices file, so discovery finds the cards.
ENVIRONMENT = "HETERO_SIMULATE"
HOST_SPACE = "cpu"
COPY_SLACK_S = 1e-4  # Python's own cost of a copy call, not counted against the declared link
REFERENCE_RUNS = 4  # runs of the host library, beside the call's own, whose fastest is the reference
_references = JsonStore("simulated")
_measuring = threading.Lock()

_FIELDS = {"executor", "like", "speed", "peak_gflops", "bandwidth_gbs", "overhead_us", "link_gbs", "link_us",
           "peers", "peer_gbs", "peer_us", "count"}


@dataclass(frozen=True)
class DeviceSpec:
    """One entry of a devices file, as written there (see README, "Simulated and described devices").

    `speed` is relative to the `like` library on this host (0.5: half as fast); the roofline
    figures (`peak_gflops`, `bandwidth_gbs`) serve sketches of hardware not at hand. Links are in
    GB/s and microseconds per copy; `peers` names the cards (`sim:N`) this one has direct links to,
    or is "all" (the other cards of this entry).
    """

    where: str
    executor: str | None = None
    like: str | None = None
    speed: float | None = None
    peak_gflops: float | None = None
    bandwidth_gbs: float | None = None
    overhead_us: float = 10.0
    link_gbs: float = 12.0
    link_us: float = 10.0
    peers: tuple[str, ...] | str = ()
    peer_gbs: float = 25.0
    peer_us: float = 5.0
    count: int = 1

    @property
    def simulable(self) -> bool:
        return self.like is not None and self.speed is not None


@dataclass(frozen=True)
class DevicesFile:
    """A parsed devices file: an optional simulated host CPU and the cards."""

    source: str
    host: DeviceSpec | None
    devices: tuple[DeviceSpec, ...]

    def cards(self) -> list[tuple[Device, DeviceSpec]]:
        """Every card as simulated, numbered `sim:0`, `sim:1`, ... in file order (`count` expanded)."""
        found = []
        for spec in self.devices:
            found += [(Device("sim", len(found) + k), spec) for k in range(spec.count)]
        return found


def read_devices(source: str | Path | Mapping[str, Any]) -> DevicesFile:
    """Parse a devices file (YAML or JSON), or the same structure as a dict; `PlanError` names the
    file, entry and field at fault."""
    if isinstance(source, Mapping):
        data, label = source, "devices mapping"
    else:
        path = Path(source)
        label = f"devices file {str(path)!r}"
        try:
            text = path.read_text()
        except OSError as exc:
            raise PlanError(f"{label} cannot be read: {exc}") from exc
        data = json.loads(text) if path.suffix == ".json" else _yaml(text, label)
    if not isinstance(data, Mapping) or not isinstance(data.get("devices", []), list):
        raise PlanError(f"{label}: expected a mapping with a 'devices' list (and optionally 'host')")
    unknown = set(data) - {"devices", "host"}
    if unknown:
        raise PlanError(f"{label}: unknown key {sorted(unknown)[0]!r}; expected 'devices' and 'host'")
    host = _spec(data["host"], f"{label}, host") if data.get("host") is not None else None
    if host is not None and not host.simulable:
        raise PlanError(f"{label}, host: needs 'like' and 'speed'")
    devices = tuple(_spec(entry, f"{label}, devices[{i}]") for i, entry in enumerate(data.get("devices", [])))
    if not devices and host is None:
        raise PlanError(f"{label}: declares no devices")
    return DevicesFile(label, host, devices)


def _spec(entry: Any, where: str) -> DeviceSpec:
    if not isinstance(entry, Mapping):
        raise PlanError(f"{where}: expected a mapping of fields, got {type(entry).__name__}")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise PlanError(f"{where}: unknown field {sorted(unknown)[0]!r}; fields are "
                        f"{', '.join(sorted(_FIELDS))}")
    values: dict[str, Any] = {}
    for name, value in entry.items():
        if name in ("executor", "like"):
            values[name] = str(value)
        elif name == "peers":
            values[name] = value if value == "all" else tuple(str(p) for p in (value or ()))
        elif name == "count":
            if not isinstance(value, int) or value < 1:
                raise PlanError(f"{where}: 'count' must be a positive integer, got {value!r}")
            values[name] = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise PlanError(f"{where}: {name!r} must be a number, got {value!r}") from None
            if number < 0 or (number == 0 and name in ("speed", "peak_gflops", "bandwidth_gbs", "link_gbs",
                                                        "peer_gbs")):
                raise PlanError(f"{where}: {name!r} must be positive, got {value!r}")
            values[name] = number
    spec = DeviceSpec(where, **values)
    if not spec.simulable and (spec.peak_gflops is None or spec.bandwidth_gbs is None):
        raise PlanError(f"{where}: needs 'like' and 'speed' (simulated or sketched), or 'peak_gflops' and "
                        "'bandwidth_gbs' (sketched)")
    return spec


def _yaml(text: str, label: str) -> Any:
    try:
        import yaml
    except ImportError as exc:
        raise PlanError(f"{label} is YAML: pip install pyyaml, or write it as .json") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlanError(f"{label} is not valid YAML: {exc}") from exc


def simulate(source: str | Path | Mapping[str, Any]) -> list[SimExecutor]:
    """Executors for what a devices file declares: `sim@sim:N` per card, then `sim@cpu` for a
    declared host. Each call builds fresh devices (empty time lines and counters)."""
    devices = read_devices(source)
    cards: dict[Device, Card] = {}
    executors: list[SimExecutor] = []
    for device, spec in devices.cards():
        if not spec.simulable:
            raise PlanError(f"{spec.where}: needs 'like' and 'speed' to be simulated (roofline figures "
                            "alone only sketch a plan: hetero plan --describe)")
        cards[device] = Card(device, spec)
        executors.append(SimExecutor(device, spec, cards[device]))
    for device, card in cards.items():
        spec = card.spec
        siblings = [str(d) for d, c in cards.items() if c.spec is spec and d != device]
        names = siblings if spec.peers == "all" else spec.peers
        for name in names:
            try:
                peer = Device.parse(name)
            except ValueError as exc:
                raise PlanError(f"{spec.where}: peers: {exc}") from exc
            if peer not in cards or peer == device:
                raise PlanError(f"{spec.where}: peer {name!r} is not another simulated card "
                                f"({', '.join(map(str, cards))})")
            card.connect(cards[peer], spec.peer_gbs, spec.peer_us)
    if devices.host is not None:
        executors.append(SimExecutor(Device("cpu"), devices.host))
    return executors


def _wait_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


class Line:
    """A time line that does one thing at a time: a card's compute, or one direction of a link.

    `book` reserves the next slot of `seconds` starting no earlier than `not_before`; a slot
    cannot end before `finished` (when the host actually had the values), and the excess is
    returned as the overrun. It counts what it did: bookings, bytes, booked seconds.
    """

    def __init__(self, name: str, gbs: float = 0.0, latency_s: float = 0.0):
        self.name = name
        self.gbs = gbs
        self.latency_s = latency_s
        self.free_at = 0.0
        self.count = 0
        self.nbytes = 0
        self.busy_s = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{self.name}: {self.count} x, {self.nbytes} B, {self.busy_s * 1e3:.1f} ms>"

    def book(self, seconds: float, not_before: float, finished: float = 0.0, nbytes: int = 0
             ) -> tuple[float, float]:
        """(end, overrun seconds) of the next slot."""
        with self._lock:
            start = max(not_before, self.free_at)
            end = max(start + seconds, finished)
            self.free_at = end
            self.count += 1
            self.nbytes += nbytes
            self.busy_s += end - start
            return end, max(0.0, finished - start - seconds)

    def copy(self, nbytes: int, not_before: float, finished: float = 0.0) -> tuple[float, float]:
        """Book one copy of `nbytes` on this link: (when it arrives, overrun seconds)."""
        return self.book(self.latency_s + nbytes / (self.gbs * 1e9), not_before, finished, nbytes)


@dataclass
class Overruns:
    """Calls (or copies) where the host took longer than the declared device (or link) would have."""

    calls: int = 0
    count: int = 0
    worst_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, overrun_s: float) -> None:
        with self._lock:
            self.calls += 1
            if overrun_s > 0:
                self.count += 1
                self.worst_s = max(self.worst_s, overrun_s)


class Card:
    """One simulated card: its compute time line, its links, and counters of what it did."""

    def __init__(self, device: Device, spec: DeviceSpec):
        self.device = device
        self.spec = spec
        self.compute = Line(f"{device} compute")
        self.up = Line(f"cpu -> {device}", spec.link_gbs, spec.link_us / 1e6)
        self.down = Line(f"{device} -> cpu", spec.link_gbs, spec.link_us / 1e6)
        self.peers: dict[Device, Line] = {}
        self.overruns = Overruns()
        self.copy_overruns = Overruns()  # copies the host's memcpy made slower than the link (> 0.1 ms)
        self.most_at_once = 0
        self.host_cpu_s = 0.0  # process CPU time while computing the card's values (a real card's is 0)
        self._in_call = 0
        self._lock = threading.Lock()

    def connect(self, other: Card, gbs: float, us: float) -> None:
        """A direct link both ways (declaring it on either card is enough)."""
        for a, b in ((self, other), (other, self)):
            a.peers.setdefault(b.device, Line(f"{a.device} -> {b.device}", gbs, us / 1e6))

    @property
    def links(self) -> dict[str, Line]:
        """Every link of this card by name, `"cpu -> sim:0"`, `"sim:0 -> sim:1"`, ..."""
        return {line.name: line for line in (self.up, self.down, *self.peers.values())}

    def entering(self) -> None:
        with self._lock:
            self._in_call += 1
            self.most_at_once = max(self.most_at_once, self._in_call)

    def leaving(self, host_cpu_s: float) -> None:
        with self._lock:
            self._in_call -= 1
            self.host_cpu_s += host_cpu_s


class SimArray:
    """A tensor in a simulated card's memory, readable once `ready_at` (perf_counter seconds) has
    passed. Host code cannot read it: numpy refuses it, as it refuses a GPU array."""

    __slots__ = ("_array", "card", "ready_at")

    def __init__(self, array: np.ndarray, card: Card, ready_at: float):
        self._array = array
        self.card = card
        self.ready_at = ready_at

    shape = property(lambda self: self._array.shape)
    dtype = property(lambda self: self._array.dtype)
    nbytes = property(lambda self: self._array.nbytes)

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(f"this tensor is in {self.card.device}'s memory: copy it to the host first "
                        "(Executor.to_host)")

    def __repr__(self) -> str:
        return f"<SimArray {self.dtype}{list(self.shape)} on {self.card.device}>"


class _Partition(CompiledPartition):
    def __init__(self, executor: SimExecutor, inner: CompiledPartition, digest: str):
        self._executor = executor
        self._inner = inner
        self._digest = digest
        self._reference: dict[tuple, float] = {}
        self.input_names = inner.input_names
        self.output_names = inner.output_names

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        executor, card = self._executor, self._executor.card
        launched = time.perf_counter()
        values, ready = [], 0.0
        for name, value in zip(self.input_names, inputs, strict=True):
            if card is None:
                values.append(value)
            elif isinstance(value, SimArray) and value.card is card:
                values.append(value._array)
                ready = max(ready, value.ready_at)
            else:
                where = value.card.device if isinstance(value, SimArray) else "host memory"
                raise RunError(f"{executor.name}: input {name!r} is in {where}, not in {card.device}'s: a "
                               "transfer is missing")
        if card is not None:
            card.entering()
        try:
            cpu, start = time.process_time(), time.perf_counter()
            outputs = self._inner(values)
            done = time.perf_counter()
            declared = self._declared(values, done - start)
        finally:
            if card is not None:
                card.leaving(time.process_time() - cpu)
        if card is None:  # a simulated host: synchronous, in host memory
            executor.overruns.add(done - launched - declared)
            _wait_until(launched + declared)
            return outputs
        end, overrun = card.compute.book(declared, max(launched, ready), finished=done)
        card.overruns.add(overrun)
        return [SimArray(np.asarray(o), card, end) for o in outputs]

    def _declared(self, values: list[Any], host_s: float) -> float:
        """The library's own time for this work over the declared speed, plus the call overhead."""
        spec = self._executor.spec
        return self._library_seconds(values, host_s) / spec.speed + spec.overhead_us / 1e6

    def _library_seconds(self, values: list[Any], host_s: float) -> float:
        """The host library's time for this partition and input shapes: measured once (the fastest
        of a few runs) and cached on disk, so a device's declared times do not move with the noise
        of the host at each call; lowered when a call shows the library clearly faster (the first
        measurement was on a busy host)."""
        shapes = tuple((np.shape(v), str(getattr(v, "dtype", ""))) for v in values)
        key = f"{self._executor.like_key}|{self._digest}|{shapes}"
        if shapes in self._reference and host_s < 0.8 * self._reference[shapes]:
            self._reference[shapes] = host_s
            _references.put(key, host_s)
            _references.save()
        if shapes not in self._reference:
            seconds = _references.get(key)
            if seconds is None:
                with _measuring:  # cards starting together would slow each other's measurement
                    seconds = host_s
                    for _ in range(REFERENCE_RUNS):
                        start = time.perf_counter()
                        self._inner(values)
                        seconds = min(seconds, time.perf_counter() - start)
                _references.put(key, seconds)
                _references.save()
            self._reference[shapes] = float(seconds)
        return self._reference[shapes]


class SimExecutor(Executor):
    """A simulated card (`sim@sim:N`) or host CPU (`sim@cpu`), declared in a devices file."""

    library = "sim"
    extra = ""

    def __init__(self, device: Device, spec: DeviceSpec, card: Card | None = None, *,
                 threads: int | None = None, stream: int | None = None):
        super().__init__(device, threads=threads or (1 if card is not None else None), stream=stream)
        self.spec = spec
        self.card = card
        self.accelerator = card is not None
        self.overruns = card.overruns if card is not None else Overruns()
        self._like: Executor | None = None

    @classmethod
    def discover(cls) -> list[Executor]:
        """The devices of the file named by $HETERO_SIMULATE (none when unset)."""
        path = os.environ.get(ENVIRONMENT)
        return list(simulate(path)) if path else []

    @property
    def like(self) -> Executor:
        """The host library computing this device's values (resolved on first use: discovery
        cannot ask the registry while it fills it)."""
        if self._like is None:
            from hetero import executors as registry

            try:
                found = registry.resolve([str(self.spec.like)])[0]
            except ExecutorUnavailableError as exc:
                raise ExecutorUnavailableError(f"{self.spec.where}: like {self.spec.like!r}: {exc}") from exc
            if found.memory_space != HOST_SPACE:
                raise ExecutorUnavailableError(f"{self.spec.where}: like {self.spec.like!r} must be a host "
                                               f"library, not {found.name}")
            if self.card is None and (self.threads != found.threads or self.stream is not None):
                found = registry.variant_of(found, threads=self.threads, stream=self.stream)
            self._like = found
        return self._like

    def variant(self, *, threads: int | None = None, stream: int | None = None) -> Executor:
        """Another view of the same device: a card's variants share its time lines and links."""
        return SimExecutor(self.device, self.spec, self.card, threads=threads or self.threads, stream=stream)

    def info(self) -> ExecutorInfo:
        like = self.like.info()
        spec = self.spec
        what = f"simulated {'card' if self.card else 'host CPU'}: {like.name} x{spec.speed:g}, " \
               f"{spec.overhead_us:g} us/call"
        if self.card is not None:
            what += f", PCIe {spec.link_gbs:g} GB/s {spec.link_us:g} us"
        return ExecutorInfo(self.name, self.library, f"{like.library} {like.version}", str(self.device), what,
                            like.threads if self.card is None else 1, "fp32")

    def supports(self, node: Node, model: Model) -> bool:
        return self.like.supports(node, model)

    def supports_op(self, node: Node, model: Model) -> bool:
        return self.like.supports_op(node, model)

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        inner = self.like.compile(part)
        unnamed = onnx.ModelProto()
        unnamed.CopyFrom(part)
        unnamed.graph.name = ""  # the same work on another card is the same reference
        return _Partition(self, inner, hashlib.sha1(unnamed.SerializeToString()).hexdigest())

    @property
    def like_key(self) -> str:
        info = self.like.info()
        return f"{info.library}={info.version}@{info.device}/t{info.threads}/{info.precision}"

    def to_device(self, array: np.ndarray) -> Any:
        """Host -> card over its link, asynchronously (the array is copied at once)."""
        if self.card is None:
            return array
        start = time.perf_counter()  # the host's own copy below stands for the DMA, within the link's time
        copied = np.array(array, order="C")
        arrives, overrun = self.card.up.copy(copied.nbytes, start, time.perf_counter())
        self.card.copy_overruns.add(overrun - COPY_SLACK_S)
        return SimArray(copied, self.card, arrives)

    def to_host(self, value: Any) -> np.ndarray:
        """Card -> host over its link: waits until the value is computed and has arrived."""
        if self.card is None or not isinstance(value, SimArray):
            return value
        if value.card is not self.card:
            raise RunError(f"{self.name}: to_host of a tensor in {value.card.device}'s memory")
        arrives, _ = self.card.down.copy(value.nbytes, value.ready_at)
        _wait_until(value.ready_at)
        copied = value._array.copy()  # within the link's time
        self.card.copy_overruns.add(time.perf_counter() - arrives - COPY_SLACK_S)
        _wait_until(arrives)
        return copied

    def all_finite(self, value: Any) -> Any:
        """The card's own reduction, made on the host array its values are computed in."""
        return host_all_finite(value._array) if isinstance(value, SimArray) else super().all_finite(value)

    def copy_from(self, value: Any, source: Executor) -> Any | None:
        """Card -> card over a declared direct link, else None (through host memory)."""
        if self.card is None or not isinstance(value, SimArray):
            return None
        link = value.card.peers.get(self.card.device)
        if link is None:
            return None
        return SimArray(value._array.copy(), self.card, link.copy(value.nbytes, value.ready_at)[0])

    def synchronize(self) -> None:
        """Wait until the work and copies booked on this card so far are done."""
        if self.card is not None:
            _wait_until(max(self.card.compute.free_at, self.card.up.free_at))

    def report(self) -> str:
        """What this simulated device did, and whether its figures are honest (no overruns)."""
        overruns = self.overruns
        if self.card is not None:
            line = self.card.compute
            text = f"{self.name} (simulated): {line.count} partitions, {line.busy_s * 1e3:.1f} ms busy"
            text += "".join(f"; {name} ({link.gbs:g} GB/s, {link.latency_s * 1e6:g} us): {link.count} "
                            f"copies, {link.nbytes} B" for name, link in self.card.links.items())
        else:
            text = f"{self.name} (simulated host CPU): {overruns.calls} partitions"
        copies = self.card.copy_overruns if self.card is not None else Overruns()
        if copies.count:
            text += (f"; the host's memory copies took longer than the declared link in {copies.count} of "
                     f"{copies.calls} copies (worst by {copies.worst_s * 1e3:.2f} ms)")
        if overruns.count:
            worst_ms = overruns.worst_s * 1e3
            text += (f"; the host library ({self.spec.like}) took longer than declared in "
                     f"{overruns.count} of {overruns.calls} calls (worst by {worst_ms:.2f} ms): "
                     "those times are the host's, not the declared device's")
        return text
