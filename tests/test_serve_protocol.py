"""Every Open Inference Protocol datatype through `hetero serve`, end to end with unmodified tritonclient
(HTTP JSON, HTTP binary, gRPC raw, gRPC typed contents), its range limits refused by name, BYTES
tensors, big JSON bodies parsed outside Python lists, statistics, and what clients must never see."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from hetero.bench.serving import identity_repository, json_infer_body, memory_kib, reset_peak, serve
from hetero.serve import Server
from hetero.serve.protocol import DATATYPES

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

ONNX_TYPES = {"BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
              "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
              "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
              "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
              "BYTES": TensorProto.STRING}
TYPED = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
         "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
         "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
         "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}  # FP16: raw only


def _identity_all(datatypes: list[str]) -> onnx.ModelProto:
    """One Identity per datatype: in_<DATATYPE> [n] -> out_<DATATYPE> [n]."""
    def tensors(prefix: str) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info(f"{prefix}_{t}", ONNX_TYPES[t], ["n"]) for t in datatypes]
    graph = helper.make_graph([helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in datatypes],
                              "identities", tensors("in"), tensors("out"))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(root: Path, name: str, model: onnx.ModelProto, config: str = "executors: [onnxruntime]\n"
          "cpu_streams: 1\n") -> None:
    (root / name / "1").mkdir(parents=True)
    onnx.save(model, root / name / "1" / "model.onnx")
    (root / name / "config.yaml").write_text(config)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("types")
    _save(root, "all_types", _identity_all(list(ONNX_TYPES)))
    _save(root, "typed", _identity_all(list(TYPED)))  # every datatype with gRPC typed contents
    identity_repository(root, "big")
    with Server(root, http_port=0, grpc_port=0, max_request_bytes=64 << 20) as running:
        yield running


def _extremes() -> dict[str, np.ndarray]:
    """Each datatype's edge values (a 3-element tensor each)."""
    values: dict[str, np.ndarray] = {}
    for name, dtype in DATATYPES.items():
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            values[name] = np.array([info.min, info.max, 7], dtype)
        elif dtype.kind == "f":
            values[name] = np.array([np.finfo(dtype).min, np.finfo(dtype).max, -0.5], dtype)
        elif dtype.kind == "b":
            values[name] = np.array([True, False, True])
        else:
            values[name] = np.array(["", "héllo wörld", "x" * 300], dtype=object)
    return values


def _check_outputs(result, values: dict[str, np.ndarray]) -> None:
    for name, expected in values.items():
        got = result.as_numpy(f"out_{name}")
        if name == "BYTES":
            assert [x.decode() if isinstance(x, bytes) else x for x in got] == list(expected)
        else:
            assert got.dtype == expected.dtype, name
            np.testing.assert_array_equal(got, expected, err_msg=name)


@pytest.mark.parametrize("binary", [False, True])
def test_every_datatype_over_http(server: Server, binary: bool) -> None:
    values = _extremes()
    client = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    inputs = []
    for name, array in values.items():
        inputs.append(tritonhttp.InferInput(f"in_{name}", [3], name))
        inputs[-1].set_data_from_numpy(array, binary_data=binary)
    outputs = [tritonhttp.InferRequestedOutput(f"out_{name}", binary_data=binary) for name in values]
    _check_outputs(client.infer("all_types", inputs, outputs=outputs), values)
    client.close()


def test_every_datatype_over_grpc(server: Server) -> None:
    values = _extremes()
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    inputs = []
    for name, array in values.items():
        inputs.append(tritongrpc.InferInput(f"in_{name}", [3], name))
        inputs[-1].set_data_from_numpy(array)
    _check_outputs(client.infer("all_types", inputs), values)
    client.close()


def _typed_request(values: dict[str, np.ndarray]) -> service_pb2.ModelInferRequest:
    """A ModelInfer request for the `typed` model with each array in its datatype's typed contents."""
    request = service_pb2.ModelInferRequest(model_name="typed")
    for name, array in values.items():
        tensor = request.inputs.add(name=f"in_{name}", datatype=name, shape=array.shape)
        getattr(tensor.contents, TYPED[name]).extend([x.encode() for x in array] if name == "BYTES"
                                                     else array.tolist())
    return request


