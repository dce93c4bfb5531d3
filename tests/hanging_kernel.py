"""A custom op for `hetero serve --import hanging_kernel` in tests: `Hang` returns its input, except
that a request holding 12345 stays inside the kernel for a minute (after touching the file named by
$HANGING_KERNEL_MARKER), as a library call that never returns would."""

import os
import time
from pathlib import Path

import numpy as np

import hetero

STUCK = 12345.0


@hetero.kernel("test.hang", "Hang")
def _hang(x: np.ndarray) -> np.ndarray:
    if (x == STUCK).any():
        Path(os.environ["HANGING_KERNEL_MARKER"]).touch()
        time.sleep(60)
    return x
