"""The CUDA paths, each checked where CI can (simulated cards, a stand-in for CuPy's CUDA module,
torch without a GPU) and, marked `gpu`, on a real GPU: timings measure executions, pinned staging
buffers are never shared between copies in flight, the throughput policy gives an accelerator one
replica, and fp32 stays fp32 on CUDA without switching TF32 off for the whole process."""

from __future__ import annotations

import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import hetero
from hetero.executors import Device
from hetero.executors import torch_executor as torch_module
from hetero.executors.cupy_executor import CupyExecutor
from hetero.executors.sim_executor import simulate
from hetero.executors.torch_executor import TorchExecutor
from hetero.graph import example_feeds
from hetero.zoo import small_cnn

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path))
    from hetero.executors import sim_executor
    from hetero.planner import cost
    from hetero.runtime import tuning

    stores = (cost._costs, tuning._plans, sim_executor._references)
    for store in stores:
        store.clear_memory()
    yield tmp_path
    for store in stores:
        store.clear_memory()


# --- a stand-in for CuPy's CUDA module: device arrays whose copies take time, as DMA does -------

class _FakeDeviceArray:
    def __init__(self, shape, dtype, fake):
        self.shape, self.dtype, self._fake = tuple(shape), np.dtype(dtype), fake
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.data = np.empty(self.shape, self.dtype)

    def set(self, source):
        self._fake.sources.append(source)
        time.sleep(0.002)  # the DMA reads the staging buffer meanwhile
        self.data[...] = source

    def get(self, out):
        self._fake.sources.append(out)
        time.sleep(0.002)
        out[...] = self.data


def _fake_cupy():
    fake = types.SimpleNamespace(__name__="cupy", __version__="fake", sources=[], pinned=[])

    def alloc_pinned_memory(size):
        buffer = bytearray(size)
        fake.pinned.append(np.frombuffer(buffer, np.uint8))
        return buffer

    fake.cuda = types.SimpleNamespace(alloc_pinned_memory=alloc_pinned_memory,
                                      Device=lambda index: threading.Lock())
    fake.empty = lambda shape, dtype: _FakeDeviceArray(shape, dtype, fake)
    return fake


def _is_pinned(array, fake) -> bool:
    return any(np.shares_memory(array, buffer) for buffer in fake.pinned)