def test_grpc_typed_contents_every_datatype(server: Server) -> None:
    import grpc

    values = {name: array for name, array in _extremes().items() if name in TYPED}
    request = _typed_request(values)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request)
        result = tritongrpc.InferResult(response)
        _check_outputs(result, values)
        fp16 = service_pb2.ModelInferRequest(model_name="all_types")
        fp16.inputs.add(name="in_FP16", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(fp16)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'in_FP16'" in caught.value.details() and "raw_input_contents" in caught.value.details()


def _non_finite() -> dict[str, np.ndarray]:
    """`_extremes`, but NaN, infinity and -infinity for the float datatypes."""
    return {name: np.array([np.nan, np.inf, -np.inf], array.dtype) if array.dtype.kind == "f" else array
            for name, array in _extremes().items()}


@pytest.mark.parametrize("binary", [False, True])
def test_nan_and_infinity_round_trip_over_http(server: Server, binary: bool) -> None:
    """As Triton: NaN, Infinity and -Infinity written in JSON (not null), read back by tritonclient."""
    values = _non_finite()
    client = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    inputs = [tritonhttp.InferInput(f"in_{name}", [3], name).set_data_from_numpy(array, binary_data=binary)
              for name, array in values.items()]
    outputs = [tritonhttp.InferRequestedOutput(f"out_{name}", binary_data=binary) for name in values]
    _check_outputs(client.infer("all_types", inputs, outputs=outputs), values)
    client.close()
    body = {"inputs": [{"name": f"in_{name}", "datatype": name, "shape": [3], "data": array.tolist()}
                       for name, array in values.items()]}
    response = httpx.post(f"http://127.0.0.1:{server.http_port}/v2/models/all_types/infer",
                          content=json.dumps(body))  # Python writes NaN, Infinity and -Infinity too
    assert response.status_code == 200, response.text
    data = {output["name"]: output["data"] for output in json.loads(response.text)["outputs"]}
    assert b"null" not in response.content
    for name in ("FP16", "FP32", "FP64"):
        assert str(data[f"out_{name}"]) == "[nan, inf, -inf]"


def test_nan_and_infinity_over_grpc_raw_and_typed_contents(server: Server) -> None:
    import grpc

    values = _non_finite()
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    inputs = [tritongrpc.InferInput(f"in_{name}", [3], name).set_data_from_numpy(array)
              for name, array in values.items()]
    _check_outputs(client.infer("all_types", inputs), values)
    client.close()
    typed = {name: array for name, array in values.items() if name in TYPED}
    request = _typed_request(typed)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        _check_outputs(tritongrpc.InferResult(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request)), typed)


def test_big_json_data_with_nan_and_infinity_parsed_in_chunks(server: Server) -> None:
    values = np.random.default_rng(1).standard_normal(300_000)
    values[::1000], values[1::1000], values[2::1000] = np.nan, np.inf, -np.inf
    tensor = {"name": "x", "datatype": "FP32", "shape": [300_000], "data": values.tolist()}
    binary = [{"name": "y", "parameters": {"binary_data": True}}]
    body = json.dumps({"inputs": [tensor], "outputs": binary}).encode()
    assert len(body) > 3 << 20 and b"-Infinity" in body  # several chunks
    response = _post_big(server.http_port, body)
    assert response.status_code == 200, response.text[:300]
    head = int(response.headers["Inference-Header-Content-Length"])
    answer = np.frombuffer(response.content[head:], np.float32)
    np.testing.assert_array_equal(answer, values.astype(np.float32))


OUT_OF_RANGE = [  # (datatype, JSON data, words the error must carry besides the input's name)
    ("INT8", [300], "outside INT8's range -128..127"), ("UINT8", [-1], "outside UINT8's range"),
    ("UINT8", [256], "outside UINT8's range 0..255"), ("INT16", [40000], "outside INT16's range"),
    ("UINT32", [2 ** 32], "outside UINT32's range"), ("INT64", [2 ** 63], "outside INT64's range"),
    ("UINT64", [2 ** 64], "outside UINT64's range"), ("UINT64", [-1], "outside UINT64's range"),
    ("FP16", [70000.0], "outside FP16's range"), ("FP32", [1e39], "outside FP32's range"),
    ("INT32", [1.5], "INT32 data must be integers, got 1.5"), ("INT32", ["7"], "must be integers, got '7'"),
    ("UINT64", [2.0 ** 64], "outside UINT64's range"), ("INT64", [1, True], "must be integers, got True"),
    ("FP32", [1.0, False], "must be numbers, got False"),
    ("FP64", ["x"], "must be numbers, got 'x'"), ("INT8", [True], "must be integers, got True"),
    ("BOOL", [1], "BOOL data must be true or false, got 1"), ("BYTES", [1], "BYTES data must be strings"),
    ("INT32", [float("nan")], "INT32 data must be integers, got nan"),
    ("UINT8", [float("inf")], "UINT8 data must be integers, got inf"),
    ("INT64", [1, float("-inf")], "must be integers, got -inf"), ("BOOL", [float("nan")], "true or false"),
]


