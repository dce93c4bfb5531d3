"""Load generation and the native baselines `hetero bench --compare` measures against."""

from hetero.bench.load import BenchResult, run_load, settled_times

__all__ = ["BenchResult", "run_load", "settled_times"]