def test_pinned_staging_is_never_shared_between_copies_in_flight():
    fake = _fake_cupy()
    gpu = CupyExecutor(Device("cuda", 0), xp=fake)
    arrays = [np.full((64, 64), i, np.float32) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        on_gpu = list(pool.map(gpu.to_device, arrays))
        back = list(pool.map(gpu.to_host, on_gpu))
    for i, (device_array, host_array) in enumerate(zip(on_gpu, back, strict=True)):
        assert (device_array.data == i).all() and (host_array == i).all()
    assert all(_is_pinned(source, fake) for source in fake.sources)  # every copy went through pinned memory
    assert 2 <= len(fake.pinned) <= 8  # buffers reused once free, one per copy in flight
    assert not any(_is_pinned(array, fake) for array in back)  # results never alias a reused buffer


# --- torch on CUDA --------------------------------------------------------------------------------

def test_torch_synchronize_waits_for_its_cuda_device(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    TorchExecutor(Device("cuda", 1)).synchronize()
    TorchExecutor().synchronize()
    assert waited == [torch.device("cuda:1")]


@pytest.fixture
def user_allows_tf32():
    """The user's own choice for their convolutions, put back after the test."""
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    conv.fp32_precision = "tf32"
    yield
    conv.fp32_precision = saved


def test_tf32_is_off_only_while_cuda_partitions_run(monkeypatch, user_allows_tf32):
    conv = torch.backends.cudnn.conv
    TorchExecutor(Device("cuda", 0))
    assert conv.fp32_precision == "tf32"  # discovering a CUDA device changes nothing
    seen = []
    barrier = threading.Barrier(3)

    def partition():
        with torch_module.exact_fp32():
            barrier.wait(timeout=5)
            seen.append((conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
            barrier.wait(timeout=5)

    threads = [threading.Thread(target=partition) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert seen == [("ieee", "ieee")] * 3 and conv.fp32_precision == "tf32"
    entered = []
    original = torch_module.exact_fp32
    monkeypatch.setattr(torch_module, "exact_fp32", lambda: entered.append(1) or original())
    model = hetero.load(small_cnn())
    relu = next(n for n in model.nodes if n.op_type == "Relu")
    part = model.extract([relu])
    x = torch.randn(1, 16, 16, 16)
    TorchExecutor(Device("cuda", 0)).compile(part)([x])  # CPU tensors: runs here, under the switch
    assert entered == [1]
    TorchExecutor().compile(part)([x.numpy()])
    assert entered == [1]  # the host path leaves it alone


# --- the throughput policy on simulated cards ----------------------------------------------------

@pytest.mark.slow
def test_throughput_policy_gives_each_card_one_replica():
    """Two simulated cards and the host: the policy measures the cards' replicas (one each), the
    CPU streams' and both; a card is never called from two replicas at once."""
    from hetero.runtime.tuning import tune_throughput

    cards = simulate({"devices": [{"like": "onnxruntime", "speed": 0.2, "count": 2, "overhead_us": 500}]})
    model = hetero.load(small_cnn())
    runner = tune_throughput(model, [*cards, "onnxruntime"], seconds=0.3)
    note = next(n for n in runner.plan.notes if n.startswith("throughput:"))
    assert "2 accelerator replicas" in note and "2 accelerator + 2 CPU-stream replicas" in note
    for sim in cards:
        assert sim.card.most_at_once == 1 and sim.card.compute.count > 10
    if isinstance(runner, hetero.ReplicaPool):
        placed = [e for r in runner.replicas for e in r.session.plan.executors if e.library == "sim"]
        assert sorted(e.name for e in placed) == sorted(c.name for c in cards)[:len(placed)]
        assert all(e.stream is None for e in placed)
    feeds = example_feeds(model)
    want = hetero.compile(model, ["numpy"]).run(feeds)["logits"]
    np.testing.assert_allclose(runner.run(feeds)["logits"], want, rtol=1e-4, atol=1e-5)
    runner.close()


# --- on a GPU -------------------------------------------------------------------------------------

def _cupy_gpus() -> list:
    try:
        return CupyExecutor.discover()
    except ImportError:
        return []


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU and torch with CUDA")
def test_gpu_torch_timings_measure_executions():
    from hetero.planner.cost import time_call

    gpu = TorchExecutor(Device("cuda", 0))
    a = torch.randn(4096, 4096, device="cuda")
    gpu.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.matmul(a, a)
    end.record()
    end.synchronize()
    kernel_s = start.elapsed_time(end) / 1e3
    executed = time_call(lambda: (torch.matmul(a, a), gpu.synchronize()))
    assert executed >= 0.8 * kernel_s


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU and torch with CUDA")
def test_gpu_torch_convolutions_stay_fp32(user_allows_tf32):
    model = hetero.load(small_cnn(image=64))
    feeds = example_feeds(model)
    want = hetero.compile(model, ["numpy"]).run(feeds)["logits"]
    session = hetero.compile(model, [TorchExecutor(Device("cuda", 0)), "numpy"])
    got = session.run(feeds)["logits"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()  # TF32 misses this by ~10x
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"


@pytest.mark.gpu
@pytest.mark.skipif(not _cupy_gpus(), reason="needs CuPy and an NVIDIA GPU")
def test_gpu_cupy_concurrent_copies_round_trip():
    gpu = _cupy_gpus()[0]
    arrays = [np.full((256, 256), i, np.float32) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        back = list(pool.map(lambda a: gpu.to_host(gpu.to_device(a)), arrays))
    for i, array in enumerate(back):
        assert (array == i).all()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU and torch with CUDA")
def test_gpu_throughput_policy_gives_the_gpu_one_replica():
    from hetero.runtime.tuning import tune_throughput

    gpu = TorchExecutor(Device("cuda", 0))
    model = hetero.load(small_cnn())
    runner = tune_throughput(model, [gpu, "onnxruntime@cpu", "numpy"], seconds=0.5)
    note = next(n for n in runner.plan.notes if n.startswith("throughput:"))
    assert "1 accelerator replicas" in note
    if isinstance(runner, hetero.ReplicaPool):
        on_gpu = [e for r in runner.replicas for e in r.session.plan.executors if e.device.kind == "cuda"]
        assert len(on_gpu) <= 1 and all(e.stream is None for e in on_gpu)
    runner.close()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs and torch with CUDA")
def test_gpu_torch_copies_between_gpus_directly():
    first, second = TorchExecutor(Device("cuda", 0)), TorchExecutor(Device("cuda", 1))
    model = hetero.load(small_cnn())
    session = hetero.compile(model, ["numpy"], "manual", affinity={"Conv": first, "Relu": second})
    between = [t for t in session.plan.transfers if {t.source, t.target} == {"cuda:0", "cuda:1"}]
    feeds = example_feeds(model)
    want = hetero.compile(model, ["numpy"]).run(feeds)["logits"]
    np.testing.assert_allclose(session.run(feeds)["logits"], want, rtol=1e-3, atol=1e-4)
    assert between and session.stats.direct_transfers == len(between)


@pytest.mark.parametrize(("listing", "extras"), [("GPU 0: NVIDIA H100 (UUID: GPU-1)", "dev,cuda,tensorrt"),
                                                 ("No devices were found", "dev")])
def test_setup_adds_the_cuda_extra_only_where_nvidia_smi_lists_a_gpu(tmp_path, listing, extras):
    """scripts/setup's choice of extras, with a stand-in nvidia-smi: CI has none and pulls no CUDA wheels."""
    import subprocess
    from pathlib import Path

    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho '{listing}'\n")
    fake.chmod(0o755)
    setup = Path(__file__).resolve().parent.parent / "scripts" / "setup"
    choice = subprocess.run(  # the lines of scripts/setup from EXTRAS=dev to its fi
        ["bash", "-c", f"eval \"$(sed -n '/^EXTRAS=dev$/,/^fi$/p' {setup})\"; echo $EXTRAS"],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, capture_output=True, text=True, timeout=30, check=True)
    assert choice.stdout.strip() == extras