@pytest.mark.parametrize(("datatype", "data", "words"), OUT_OF_RANGE)
def test_json_values_outside_the_datatype_are_refused(server: Server, datatype: str, data: list,
                                                      words: str) -> None:
    inputs = [{"name": f"in_{t}", "datatype": t, "shape": [1],
               "data": data if t == datatype else ["a"] if t == "BYTES" else [False] if t == "BOOL" else [0]}
              for t in ONNX_TYPES]
    response = httpx.post(f"http://127.0.0.1:{server.http_port}/v2/models/all_types/infer",
                          content=json.dumps({"inputs": inputs}))  # NaN and Infinity as Python writes them
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert f"input 'in_{datatype}'" in error and words in error, error


@pytest.mark.parametrize(("datatype", "values", "words"), [
    ("UINT8", [300], "outside UINT8's range"), ("INT8", [-200], "outside INT8's range"),
    ("UINT16", [70000], "outside UINT16's range"), ("INT16", [-40000], "outside INT16's range")])
def test_grpc_typed_values_outside_the_datatype_are_refused(server: Server, datatype: str, values: list,
                                                            words: str) -> None:
    import grpc

    request = service_pb2.ModelInferRequest(model_name="typed")
    for name in TYPED:
        tensor = request.inputs.add(name=f"in_{name}", datatype=name, shape=[1])
        getattr(tensor.contents, TYPED[name]).extend(
            values if name == datatype else [b"a"] if name == "BYTES" else [False] if name == "BOOL" else [0])
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel, \
            pytest.raises(grpc.RpcError) as caught:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"input 'in_{datatype}'" in caught.value.details() and words in caught.value.details()


def _post_big(port: int, body: bytes) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v2/models/big/infer", content=body, timeout=60)


