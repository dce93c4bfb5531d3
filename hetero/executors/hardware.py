"""What the host has, asked of drivers rather than of libraries: NVIDIA GPUs through the CUDA
driver (`libcuda`, present wherever the NVIDIA driver is) and `nvidia-smi`; and how a CUDA tensor
of any library is described (the CUDA Array Interface).

Libraries see only the devices they were built for; the driver sees the hardware. Comparing the
two tells a user what is missing: an NVIDIA GPU that `nvidia-smi` lists while the installed ONNX
Runtime has no CUDA provider, say. No vendor library is imported here.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from hetero.executors.base import CPU, Device

_COMPUTE_MAJOR, _COMPUTE_MINOR = 75, 76  # CUdevice_attribute values (CUDA driver API)


@dataclass(frozen=True)
class CudaDevice:
    """One GPU as the CUDA driver numbers it (`cuda:N` is ordinal N, after CUDA_VISIBLE_DEVICES)."""

    ordinal: int
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int


@lru_cache(maxsize=1)
def cuda_devices() -> tuple[CudaDevice, ...]:
    """The GPUs the CUDA driver offers this process; none without the driver (no exception)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return ()
    count = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return ()
    found = []
    for ordinal in range(count.value):
        handle, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        name, memory = ctypes.create_string_buffer(256), ctypes.c_size_t()
        if cuda.cuDeviceGet(ctypes.byref(handle), ordinal) != 0:
            continue
        cuda.cuDeviceGetName(name, len(name), handle)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), _COMPUTE_MAJOR, handle)
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), _COMPUTE_MINOR, handle)
        cuda.cuDeviceTotalMem_v2(ctypes.byref(memory), handle)
        found.append(CudaDevice(ordinal, name.value.decode(errors="replace"), (major.value, minor.value),
                                memory.value))
    return tuple(found)


@lru_cache(maxsize=1)
def nvidia_smi_gpus() -> tuple[str, ...]:
    """The GPUs `nvidia-smi -L` lists ("GPU 0: NVIDIA H200 (UUID: ...)"), or none (no tool, or it
    fails within 10 s)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return ()
    try:
        listed = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(line.strip() for line in listed.stdout.splitlines() if line.startswith("GPU "))


def cuda_array(value: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and device pointer of a C-contiguous tensor exposing the CUDA Array Interface
    (torch, CuPy, Numba, TensorRT's buffers here); ValueError if it is strided."""
    interface = value.__cuda_array_interface__
    shape, dtype = tuple(interface["shape"]), np.dtype(interface["typestr"])
    strides = interface.get("strides")
    if strides is not None and tuple(strides) != np.empty(shape, dtype).strides:
        raise ValueError(f"a {type(value).__name__} of shape {list(shape)} is not C-contiguous")
    return shape, dtype, int(interface["data"][0])


def openvino_device(name: str) -> Device | None:
    """OpenVINO's device name as Hetero's: CPU -> cpu, GPU / GPU.1 -> gpu:0 / gpu:1, NPU -> npu:0;
    None for devices Hetero does not drive (virtual ones such as AUTO or HETERO). OpenVINO and
    ONNX Runtime's OpenVINO provider name devices alike."""
    kind, _, index = name.partition(".")
    if kind not in ("CPU", "GPU", "NPU") or (index and not index.isdigit()):
        return None
    return CPU if kind == "CPU" else Device(kind.lower(), int(index or 0))
