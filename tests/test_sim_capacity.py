"""Capacity what-if (`hetero capacity`) and the command line's --simulate: the combining model on
exact profiles, a prediction against a simulated pool, and the commands end to end."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

import hetero
from hetero.executors.sim_executor import ENVIRONMENT, simulate
from hetero.graph import example_feeds
from hetero.runtime.capacity import HOST_PART, Mix, ReplicaProfile, capacity, predict
from hetero.runtime.tuning import measure_rate
from hetero.zoo import small_cnn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "devices"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path))
    from hetero.executors import sim_executor

    sim_executor._references.clear_memory()
    yield tmp_path
    sim_executor._references.clear_memory()


def card(seconds: float, host_cpu: float = 0.001) -> ReplicaProfile:
    parts = {"sim:0 compute": seconds - 2 * host_cpu, "cpu -> sim:0": host_cpu, HOST_PART: host_cpu}
    return ReplicaProfile("card", "declared", seconds, host_cpu, host_cpu, parts)


def stream(seconds: float, cores: float) -> ReplicaProfile:
    return ReplicaProfile("stream", "measured", seconds, seconds * cores, seconds, {HOST_PART: seconds})


def test_replicas_add_up_while_the_cores_suffice():
    prediction = predict([card(0.02), card(0.02), stream(0.01, 1.0)], cores=2, servers=3)
    assert prediction.requests_per_s == pytest.approx(50 + 50 + 100)
    assert prediction.total_requests_per_s == pytest.approx(600)
    assert prediction.latency_s == 0.01 and prediction.stretch == 1.0
    assert prediction.bottleneck.startswith(HOST_PART) and "on stream" in prediction.bottleneck
    alone = predict([card(0.02)], cores=2)
    assert alone.bottleneck.startswith("sim:0 compute: 90% of a request")


def test_short_cores_stretch_the_host_share_of_every_request():
    """Two CPU replicas burning 1.5 cores each on 2 cores: the host parts stretch by 1.5x; a card
    beside them slows only by its host part."""
    prediction = predict([stream(0.01, 1.5), stream(0.01, 1.5), card(0.02)], cores=2)
    assert prediction.host_demand == pytest.approx(3.0 + 0.05)
    s = prediction.stretch
    assert 2 * 0.015 / (0.01 * s) + 0.001 / (0.02 + 0.001 * (s - 1)) == pytest.approx(2.0, rel=1e-6)
    assert prediction.requests_per_s == pytest.approx(2 / (0.01 * s) + 1 / (0.02 + 0.001 * (s - 1)))
    assert prediction.bottleneck.startswith("the host CPU: the replicas would burn 3.05 of its 2 cores")


@pytest.mark.slow
def test_prediction_from_one_card_matches_a_pool_of_two():
    """One simulated card profiled alone predicts two of them, measured as a ReplicaPool."""
    cards = simulate({"devices": [{"like": "onnxruntime", "speed": 0.05, "count": 2, "overhead_us": 20_000}]})
    model = hetero.load(small_cnn())
    host = hetero.executors.resolve(["numpy"])
    prediction = capacity(model, Mix(cards, host), simulation_cpu=True)
    assert [r.source for r in prediction.replicas] == ["declared"] * 2
    assert prediction.replicas[0] is prediction.replicas[1]  # one profile for the kind
    assert prediction.bottleneck.startswith("sim:0 compute")
    pool = hetero.ReplicaPool.build(model, [[c, *host] for c in cards])
    rate = measure_rate(pool, example_feeds(model), 1.0)
    pool.close()
    assert prediction.requests_per_s == pytest.approx(rate, rel=0.25)


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """The command line, with --simulate undone afterwards (it sets the environment of the process)."""
    from hetero.cli import app

    monkeypatch.delenv(ENVIRONMENT, raising=False)
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "240"})
        return result.exit_code, result.output

    yield invoke, path
    monkeypatch.delenv(ENVIRONMENT, raising=False)
    hetero.executors.libraries(refresh=True)


def test_cli_simulate_lists_and_runs_simulated_devices(cli):
    invoke, model = cli
    code, output = invoke("devices", "--simulate", EXAMPLES / "two-cards.yaml")
    assert code == 0, output
    assert "sim@sim:0" in output and "sim@sim:1" in output and "sim@cpu" in output
    assert "simulated card: onnxruntime@cpu x0.8" in output and "sim:0 -> sim:1 (25 GB/s" in output
    code, output = invoke("run", model, "--simulate", EXAMPLES / "two-cards.yaml", "-e", "sim,numpy",
                          "--repeat", "2")
    assert code == 0, output
    assert "sim@sim:0" in output and "sim@sim:0 (simulated): 3 partitions" in output
    code, output = invoke("run", model, "--simulate", EXAMPLES / "a100.yaml")
    assert code == 2 and "needs 'like' and 'speed' to be simulated" in output


def test_cli_capacity_names_the_bottleneck(cli, tmp_path):
    invoke, model = cli
    devices = tmp_path / "devices.json"  # cards of 20 ms a request: their compute is the bottleneck
    devices.write_text('{"devices": [{"like": "onnxruntime", "speed": 0.1, "count": 4, '
                       '"overhead_us": 20000}]}')
    code, output = invoke("capacity", model, "--devices", devices, "-e", "numpy", "--servers", "3")
    assert code == 0, output
    assert "4 x sim@sim:0" in output and "declared (simulated)" in output
    assert "requests/s on one server" in output and "on 3;" in output
    assert "bottleneck: sim:0 compute" in output


def test_one_devices_file_sketches_and_simulates():
    from hetero.planner.described import load_described

    described, profiles = load_described(EXAMPLES / "two-cards.yaml")
    assert [e.name for e in described] == ["sim@cpu", "sim@sim:0", "sim@sim:1"]
    assert profiles["sim@sim:0"].link_ms == pytest.approx(0.01)
    sketch = hetero.planner.search(hetero.load(small_cnn()), described, profiles=profiles)[0]
    assert any(p.executor.name.startswith("sim@sim:") for p in sketch.plan.partitions)
    simulated = simulate(EXAMPLES / "two-cards.yaml")
    assert [e.name for e in simulated] == ["sim@sim:0", "sim@sim:1", "sim@cpu"]
    sketched, _ = load_described(EXAMPLES / "a100.yaml")
    assert [e.name for e in sketched] == ["torch@cuda:0"]