def test_big_json_data_parsed_in_chunks_as_exactly_as_small(server: Server) -> None:
    """Long numeric arrays are cut out of the JSON and parsed a chunk at a time; the result must be what
    the plain JSON parse gives, values and errors alike."""
    values = np.random.default_rng(0).standard_normal(300_000).astype(np.float32)
    tensor = {"name": "x", "datatype": "FP32", "shape": [300_000], "data": values.tolist()}
    body = json.dumps({"id": '"data": [1, 2]', "inputs": [tensor],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    assert len(body) > 3 << 20  # several chunks
    response = _post_big(server.http_port, body)
    assert response.status_code == 200, response.text[:300]
    head = int(response.headers["Inference-Header-Content-Length"])
    assert json.loads(response.content[:head])["id"] == '"data": [1, 2]'  # strings are never cut
    np.testing.assert_array_equal(np.frombuffer(response.content[head:], np.float32), values)
    text = ", ".join(["1"] * 100_000)
    for broken, words in [(text + ", 2e", "not valid JSON"), (text + ",", "not valid JSON"),
                          (text + ", 1e39", "outside FP32's range"), (text + ", [1]", "regular array"),
                          (text + ", true", "must be numbers, got True")]:
        body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [100001], "data": [' + \
            broken.encode() + b"]}]}"
        response = _post_big(server.http_port, body)
        assert response.status_code == 400 and words in response.json()["error"], (words, response.text[:300])
        assert "input 'x'" in response.json()["error"]


def test_statistics_as_tritonclient_reads_them(server: Server) -> None:
    http = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    grpc = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    before = http.get_inference_statistics("big")["model_stats"][0]
    tensor = tritonhttp.InferInput("x", [4], "FP32")
    tensor.set_data_from_numpy(np.ones(4, np.float32))
    for _ in range(3):
        http.infer("big", [tensor])
    with pytest.raises(InferenceServerException):
        http.infer("big", [tritonhttp.InferInput("x", [4], "FP32").set_data_from_numpy(np.ones(3,
                                                                                              np.float32))])
    stats = http.get_inference_statistics("big")["model_stats"][0]
    assert (stats["name"], stats["version"]) == ("big", "1")
    assert stats["inference_count"] - before["inference_count"] == 3
    assert stats["execution_count"] - before["execution_count"] == 3
    success, queue = stats["inference_stats"]["success"], stats["inference_stats"]["queue"]
    assert success["count"] - before["inference_stats"]["success"]["count"] == 3 and success["ns"] > 0
    assert queue["count"] >= 3 and stats["last_inference"] > 0
    batch = stats["batch_stats"][0]
    assert batch["batch_size"] == 1 and batch["compute_infer"]["count"] >= 3
    over_grpc = grpc.get_inference_statistics("big", "1").model_stats[0]
    assert over_grpc.inference_count == stats["inference_count"]
    assert over_grpc.inference_stats.success.count == success["count"]
    everything = {(m["name"], m["version"]) for m in http.get_inference_statistics()["model_stats"]}
    assert {("big", "1"), ("all_types", "1"), ("typed", "1")} <= everything
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        http.get_inference_statistics("nope")
    http.close()
    grpc.close()


def test_clients_learn_nothing_of_the_host(server: Server, tmp_path: Path) -> None:
    """Unknown models are answered alike whatever the name, without listing the others; names are
    checked before the file system; errors about the repository carry no absolute path."""
    import grpc as grpclib

    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    answers = []
    for name in ("/etc", "/nonexistent", "../../etc", "all_types/../big"):
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata(name)
        message = caught.value.message().replace(repr(name), "NAME").replace("'<path>'", "NAME")
        answers.append((caught.value.status(), message))
    assert len(set(answers)) == 1 and answers[0][0] == "StatusCode.NOT_FOUND", answers
    assert "all_types" not in answers[0][1] and "big" not in answers[0][1]
    with pytest.raises(InferenceServerException, match="has no model"):
        client.load_model("/etc")
    response = httpx.get(f"http://127.0.0.1:{server.http_port}/v2/models/nope/ready")
    assert response.status_code == 404 and "all_types" not in response.text
    client.close()
    bad = tmp_path / "broken" / "1"
    bad.mkdir(parents=True)
    (bad / "model.onnx").write_bytes(b"not onnx")
    (tmp_path / "broken" / "config.yaml").write_text("max_batch_size: [")
    (tmp_path / "noversions").mkdir()
    with Server(tmp_path, http_port=0, grpc_port=0) as other:
        index = httpx.post(f"http://127.0.0.1:{other.http_port}/v2/repository/index").json()
        load = httpx.post(f"http://127.0.0.1:{other.http_port}/v2/repository/models/noversions/load")
        with grpclib.insecure_channel(f"127.0.0.1:{other.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpclib.RpcError) as caught:
                stub.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(model_name="broken"))
    texts = [json.dumps(index), load.text, caught.value.details()]
    assert load.status_code == 400 and "no version folder" in load.text
    assert "broken/config.yaml" in texts[0] and "YAML" in texts[0]
    for text in texts:
        assert str(tmp_path) not in text and not re.search(r"(^|[\s'\"])/(tmp|home|root|usr)/", text), text


def test_one_big_json_request_in_bounded_memory_while_live(tmp_path: Path) -> None:
    """`hetero serve` in a process of its own: a 50 MB JSON request costs at most 6x its size in peak
    RSS, and /v2/health/live answers while it is parsed."""
    body = json_infer_body(52_000_000)
    with serve(identity_repository(tmp_path, "big")) as server:
        port = server.http_port
        rss = memory_kib(server.pid)
        reset_peak(server.pid)
        live: list[float] = []
        done = threading.Event()

        def probe() -> None:
            while not done.is_set():
                start = time.perf_counter()
                assert httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=30).status_code == 200
                live.append(time.perf_counter() - start)
                time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            response = httpx.post(f"http://127.0.0.1:{port}/v2/models/big/infer", content=body, timeout=120)
        finally:
            done.set()
            prober.join()
        assert response.status_code == 200, response.text[:300]
        peak = memory_kib(server.pid, "VmHWM")
    assert (peak - rss) * 1024 <= 6 * len(body), (peak - rss, len(body) // 1024)
    assert max(live) < 2.0, max(live)  # was 7.7 s for a 57 MiB body when parsed on the event loop
