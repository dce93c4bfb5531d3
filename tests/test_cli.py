"""The `hetero` command line, driven through typer's runner."""

import json
import shutil

import onnx
import pytest
from typer.testing import CliRunner

from hetero.cli import app
from hetero.zoo import small_cnn

runner = CliRunner()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "cnn.onnx"
    onnx.save(small_cnn(), path)
    return path


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "240"})
    return result.exit_code, result.output


def test_devices_lists_executors_and_missing_extras():
    code, output = _invoke("devices")
    assert code == 0
    assert "numpy@cpu" in output and "onnxruntime@cpu" in output


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_plan_prints_partitions_and_draws(model_file, tmp_path):
    code, output = _invoke("plan", model_file, "-e", "onnxruntime,numpy", "-p", "manual", "-a", "Relu=numpy",
                           "--svg", tmp_path / "plan.svg")
    assert code == 0, output
    assert "onnxruntime@cpu" in output and "numpy@cpu" in output
    assert (tmp_path / "plan.svg").read_text().startswith("<?xml")


def test_run_checks_against_onnxruntime_and_traces(model_file, tmp_path):
    trace = tmp_path / "trace.json"
    code, output = _invoke("run", model_file, "-e", "openvino,numpy", "--check", "--repeat", "3",
                           "--trace", trace)
    assert code == 0, output
    assert "check logits: max |hetero - onnxruntime|" in output
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "partition" for e in events)


def test_bench_reports_rate_and_percentiles(model_file):
    code, output = _invoke("bench", model_file, "-e", "onnxruntime", "--duration", "0.5",
                           "--concurrency", "2")
    assert code == 0, output
    assert "inferences/s" in output and "p99" in output


def test_bench_compare_runs_the_native_baselines(model_file):
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    code, output = _invoke("bench", model_file, "-e", "onnxruntime", "--duration", "0.5", "--compare")
    assert code == 0, output
    assert "openvino THROUGHPUT hint" in output and "onnxruntime" in output


def test_errors_exit_with_a_message(tmp_path):
    code, output = _invoke("run", tmp_path / "missing.onnx")
    assert code == 2 and "does not exist" in output
    code, output = _invoke("plan", tmp_path / "missing.onnx", "-e", "quantum")
    assert code == 2
