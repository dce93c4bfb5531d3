"""The `hetero` command line, driven through typer's runner."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import hetero
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


def test_an_affinity_rule_that_matches_no_node_is_an_error_naming_it(model_file):
    code, output = _invoke("plan", model_file, "-p", "manual", "-a", "head/*=numpy")
    assert code == 2 and "affinity rule 'head/*' matches no node" in output, output


@pytest.mark.parametrize(("option", "value", "words"), [
    ("--duration", "0", "'--duration': must be more than 0 seconds, got 0"),
    ("--duration", "-1", "'--duration': must be more than 0 seconds, got -1"),
    ("--concurrency", "0", "'--concurrency': Input should be greater than or equal to 1"),
    ("--batch", "0", "'--batch': Input should be greater than or equal to 1"),
])
def test_bench_refuses_impossible_values(model_file, option, value, words):
    code, output = _invoke("bench", model_file, option, value)
    assert code == 2 and words in " ".join(output.split()), output


def test_an_input_file_that_is_not_npy_is_named_with_the_format_expected(model_file, tmp_path):
    text = tmp_path / "images.txt"
    text.write_text("1 2 3")
    code, output = _invoke("run", model_file, "--input", f"images={text}")
    assert code == 2, output
    flat = " ".join(output.split())
    assert f"input 'images': '{text}' is not a .npy file (numpy.save's format" in flat, output
    code, output = _invoke("run", model_file, "--input", f"images={tmp_path / 'none.npy'}")
    assert code == 2 and "does not exist" in output


def test_run_says_when_it_made_up_the_inputs(model_file, tmp_path):
    code, output = _invoke("run", model_file, "-e", "numpy", "--repeat", "0")
    assert code == 0 and "inputs: random values for images" in output, output
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((1, 3, 32, 32), np.float32))
    code, output = _invoke("run", model_file, "-e", "numpy", "--repeat", "0", "--input", f"images={images}")
    assert code == 0 and "random values" not in output, output


def test_check_fails_past_the_tolerance(model_file, monkeypatch):
    code, output = _invoke("run", model_file, "-e", "numpy", "--repeat", "0", "--check")
    assert code == 0 and "max |hetero - onnxruntime|" in output, output
    real_run = hetero.Session.run
    monkeypatch.setattr(hetero.Session, "run", lambda self, feeds, *a, **k: {
        name: value + 0.01 for name, value in real_run(self, feeds, *a, **k).items()})
    code, output = _invoke("run", model_file, "-e", "numpy", "--repeat", "0", "--check")
    assert code == 1 and "> tolerance 0.001" in output, output
    code, output = _invoke("run", model_file, "-e", "numpy", "--repeat", "0", "--check", "--tolerance", "0.1")
    assert code == 0, output


def test_tables_are_not_cut_when_piped():
    """Through a pipe (no COLUMNS), rich would cut tables at 80 columns; the CLI gives them room."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "hetero.cli", "devices"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout and max(len(line) for line in result.stdout.splitlines()) > 80


@pytest.mark.slow
def test_plan_with_the_throughput_policy_is_titled_with_it(model_file):
    code, output = _invoke("plan", model_file, "-e", "onnxruntime,numpy", "-p", "throughput")
    assert code == 0 and "policy throughput" in output, output


@pytest.mark.slow
def test_the_readme_snippet_runs_as_written():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    cwd = os.getcwd()
    os.chdir(Path(__file__).parents[1])  # the snippet names models/ relative to the repository
    try:
        exec(compile(snippet, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)


def test_measured_policies_plan_on_the_shape_or_inputs_given(tmp_path, monkeypatch):
    import numpy as np
    from onnx import TensorProto, helper

    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path / "cache"))
    rows = helper.make_tensor("rows", TensorProto.INT64, [2], [-1, 300])  # needs a multiple of 300
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "rows"], ["y"])], "reshape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["r", 300])], [rows])
    path = tmp_path / "reshape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code, output = _invoke("plan", path, "-e", "onnxruntime,numpy", "-p", "latency", "--shape", "x=1x600")
    assert code == 0, output
    assert "placements considered" in output and "priority plan" not in output
    np.save(tmp_path / "x.npy", np.ones((1, 900), np.float32))
    code, output = _invoke("run", path, "-e", "onnxruntime,numpy", "-p", "latency", "--input",
                           f"x={tmp_path / 'x.npy'}", "--repeat", "1")
    assert code == 0, output
    assert "[3, 300]" in output
    code, output = _invoke("plan", path, "-p", "latency", "--shape", "x=1xtwo")
    assert code != 0 and "dims must be integers" in output


@pytest.mark.slow
def test_sigterm_with_a_library_call_stuck_ends_serve_within_its_shutdown_timeout(tmp_path, monkeypatch):
    import signal
    import threading
    import time
    import urllib.request

    from onnx import TensorProto, helper

    from hetero.bench.serving import serve

    graph = helper.make_graph([helper.make_node("Hang", ["x"], ["y"], domain="test.hang")], "hang",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    (tmp_path / "repo" / "hang" / "1").mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("test.hang", 1)]),
              tmp_path / "repo" / "hang" / "1" / "model.onnx")
    (tmp_path / "repo" / "hang" / "config.yaml").write_text("executors: [numpy]\ncpu_streams: 1\n")
    marker = tmp_path / "entered"
    monkeypatch.setenv("HANGING_KERNEL_MARKER", str(marker))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [12345.0]}]})
    with serve(tmp_path / "repo", "--import", "hanging_kernel", "--shutdown-timeout", "1") as server:
        request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v2/models/hang/infer",
                                         body.encode(), {"Content-Type": "application/json"})
        answers: list = []
        client = threading.Thread(target=lambda: answers.append(_status(request)), daemon=True)
        client.start()
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the request never reached the kernel"
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 1  # not 0: a library call was abandoned
        assert time.monotonic() - start < 10  # the shutdown timeout and exiting; not the kernel's minute
        client.join(10)
    assert answers and answers[0] in (503, 504, "disconnected")


def _status(request) -> int | str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return "disconnected"
