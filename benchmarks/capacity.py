"""Capacity what-if against what can be measured here: predicted and measured requests per second.

    python benchmarks/capacity.py [--model mobilenet_v2] [--image 112] [--seconds 5]

For each configuration, `hetero.runtime.capacity` predicts the throughput from one profile per
kind of replica (measured alone, one request at a time), then the same replicas are built as a
ReplicaPool and measured with the queue kept full. Configurations: CPU streams 1 and 2, PoCL's
OpenCL device beside one CPU replica, and 1, 2 and 4 simulated cards (figures from simulated
cards are labelled so; their predictions count the host CPU the simulation burns computing their
values, as the measurement does). Target: every prediction within 15% of the measurement.
"""

from __future__ import annotations

import argparse

import hetero
from hetero import executors, zoo
from hetero.executors.sim_executor import simulate
from hetero.graph import example_feeds
from hetero.runtime.capacity import Mix, capacity
from hetero.runtime.tuning import measure_rate

#: Simulated cards slow enough to be mostly sleep, so four of them fit on two cores honestly.
CARDS = {"devices": [{"like": "onnxruntime", "speed": 0.05, "count": 4, "overhead_us": 100,
                      "link_gbs": 12, "link_us": 10}]}


def configurations() -> list[tuple[str, Mix]]:
    host = executors.resolve(["onnxruntime", "numpy"])
    found = [("CPU, 1 stream", Mix([], host, 1)), ("CPU, 2 streams", Mix([], host, 2))]
    opencl = [e for e in executors.available() if e.library == "opencl"]
    if opencl:
        device = opencl[0].info().device_name.split(" (")[0]
        found.append((f"{device} (OpenCL) + CPU", Mix(opencl[:1], host, 1)))
    cards = simulate(CARDS)
    found += [(f"{k} simulated card{'s' * (k > 1)}", Mix(cards[:k], host, 0)) for k in (1, 2, 4)]
    return found


def settle(model: hetero.Model, card: hetero.executors.Executor, runs: int = 30) -> None:
    """Run a simulated card until its library's reference time has settled (a fastest run seen on
    a busy host lowers it), so the profile and the measurement see the same declared times."""
    session = hetero.compile(model, [card, "numpy"])
    feeds = example_feeds(model)
    for _ in range(runs):
        session.run(feeds)


def measured(model: hetero.Model, mix: Mix, seconds: float) -> float:
    replicas = [[card, *mix.host] for card in mix.cards] + ([mix.host] if mix.cpu_streams else [])
    pool = hetero.ReplicaPool.build(model, replicas, cpu_streams=mix.cpu_streams or 1)
    try:
        return measure_rate(pool, example_feeds(model), seconds)
    finally:
        pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "resnet50", "small_cnn"])
    parser.add_argument("--image", type=int, default=112)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    model = hetero.load(getattr(zoo, args.model)(image=args.image), name=f"{args.model} {args.image}px")
    print(f"{model.label}, {executors.default_threads()} cores; predicted from one profile per kind of "
          f"replica, measured with the queue full for {args.seconds:g} s")
    print("| configuration | predicted req/s | measured req/s | predicted / measured | bottleneck |")
    print("|---|---|---|---|---|")
    ratios = []
    found = configurations()
    settle(model, found[-1][1].cards[0])
    for name, mix in found:
        prediction = capacity(model, mix, simulation_cpu=True)  # the simulation itself is measured
        rate = measured(model, mix, args.seconds)
        ratios.append(prediction.requests_per_s / rate)
        print(f"| {name} | {prediction.requests_per_s:.1f} | {rate:.1f} | {ratios[-1]:.2f} | "
              f"{prediction.bottleneck} |", flush=True)
    within = sum(abs(r - 1) <= 0.15 for r in ratios)
    print(f"\n{within} of {len(ratios)} predictions within 15% of the measurement")


if __name__ == "__main__":
    main()
