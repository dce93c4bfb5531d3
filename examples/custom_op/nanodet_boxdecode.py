"""A custom operator end to end: a model ONNX Runtime cannot run, run by Hetero with a user kernel.

    python examples/custom_op/nanodet_boxdecode.py [--image samples/dog.jpg] [--out out]

The model is NanoDet-g with its pre-processing in front and, behind it, the custom node
`com.hetero.vision::BoxDecode` followed by the standard NonMaxSuppression (`hetero/apps/detection.py`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort

import hetero
from hetero.apps import detection

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=ROOT / "samples" / "dog.jpg")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()

    image = cv2.imread(str(args.image))
    if image is None:
        raise SystemExit(f"cannot read image {args.image}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "nanodet_boxdecode.onnx"
    onnx.save(detection.detector_model(*image.shape[:2]), path)
    print(f"1. wrote {path}: one graph, pre-processing + NanoDet-g + {detection.DOMAIN}::BoxDecode + NMS")

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        raise SystemExit("ONNX Runtime unexpectedly loaded a model with a custom op it has no kernel for")
    except Exception as exc:  # Fail or InvalidGraph, depending on the ONNX Runtime version
        print(f"2. ONNX Runtime alone refuses it: {str(exc).splitlines()[0]}")

    # Importing hetero.apps.detection registered the kernel; take it away to see what a user meets.
    hetero.kernels.unregister(detection.DOMAIN, "BoxDecode")
    try:
        hetero.load(path)
    except hetero.UnknownDomainError as exc:
        print(f"3. Hetero without a kernel refuses it too, and says what to do:\n   {exc}")

    # The registration a user writes (hetero/apps/detection.py does exactly this on import):
    # a numpy function, plus an `infer` that gives the outputs' types for planning ...
    hetero.kernel(detection.DOMAIN, "BoxDecode", executor="numpy",
                  infer=detection.infer_box_decode)(detection.box_decode)
    # ... and an OpenCL variant: device source and a host launcher.
    hetero.kernel(detection.DOMAIN, "BoxDecode", executor="opencl", source=detection.BOX_DECODE_CL,
                  fn=detection.launch_box_decode, infer=detection.infer_box_decode)

    session = hetero.compile(path, ["onnxruntime", "openvino", "numpy"])
    print("4. with the kernels registered, Hetero runs it: BoxDecode on the numpy kernel, the rest on "
          "the vendor libraries")
    print(session.plan)
    outputs = session.run({"frame": image})
    found = detection.detections(outputs)
    print(f"5. {len(found)} detections in {args.image.name}:")
    for item in found:
        x1, y1, x2, y2 = item.box
        print(f"   {item.label:<12} {item.score:.2f}  ({x1:.0f}, {y1:.0f}) - ({x2:.0f}, {y2:.0f})")

    try:
        on_opencl = hetero.compile(path, ["onnxruntime", "opencl", "numpy"])
    except hetero.ExecutorUnavailableError as exc:
        print(f"6. no OpenCL device here, so no OpenCL kernel run ({exc})")
        return
    gap = np.abs(on_opencl.run({"frame": image})["boxes"] - outputs["boxes"]).max(initial=0.0)
    print(f"6. with OpenCL before numpy, BoxDecode runs on the OpenCL kernel (boxes within {gap:.1e} px "
          "of the numpy kernel's):")
    print(on_opencl.plan)

if __name__ == "__main__":
    main()
