"""The GPU rows of the benchmarks, as markdown (what scripts/gpu-check reports):

    python benchmarks/gpu.py [--models resnet50,mobilenet_v2] [--seconds 5] [--simulate FILE]

1. Latency per library, GPU against CPU: each library with a GPU executor (torch, CuPy, ONNX
   Runtime's providers, TensorRT) on `cuda:0` against the same library on the host (torch) or
   ONNX Runtime's CPU provider, median of interleaved rounds, fp32, batch 1.
2. GPU engines against each other: TensorRT, ONNX Runtime's TensorRT and CUDA providers, torch
   and CuPy, each alone on `cuda:0` (nodes it cannot run on ONNX Runtime's CPU provider), and the
   `latency` policy over all of them (target: at least as fast as TensorRT alone on NanoDet-g).
3. Replica scaling: the GPU replica alone, a CPU replica alone, and both in one ReplicaPool
   (target: together >= GPU alone + 0.8 x CPU alone).
4. Transfers, GB/s for 64 MiB, host to device and back: pageable against pinned host memory.

With --simulate FILE the simulated cards of a devices file stand in for GPUs (every figure is
then labelled simulated), so the script runs anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import onnx

import hetero
from hetero import executors, zoo
from hetero.bench import settled_times
from hetero.executors import Executor, is_accelerator
from hetero.graph import example_feeds
from hetero.runtime.tuning import measure_rate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"resnet50": zoo.resnet50, "mobilenet_v2": zoo.mobilenet_v2, "small_cnn": zoo.small_cnn,
          "nanodet": lambda: onnx.load(os.path.join(ROOT, "models", "nanodet-g-coco.onnx"))}
#: The GPU engines compared on cuda:0, TensorRT first (the others are compared with it).
ENGINES = ("tensorrt@cuda:0", "onnxruntime/tensorrt@cuda:0", "onnxruntime/cuda@cuda:0", "torch@cuda:0",
           "cupy@cuda:0")
SIZE = 64 << 20


def gpus() -> list[Executor]:
    return [e for e in executors.available() if is_accelerator(e) and e.device.kind in ("cuda", "sim")]


def host_twin(gpu: Executor) -> str:
    return "torch@cpu" if gpu.library == "torch" else "onnxruntime@cpu"


def latency(model: hetero.Model, label: str, rounds: int = 10) -> None:
    feeds = example_feeds(model)
    print(f"\n### {model.label}: latency per library, GPU against CPU{label} (median ms, batch 1, fp32)\n")
    print("| library | GPU | ms | CPU | ms | CPU / GPU |\n|---|---|---|---|---|---|")
    for gpu in gpus():
        pair = {gpu.name: hetero.compile(model, [gpu, "numpy"]), host_twin(gpu): hetero.compile(
            model, [host_twin(gpu), "numpy"])}
        times: dict[str, list[float]] = {name: [] for name in pair}
        for _ in range(rounds):
            for name, session in pair.items():
                times[name] += settled_times(lambda s=session: s.run(feeds))
        (g, g_s), (c, c_s) = ((n, statistics.median(t) * 1e3) for n, t in times.items())
        print(f"| {gpu.library} | {g} | {g_s:.2f} | {c} | {c_s:.2f} | {c_s / g_s:.2f} |")


def engines(model: hetero.Model, rounds: int = 10) -> None:
    present = {e.name: e for e in executors.available()}
    engines = [present[name] for name in ENGINES if name in present]
    if not engines:
        print(f"\n### {model.label}: GPU engines\n\nno CUDA engine here: not measured")
        return
    feeds = example_feeds(model)
    sessions = {e.name: hetero.compile(model, [e, "onnxruntime@cpu"]) for e in engines}
    sessions["hetero latency policy"] = hetero.compile(model, policy="latency")
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            times[name] += settled_times(lambda s=session: s.run(feeds))
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    first = engines[0].name
    print(f"\n### {model.label}: GPU engines on cuda:0 (median ms, batch 1, fp32; nodes an engine cannot "
          "run go to ONNX Runtime's CPU provider)\n")
    print(f"| engine | ms | nodes on the GPU | {first} / engine |\n|---|---|---|---|")
    for name, session in sessions.items():
        on_gpu = sum(len(p.nodes) for p in session.plan.partitions if is_accelerator(p.executor))
        print(f"| {name} | {ms[name]:.2f} | {on_gpu}/{len(model.nodes)} | {ms[first] / ms[name]:.2f} |")
    for session in sessions.values():
        session.close()


def scaling(model: hetero.Model, seconds: float, label: str) -> None:
    feeds = example_feeds(model)
    gpu = gpus()[0]
    host = [e for e in executors.available() if not is_accelerator(e) and e.library != "sim"]
    rates = {}
    for name, replicas in (("GPU alone", [[gpu, *host]]), ("CPU alone", [host]),
                           ("GPU + CPU", [[gpu, *host], host])):
        pool = hetero.ReplicaPool.build(model, replicas, cpu_streams=1)
        rates[name] = measure_rate(pool, feeds, seconds)
        pool.close()
    target = rates["GPU alone"] + 0.8 * rates["CPU alone"]
    print(f"\n### {model.label}: replicas on {gpu.name} and the CPU{label} (requests/s, queue full)\n")
    print("| GPU alone | CPU alone | GPU + CPU | target: GPU + 0.8 x CPU | met |\n|---|---|---|---|---|")
    met = "yes" if rates["GPU + CPU"] >= target else "no"
    figures = " | ".join(f"{rates[k]:.1f}" for k in ("GPU alone", "CPU alone", "GPU + CPU"))
    print(f"| {figures} | {target:.1f} | {met} |")


def _gbs(copy: Callable[[], object], sync: Callable[[], object]) -> float:
    def timed() -> None:
        copy()
        sync()

    seconds = min(settled_times(timed, repeats=5, pause_s=0.0))
    return SIZE / seconds / 1e9


def copies(gpu: Executor, host: np.ndarray) -> dict[str, tuple[Callable, Callable]]:
    """Host -> device and device -> host copies of `host`, by kind of host memory."""
    if gpu.library == "torch":
        import torch

        pinned = torch.from_numpy(host).pin_memory()
        on_gpu = pinned.to(gpu.torch_device)
        back = torch.empty_like(pinned).pin_memory()
        return {"pageable": (lambda: torch.from_numpy(host).to(gpu.torch_device), lambda: on_gpu.cpu()),
                "pinned": (lambda: pinned.to(gpu.torch_device, non_blocking=True),
                           lambda: back.copy_(on_gpu, non_blocking=True))}
    on_gpu = gpu.to_device(host)
    if gpu.library == "cupy":
        return {"pageable": (lambda: gpu.xp.asarray(host), lambda: gpu.xp.asnumpy(on_gpu)),
                "pinned (staged)": (lambda: gpu.to_device(host), lambda: gpu.to_host(on_gpu))}
    kind = "simulated link" if gpu.library == "sim" else "pageable (library's own)"
    return {kind: (lambda: gpu.to_device(host), lambda: gpu.to_host(on_gpu))}


def transfers(label: str) -> None:
    print(f"\n### Transfers, {SIZE >> 20} MiB{label} (GB/s, best of 5)\n")
    print("| device | memory | host -> device | device -> host |\n|---|---|---|---|")
    host = np.ones(SIZE // 4, np.float32)
    for gpu in gpus():
        for memory, (up, down) in copies(gpu, host).items():
            print(f"| {gpu.name} | {memory} | {_gbs(up, gpu.synchronize):.1f} | "
                  f"{_gbs(down, gpu.synchronize):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2,nanodet")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--simulate", help="devices file whose simulated cards stand in for GPUs")
    args = parser.parse_args()
    label = ""
    if args.simulate:
        os.environ["HETERO_SIMULATE"] = os.path.abspath(args.simulate)
        executors.libraries(refresh=True)
        label = f", simulated cards of {args.simulate}"
    if not gpus():
        print("no GPU here (nor simulated cards): nothing to measure")
        return
    print(f"## GPU rows{label}\n\nexecutors: {', '.join(e.name for e in executors.available())}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    for name in args.models.split(","):
        model = hetero.load(MODELS[name](), name=name)
        latency(model, label)
        engines(model)
        scaling(model, args.seconds, label)
    transfers(label)


if __name__ == "__main__":
    main()
