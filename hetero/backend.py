"""`onnx.backend.base.Backend` for Hetero, so the ONNX backend test suite runs against it.

    backend_test = onnx.backend.test.BackendTest(hetero.backend, __name__)

uses the default executors and policy; `hetero.backend.configured(["openvino", "numpy"])` gives
a backend whose sessions prefer other executors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx
from onnx.backend.base import Backend, BackendRep

from hetero.runtime import Session, compile

#: Backend-suite model cases that download their weights; excluded on machines without a hub.
DOWNLOADED_MODEL_CASES = (r"test_(bvlc_alexnet|densenet121|inception_v1|inception_v2|resnet50|shufflenet"
                          r"|squeezenet|vgg19|zfnet512)_.*")


class HeteroRep(BackendRep):
    """A compiled Hetero session in the shape the ONNX backend API expects."""

    def __init__(self, session: Session):
        self.session = session

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        names = self.session.model.input_names
        if isinstance(inputs, dict):
            feeds = inputs
        elif isinstance(inputs, list | tuple):
            feeds = dict(zip(names, inputs, strict=False))
        else:
            feeds = {names[0]: inputs}
        outputs = self.session.run(feeds)
        return tuple(outputs[name] for name in self.session.model.output_names)


class HeteroBackend(Backend):
    executors: Sequence[str] | None = None
    policy: str = "priority"

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        return cls.supports_device(device)

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> HeteroRep:
        return HeteroRep(compile(model, executors=cls.executors, policy=cls.policy))

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device.upper() == "CPU"


def suite_configurations() -> dict[str, list | None]:
    """Executor orders the backend suite runs under: the default, each other installed library
    first (the rest after it, numpy last as the exact fallback), the host twin of the CUDA interpreter,
    which checks on CI every op the GPU executor claims, and ONNX Runtime's CPU provider through
    the device providers' I/O binding path (tensors kept as OrtValues between partitions)."""
    from hetero import executors
    from hetero.executors.cupy_executor import CupyExecutor

    installed = [lib.library for lib in executors.libraries() if lib.executors]
    default = [e.library for e in executors.available()]
    configs: dict[str, list | None] = {"default": None}
    for library in installed:
        order = [library] + [lib for lib in installed if lib != library]
        if order != list(dict.fromkeys(default)):  # the default order is run once, as "default"
            configs[library] = order
    configs["cupy-twin"] = [CupyExecutor.on_host(), *installed]
    if "onnxruntime" in installed:
        from hetero.executors.onnxruntime_executor import OnnxRuntimeExecutor

        # The twin stands in for the CPU provider: a node it fails at run time is re-planned on
        # another library, not on the same kernels.
        others = [lib for lib in installed if lib != "onnxruntime"]
        configs["onnxruntime-twin"] = [OnnxRuntimeExecutor.device_twin(), *others]
    return configs


def configured(executors: Sequence[str] | None = None, policy: str = "priority") -> type[HeteroBackend]:
    """A backend class whose sessions use these executors (in priority order) and this policy."""
    return type("HeteroBackend", (HeteroBackend,), {"executors": executors, "policy": policy})


prepare = HeteroBackend.prepare
run_model = HeteroBackend.run_model
run_node = HeteroBackend.run_node
supports_device = HeteroBackend.supports_device
is_compatible = HeteroBackend.is_compatible
