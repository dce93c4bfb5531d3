"""Conformance: schemathesis sends `hetero serve` requests generated from the Open Inference
Protocol's own OpenAPI file (tests/data/open_inference_protocol, see its PROVENANCE.md) and checks
that none gets a server error and every documented answer matches the spec's schema.

Half the cases name a real model, so generated inference bodies reach the tensor decoding too.
Bounded: `max_examples` per endpoint. Run more with `HETERO_SCHEMATHESIS_EXAMPLES=2000`.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
import yaml
from hypothesis import HealthCheck, settings
from onnx import TensorProto, helper

from hetero.serve import Server

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error, response_schema_conformance  # noqa: E402

SPEC = Path(__file__).parent / "data" / "open_inference_protocol" / "open_inference_rest.yaml"
EXAMPLES = int(os.environ.get("HETERO_SCHEMATHESIS_EXAMPLES", "40"))


def _spec() -> dict:
    """The published file, its `${NAME}` path parameters written as OpenAPI's `{NAME}`."""
    raw = yaml.safe_load(SPEC.read_text())
    raw["paths"] = {path.replace("${", "{"): item for path, item in raw["paths"].items()}
    return raw


schema = schemathesis.openapi.from_dict(_spec())


def _example_model() -> onnx.ModelProto:
    """The spec's own example request: input0 UINT32 [2, 2], input1 BOOL [3]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input0"], ["output0"]),
         helper.make_node("Not", ["input1"], ["output1"])],
        "example", [helper.make_tensor_value_info("input0", TensorProto.UINT32, [2, 2]),
                    helper.make_tensor_value_info("input1", TensorProto.BOOL, [3])],
        [helper.make_tensor_value_info("output0", TensorProto.UINT32, [2, 2]),
         helper.make_tensor_value_info("output1", TensorProto.BOOL, [3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("conformance")
    (root / "example" / "1").mkdir(parents=True)
    onnx.save(_example_model(), root / "example" / "1" / "model.onnx")
    (root / "example" / "config.yaml").write_text("executors: [numpy]\ncpu_streams: 1\n")
    with Server(root, http_port=0, grpc_port=0) as server:
        yield f"http://127.0.0.1:{server.http_port}"


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_open_inference_protocol(case, base_url: str) -> None:
    parameters = case.path_parameters or {}
    if "MODEL_NAME" in parameters and len(parameters["MODEL_NAME"]) % 2 == 0:
        case.path_parameters = {**parameters, "MODEL_NAME": "example", "MODEL_VERSION": "1"}
    case.call_and_validate(base_url=base_url, checks=[not_a_server_error, response_schema_conformance])


def test_example_request_is_answered(base_url: str) -> None:
    """The spec's example request (its input1 has one value for shape [3], so it is refused naming it),
    and the same with three values, answered."""
    import httpx

    example = _spec()["components"]["schemas"]["inference_request"]["x-examples"]["Example 1"]
    response = httpx.post(f"{base_url}/v2/models/example/infer", json=example)
    assert response.status_code == 400 and "'input1'" in response.json()["error"], response.text
    example["inputs"][1]["data"] = [True, False, True]
    del example["outputs"]  # the example asks for output0 only
    answer = httpx.post(f"{base_url}/v2/models/example/infer", json=example).json()
    assert answer["id"] == "42"
    assert [(o["name"], o["data"]) for o in answer["outputs"]] == [("output0", [1, 2, 3, 4]),
                                                                   ("output1", [False, True, False])]
