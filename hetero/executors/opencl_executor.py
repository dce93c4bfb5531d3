"""`opencl@opencl:N`: Hetero's own OpenCL C kernels, on any OpenCL device (a GPU, or the CPU via PoCL).

Unlike the other executors this one brings its kernels (`hetero/executors/opencl/`): `ops`
lowers each node to specialised launches, and this file builds, caches and enqueues them.
Programs are built once per source and options, kept in memory and as device binaries under
`$HETERO_CACHE_DIR/opencl/<device>/` (default `~/.cache/hetero`), so a second session on the
same model builds nothing (`compiles` counts real builds from source).

Custom kernels (`hetero.kernel(domain, op, executor="opencl", source=..., ...)`) launch in one of
two ways:

* default: `entry` (default: the op type) is called with the input buffers, then the output
  buffers, then the node attributes named in the `attributes=[...]` option, in that order (ints
  as `int`, floats as `float`); the global size is the element count of the first output, and
  output dtypes and shapes come from the kernel's `infer` function, which is then required.
  `build_options="..."` is passed to the OpenCL compiler.
* `fn=launch`: `launch(context, queue, program, inputs, **attributes)` gets the built program
  and the inputs as `pyopencl.array.Array`s and returns the outputs (an array or a sequence).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyopencl as cl
import pyopencl.array as cla
import pyopencl.tools

from hetero import kernels
from hetero.errors import CompileError, RunError
from hetero.executors.base import CompiledPartition, Device, Executor, ExecutorInfo
from hetero.executors.opencl import ops
from hetero.graph import Model, Node


def _cl_devices() -> list[cl.Device]:
    """Every OpenCL device of every platform, in a stable order; none when no ICD is installed."""
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        return []
    found: list[cl.Device] = []
    for platform in platforms:
        try:
            found += platform.get_devices()
        except cl.Error:
            continue
    return found


def cache_root() -> Path:
    return Path(os.environ.get("HETERO_CACHE_DIR") or Path.home() / ".cache" / "hetero")


@dataclass(frozen=True)
class _Action:
    """One thing a compiled partition does per call, with the values it reads and writes."""

    run: Callable[[dict[str, Any]], None]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    label: str


class _Compiled(CompiledPartition):
    def __init__(self, executor: OpenCLExecutor, label: str, input_names: list[str], output_names: list[str],
                 actions: list[_Action], constants: dict[str, Any]):
        self.input_names, self.output_names = input_names, output_names
        self._executor, self._label, self._constants = executor, label, constants
        last_use: dict[str, int] = {}
        for index, action in enumerate(actions):
            for name in (*action.reads, *action.writes):
                last_use[name] = index
        keep = set(output_names) | set(constants)
        self._actions = [(action, tuple(n for n in dict.fromkeys((*action.reads, *action.writes))
                                        if last_use[n] == index and n not in keep))
                         for index, action in enumerate(actions)]

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        executor = self._executor
        with executor.lock:
            values = {**self._constants, **dict(zip(self.input_names, inputs, strict=True))}
            for action, done in self._actions:
                try:
                    action.run(values)
                except Exception as exc:
                    raise RunError(f"{executor.name} failed running node '{action.label}' of partition "
                                   f"{self._label!r}: {exc}") from exc
                for name in done:
                    del values[name]  # temporaries go back to the pool, under the lock
            executor.queue.finish()
            return [values[name] for name in self.output_names]


class OpenCLExecutor(Executor):
    library = "opencl"
    extra = "opencl"
    kernel_kind = "opencl"
    #: float32 data; int64 only as the constant shapes, pads and sizes that kernels bake in.
    exchange_dtypes = frozenset({"float", "int64"})

    def __init__(self, device: Device | None = None, *, threads: int | None = None,
                 stream: int | None = None, cl_device: cl.Device | None = None):
        device = device or Device("opencl", 0)
        cl_device = cl_device or _cl_devices()[device.index]
        super().__init__(device, threads=threads or cl_device.max_compute_units, stream=stream)
        self.cl_device = cl_device
        self.accelerator = bool(cl_device.type & (cl.device_type.GPU | cl.device_type.ACCELERATOR))
        #: Programs built from source by this executor (cache misses in memory and on disk).
        self.compiles = 0
        self.lock = threading.RLock()
        self._programs: dict[str, cl.Program] = {}
        self._context: cl.Context | None = None
        exact = cl_device.single_fp_config & cl.device_fp_config.CORRECTLY_ROUNDED_DIVIDE_SQRT
        self._options = "-cl-fp32-correctly-rounded-divide-sqrt" if exact else ""

    @classmethod
    def discover(cls) -> list[Executor]:
        return [cls(Device("opencl", index), cl_device=d) for index, d in enumerate(_cl_devices())]

    @property
    def resource(self) -> str:
        """A CPU OpenCL device (PoCL) computes on the host's cores: it takes turns with the host
        libraries rather than running beside them."""
        if self.accelerator:
            return super().resource
        return "cpu" if self.stream is None else f"cpu#{self.stream}"

    def variant(self, *, threads: int | None = None, stream: int | None = None) -> Executor:
        return type(self)(self.device, threads=threads or self.threads, stream=stream,
                          cl_device=self.cl_device)

    def info(self) -> ExecutorInfo:
        dev = self.cl_device
        platform = " ".join(dev.platform.version.split(",")[0].split())  # PoCL appends its build flags
        return ExecutorInfo(self.name, self.library, f"{platform}, driver {dev.driver_version}",
                            str(self.device), f"{dev.name.strip()} ({dev.platform.name}, "
                            f"{dev.max_compute_units} compute units)", self.threads, "fp32")

    # -- device state, created on first use --------------------------------------------------------

    def _ensure_context(self) -> None:
        with self.lock:
            if self._context is None:
                self._context = cl.Context([self.cl_device])
                self._queue = cl.CommandQueue(self._context)
                self._pool = pyopencl.tools.MemoryPool(pyopencl.tools.ImmediateAllocator(self._queue))

    @property
    def context(self) -> cl.Context:
        self._ensure_context()
        return self._context

    @property
    def queue(self) -> cl.CommandQueue:
        self._ensure_context()
        return self._queue

    @property
    def pool(self) -> pyopencl.tools.MemoryPool:
        """Device memory for temporaries, recycled across calls (freed only under `lock`)."""
        self._ensure_context()
        return self._pool

    def to_device(self, array: np.ndarray) -> cla.Array:
        with self.lock:
            return cla.to_device(self.queue, np.asarray(array, order="C"))

    def to_host(self, value: cla.Array) -> np.ndarray:
        with self.lock:
            return value.get()

    # -- programs --------------------------------------------------------------------------------------

    @property
    def cache_dir(self) -> Path:
        dev = self.cl_device
        identity = "|".join((dev.platform.name, dev.platform.version, dev.name, dev.version,
                             dev.driver_version))
        return cache_root() / "opencl" / hashlib.sha256(identity.encode()).hexdigest()[:16]

    def program(self, source: str, options: str = "") -> cl.Program:
        """`source` built for this device: from memory, else from a cached binary, else compiled."""
        options = " ".join(filter(None, (self._options, options)))
        key = hashlib.sha256(f"{options}\n{source}".encode()).hexdigest()[:32]
        with self.lock:
            if key in self._programs:
                return self._programs[key]
            path = self.cache_dir / f"{key}.bin"
            built = None
            if path.exists():
                try:
                    built = cl.Program(self.context, [self.cl_device], [path.read_bytes()]).build(options)
                except cl.Error:
                    built = None  # a stale or foreign binary: rebuild from source
            if built is None:
                built = cl.Program(self.context, source).build(options, cache_dir=False)
                self.compiles += 1
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
                partial.write_bytes(built.binaries[0])
                partial.replace(path)
            self._programs[key] = built
            return built

    # -- capability and compilation ------------------------------------------------------------------

    def supports_op(self, node: Node, model: Model) -> bool:
        return ops.lower(node, ops.Graph(model)) is not None

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        model = Model(part, part.graph.name)
        graph = ops.Graph(model)
        input_names = [i.name for i in part.graph.input]
        output_names = [o.name for o in part.graph.output]
        acts, pads = _fusions(graph, set(output_names))
        absorbed = {n.name for n in (*acts.values(), *pads.values())}
        steps: list[tuple[Node, ops.Step | _Action]] = []
        for node in model.nodes:
            if node.name in absorbed:
                continue
            spec = kernels.lookup(node.domain, node.op_type, "opencl")
            if spec is not None:
                steps.append((node, self._custom(node, spec, graph)))
                continue
            lowered = ops.lower(node, graph, act=acts.get(node.name), pad=pads.get(node.name))
            if lowered is None:
                raise CompileError(f"{self.name} cannot run node {node.name!r} ({node.op_type}) of partition "
                                   f"{part.graph.name!r}", (node.name,))
            steps += [(node, step) for step in lowered]
        escaping = set(output_names)
        for _, step in reversed(steps):
            if isinstance(step, ops.View) and step.name in escaping:
                escaping.add(step.source)
        constants: dict[str, Any] = {}
        available = set(input_names)
        actions = []
        for node, step in steps:
            try:
                action = self._action(step, node, constants, available, escaping, graph)
            except cl.Error as exc:
                raise CompileError(f"{self.name} failed to build node {node.name!r}: {exc}",
                                   (node.name,)) from exc
            if action is not None:
                actions.append(action)
                available.update(action.writes)
        return _Compiled(self, part.graph.name, input_names, output_names, actions, constants)

    def _action(self, step: ops.Step | _Action, node: Node, constants: dict[str, Any], available: set[str],
                escaping: set[str], graph: ops.Graph) -> _Action | None:
        if isinstance(step, _Action):
            self._upload_missing(step.reads, constants, available, graph, node)
            return step
        if isinstance(step, ops.Const):
            constants[step.name] = self.to_device(step.make())
            available.add(step.name)
            return None
        if isinstance(step, ops.Buffer):
            allocator = None if step.name in escaping else self.pool
            queue, shape, dtype, name = self.queue, step.shape, step.dtype, step.name

            def allocate(values: dict[str, Any]) -> None:
                values[name] = cla.empty(queue, shape, dtype, allocator=allocator)

            return _Action(allocate, (), (name,), node.name)
        if isinstance(step, ops.View):
            self._upload_missing((step.source,), constants, available, graph, node)
            source, name, shape = step.source, step.name, step.shape

            def view(values: dict[str, Any]) -> None:
                values[name] = values[source].reshape(shape)

            return _Action(view, (source,), (name,), node.name)
        names = tuple(a for a in step.args if isinstance(a, str))
        self._upload_missing(names, constants, available, graph, node)
        kernel = cl.Kernel(self.program(step.kernel.text, step.kernel.options), step.kernel.entry)
        queue, size, local, args = self.queue, step.global_size, step.local_size, step.args

        def launch(values: dict[str, Any]) -> None:
            kernel(queue, size, local, *(values[a].data if isinstance(a, str) else a for a in args))

        return _Action(launch, names, (), node.name)

    def _upload_missing(self, names: Sequence[str], constants: dict[str, Any], available: set[str],
                        graph: ops.Graph, node: Node) -> None:
        """Initializers a kernel reads directly (depthwise weights, biases) go to the device once."""
        for name in names:
            if name in available:
                continue
            value = graph.const(name)
            if value is None:
                raise CompileError(f"{self.name}: node {node.name!r} reads {name!r}, which is neither an "
                                   "input nor a constant of its partition", (node.name,))
            constants[name] = self.to_device(value)
            available.add(name)

    def _custom(self, node: Node, spec: kernels.Kernel, graph: ops.Graph) -> _Action:
        """A registered OpenCL kernel, launched by convention or by its own `fn` (module docstring)."""
        try:
            program = self.program(spec.source, spec.options.get("build_options", ""))
        except cl.Error as exc:
            raise CompileError(f"{self.name}: custom kernel {node.qualified_type} does not build: {exc}",
                               (node.name,)) from exc
        inputs = tuple(n for n in node.inputs if n)
        attributes = dict(node.attributes)
        if spec.fn is not None:
            context, queue, fn, outputs = self.context, self.queue, spec.fn, node.outputs

            def call(values: dict[str, Any]) -> None:
                result = fn(context, queue, program, [values[n] for n in inputs], **attributes)
                result = list(result) if isinstance(result, list | tuple) else [result]
                values.update(zip(outputs, result, strict=True))

            return _Action(call, inputs, tuple(outputs), node.name)
        if spec.infer is None:
            raise CompileError(f"{self.name}: custom kernel {node.qualified_type} has no fn= launcher, so it "
                               "needs infer= for its output shapes", (node.name,))
        infos = [graph.model.tensor(n) for n in inputs]
        specs = list(spec.infer([i.dtype for i in infos], [i.shape for i in infos], attributes))
        shapes = [tuple(shape) for _, shape in specs]
        dtypes = [np.dtype(dtype) for dtype, _ in specs]
        if not all(isinstance(d, int) for shape in shapes for d in shape):
            raise CompileError(f"{self.name}: custom kernel {node.qualified_type} needs static output "
                               f"shapes, infer gave {shapes}", (node.name,))
        try:
            scalars = [_scalar(attributes[a]) for a in spec.options.get("attributes", ())]
        except KeyError as exc:
            raise CompileError(f"{self.name}: node {node.name!r} lacks attribute {exc} that custom kernel "
                               f"{node.qualified_type} takes", (node.name,)) from None
        kernel = cl.Kernel(program, spec.entry or node.op_type)
        queue, outputs = self.queue, node.outputs[:len(specs)]
        size = (max(math.prod(shapes[0]), 1),)

        def launch(values: dict[str, Any]) -> None:
            for name, shape, dtype in zip(outputs, shapes, dtypes, strict=True):
                values[name] = cla.empty(queue, shape, dtype)
            kernel(queue, size, None, *(values[n].data for n in (*inputs, *outputs)), *scalars)

        return _Action(launch, inputs, tuple(outputs), node.name)


def _scalar(value: Any) -> np.generic:
    if isinstance(value, bool | int | np.integer):
        return np.int32(value)
    if isinstance(value, float | np.floating):
        return np.float32(value)
    raise TypeError(f"attribute value {value!r} cannot be passed to an OpenCL kernel")


def _fusions(graph: ops.Graph, keep: set[str]) -> tuple[dict[str, Node], dict[str, Node]]:
    """Nodes absorbed by a neighbour: {producer: its activation}, {conv: its Pad}.

    Only where the intermediate value has that one reader in the partition and leaves nowhere.
    """
    acts: dict[str, Node] = {}
    pads: dict[str, Node] = {}
    model = graph.model
    for node in model.nodes:
        out = node.outputs[0] if len(node.outputs) == 1 else ""
        readers = model.consumers(out) if out and out not in keep else ()
        if len(readers) != 1 or readers[0].inputs[0] != out or out in readers[0].inputs[1:]:
            continue
        (reader,) = readers
        if node.op_type in ops.FUSES_ACTIVATION and reader.op_type in ops.UNARY_OPS:
            if ops.lower(node, graph, act=reader) is not None:
                acts[node.name] = reader
        elif node.op_type == "Pad" and reader.op_type == "Conv" and ops.fusable_pad(node, graph) is not None:
            pads[reader.name] = node
    for conv, pad in list(pads.items()):
        if ops.lower(model.node(conv), graph, act=acts.get(conv), pad=pad) is None:
            del pads[conv]
    return acts, pads

