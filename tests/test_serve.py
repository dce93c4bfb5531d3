"""`hetero serve`: the real server on loopback, driven by unmodified tritonclient (HTTP and gRPC) and
by raw httpx / sockets for the requests tritonclient will not send."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import hetero
from hetero import zoo
from hetero.errors import ModelError
from hetero.serve import ModelConfig, Server

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

DELAY = {"seconds": 0.0}  # how long the sleepy model's kernel sleeps; 0 while models warm up


@hetero.kernel("test.serve", "Sleep")
def _sleep(x: np.ndarray) -> np.ndarray:
    time.sleep(DELAY["seconds"])
    return x + 1


def _sleepy() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Sleep", ["x"], ["y"], domain="test.serve")], "sleepy",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("test.serve", 1)])


def _model(root: Path, name: str, versions: dict[str, onnx.ModelProto], config: str) -> None:
    for version, proto in versions.items():
        (root / name / version).mkdir(parents=True)
        onnx.save(proto, root / name / version / "model.onnx")
    (root / name / "config.yaml").write_text(config)


CNN = {version: zoo.with_dynamic_batch(zoo.small_cnn(seed=int(version))) for version in ("1", "2")}
ONE_STREAM = "executors: [onnxruntime]\ncpu_streams: 1\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    _model(root, "cnn", CNN, ONE_STREAM + "version_policy: all\nmax_batch_size: 16\n"
           "dynamic_batching: {max_queue_delay_microseconds: 20000, preferred_batch_size: [16]}\n")
    _model(root, "spare", {"1": zoo.small_cnn()}, ONE_STREAM)
    _model(root, "heads", {"1": zoo.detector_head()}, ONE_STREAM)
    _model(root, "sleepy", {"1": _sleepy()}, "executors: [numpy]\ncpu_streams: 1\nmax_queue_size: 1\n")
    (root / "bad" / "1").mkdir(parents=True)
    (root / "bad" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    _model(root, "misconfigured", {"1": zoo.small_cnn()}, "max_batch_size: 4\n")  # static batch dim
    return root


@pytest.fixture(scope="module")
def server(repo: Path):
    with Server(repo, http_port=0, grpc_port=0, max_request_bytes=1 << 20, body_timeout_s=1.0) as running:
        yield running


@pytest.fixture
def http(server: Server):
    client = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.http_port}", concurrency=16)
    yield client
    client.close()


@pytest.fixture
def grpc(server: Server):
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


@pytest.fixture
def raw(server: Server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=10) as client:
        yield client


def _images(batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def _expected(version: str, images: np.ndarray) -> np.ndarray:
    return hetero.compile(CNN[version], ["onnxruntime"]).run({"images": images})["logits"]


def _http_input(images: np.ndarray, binary: bool = True):
    tensor = tritonhttp.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def _executions(raw: httpx.Client, model: str, version: str) -> float:
    text = raw.get("/metrics").text
    found = re.search(rf'hetero_model_executions_total{{model="{model}",version="{version}"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_health_and_metadata(http, grpc, tmp_path: Path) -> None:
    assert http.is_server_live() and grpc.is_server_live()
    assert not http.is_server_ready() and not grpc.is_server_ready()  # 'bad' and 'misconfigured' failed
    _model(tmp_path, "spare", {"1": zoo.small_cnn()}, ONE_STREAM)
    with Server(tmp_path, http_port=0, grpc_port=0) as healthy:
        assert tritonhttp.InferenceServerClient(f"127.0.0.1:{healthy.http_port}").is_server_ready()
        assert tritongrpc.InferenceServerClient(f"127.0.0.1:{healthy.grpc_port}").is_server_ready()
        healthy.repository.unload("spare")  # unloaded on request: still ready
        assert tritonhttp.InferenceServerClient(f"127.0.0.1:{healthy.http_port}").is_server_ready()
    assert "binary_tensor_data" in http.get_server_metadata()["extensions"]
    assert "model_repository" in grpc.get_server_metadata().extensions
    meta = http.get_model_metadata("cnn")
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert list(grpc.get_model_metadata("cnn", "1").inputs[0].shape) == [-1, 3, 32, 32]
    config = http.get_model_config("cnn")
    assert config["max_batch_size"] == 16 and config["input"][0]["dims"] == [3, 32, 32]
    assert grpc.get_model_config("cnn").config.dynamic_batching.max_queue_delay_microseconds == 20000
    assert http.is_model_ready("cnn") and grpc.is_model_ready("cnn", "1")
    assert not http.is_model_ready("bad") and not grpc.is_model_ready("nope")


@pytest.mark.parametrize("version", ["1", "2", ""])
def test_infer_matches_session(http, grpc, version: str) -> None:
    images = _images(2)
    expected = _expected(version or "2", images)
    for binary in (True, False):
        result = http.infer("cnn", [_http_input(images, binary)], model_version=version,
                            outputs=[tritonhttp.InferRequestedOutput("logits", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
    tensor = tritongrpc.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = grpc.infer("cnn", [tensor], model_version=version)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
    assert result.get_response().model_version == (version or "2")


def test_requested_outputs(http, grpc) -> None:
    feeds = hetero.graph.example_feeds(hetero.load(zoo.detector_head()))
    expected = hetero.compile(zoo.detector_head(), ["onnxruntime"]).run(feeds)
    inputs = []
    for name, array in feeds.items():
        inputs.append(tritonhttp.InferInput(name, list(array.shape), "FP32"))
        inputs[-1].set_data_from_numpy(array, binary_data=False)
    scores = tritonhttp.InferRequestedOutput("scores", binary_data=False)
    result = http.infer("heads", inputs, outputs=[scores])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["scores"]
    np.testing.assert_allclose(result.as_numpy("scores"), expected["scores"], rtol=1e-5, atol=1e-6)
    result = http.infer("heads", inputs)  # all outputs, as binary data (tritonclient's default)
    np.testing.assert_allclose(result.as_numpy("boxes"), expected["boxes"], rtol=1e-5, atol=1e-6)
    tensors = []
    for name, array in feeds.items():
        tensors.append(tritongrpc.InferInput(name, list(array.shape), "FP32"))
        tensors[-1].set_data_from_numpy(array)
    result = grpc.infer("heads", tensors, outputs=[tritongrpc.InferRequestedOutput("boxes")])
    assert [o.name for o in result.get_response().outputs] == ["boxes"]
    np.testing.assert_allclose(result.as_numpy("boxes"), expected["boxes"], rtol=1e-5, atol=1e-6)


def test_grpc_typed_contents(server: Server) -> None:
    import grpc as grpclib
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    images = _images()
    request = service_pb2.ModelInferRequest(model_name="cnn", model_version="1")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=images.shape)
    tensor.contents.fp32_contents.extend(images.ravel().tolist())
    with grpclib.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    logits = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(response.outputs[0].shape)
    np.testing.assert_allclose(logits, _expected("1", images), rtol=1e-5, atol=1e-6)


def _request(data: list | None = None, **changes) -> dict:
    tensor = {"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32],
              "data": data if data is not None else _images().ravel().tolist()}
    return {"inputs": [{**tensor, **changes}]}


BAD_REQUESTS = [  # (what, path, body, headers, status, words the error must name)
    ("malformed JSON", "cnn", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("not an object", "cnn", b"[1, 2]", {}, 400, "JSON object"),
    ("no inputs field", "cnn", b"{}", {}, 400, "'inputs'"),
    ("wrong datatype", "cnn", _request(datatype="INT64"), {}, 400, "'images' has datatype FP32"),
    ("unknown datatype", "cnn", _request(datatype="FP33"), {}, 400, "FP33"),
    ("wrong shape", "cnn", _request(shape=[1, 3, 16, 64]), {}, 400, "dimension 2"),
    ("wrong rank", "cnn", _request(shape=[3, 32, 32, 1, 1]), {}, 400, "rank"),
    ("negative dim", "cnn", _request(shape=[-1, 3, 32, 32]), {}, 400, "shape"),
    ("data count", "cnn", _request(data=[1.0, 2.0]), {}, 400, "2 data elements"),
    ("strings as FP32", "cnn", _request(data=["a"] * 3072), {}, 400, "FP32 data must be numbers, got 'a'"),
    ("ragged data", "cnn", _request(data=[[1.0], [1.0, 2.0]]), {}, 400, "regular array"),
    ("missing input", "cnn", {"inputs": []}, {}, 400, "'images'"),
    ("extra input", "cnn", {"inputs": [*_request()["inputs"], {**_request()["inputs"][0], "name": "extra"}]},
     {}, 400, "no input 'extra'"),
    ("input twice", "cnn", {"inputs": _request()["inputs"] * 2}, {}, 400, "twice"),
    ("unknown output", "cnn", {**_request(), "outputs": [{"name": "boxes"}]}, {}, 400, "no output 'boxes'"),
    ("batch too big", "cnn", _request(data=[0.0] * 3072 * 17, shape=[17, 3, 32, 32]), {}, 400,
     "max_batch_size"),
    ("unknown model", "nope", _request(), {}, 404, "unknown model 'nope'"),
    ("rank 65", "cnn", _request(shape=[1] * 65), {}, 400, "rank 65"),
    ("nested beyond orjson's depth", "cnn", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 400,
     "not valid JSON"),
    ("data a string", "cnn", _request(data="abc"), {}, 400, "must be a list"),
    ("timeout not an integer", "cnn", {**_request(), "parameters": {"timeout": "soon"}}, {}, 400,
     "parameters.timeout"),
    ("unknown version", "cnn/versions/7", _request(), {}, 404, "no version '7'"),
    ("model not ready", "bad", _request(), {}, 503, "not ready"),
    ("header length not a number", "cnn", _request(), {"Inference-Header-Content-Length": "x"}, 400,
     "Inference-Header-Content-Length"),
    ("header length past the body", "cnn", _request(), {"Inference-Header-Content-Length": "999999"}, 400,
     "Inference-Header-Content-Length"),
]


def _binary(data: bytes, declared: int) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                   "parameters": {"binary_data_size": declared}}]}).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head))}


BINARY = _images().tobytes()
BAD_BINARY = [  # (what, body and headers, words the error must name)
    ("binary shorter than declared", _binary(BINARY[:100], len(BINARY)), "runs past the binary data"),
    ("binary longer than declared", _binary(BINARY + b"xx", len(BINARY)), "bytes of binary data after"),
    ("binary size wrong for shape", _binary(BINARY[:-4], len(BINARY) - 4), "binary data, but shape"),
]


def _check_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error, error


def test_bad_requests_then_valid(raw: httpx.Client, http) -> None:
    for what, path, body, headers, status, words in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = raw.post(f"/v2/models/{path}/infer", content=content, headers=headers)
        assert response.status_code == status, (what, response.text)
        assert words in response.json()["error"], (what, response.json())
    for what, (content, headers), words in BAD_BINARY:
        response = raw.post("/v2/models/cnn/infer", content=content, headers=headers)
        assert response.status_code == 400 and words in response.json()["error"], (what, response.text)
    _check_error(raw.post("/v2/models/cnn/infer", content=b"0" * (2 << 20)), 413, "exceeds the limit")
    _check_error(raw.get("/v2/nowhere"), 404, "/v2/nowhere")
    refused = raw.get("/v2/models/cnn/infer")
    _check_error(refused, 405, "Method Not Allowed")
    assert refused.headers["allow"] == "POST"
    result = http.infer("cnn", [_http_input(_images())])
    np.testing.assert_allclose(result.as_numpy("logits"), _expected("2", _images()), rtol=1e-5, atol=1e-6)


def _raw_http(server: Server, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request over a fresh socket, exactly as written (no client normalises its path)."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(("method", "path", "status", "words"), [
    ("POST", "/v2/models/c%6En/infer", 200, None),  # percent-encoded name: decoded, as FastAPI did
    ("POST", "/v2/models/cnn/versions/1/infer?x=1", 200, None),
    ("POST", "/v2/models//infer", 404, "POST /v2/models//infer: Not Found"),
    ("POST", "/v2/models/cnn/versions//infer", 404, "Not Found"),
    ("POST", "/v2/models/a%2Fb/infer", 404, "POST /v2/models/a/b/infer: Not Found"),
    ("POST", "/v2/models/../infer", 404, "unknown model '..'"),
    ("POST", "/v2/models/nope/infer", 404, "unknown model 'nope'"),  # naming no other model
    ("PUT", "/v2/models/cnn/infer", 405, "PUT /v2/models/cnn/infer: Method Not Allowed"),
    ("OPTIONS", "/v2/models/cnn/versions/1/infer", 405, "Method Not Allowed"),
    ("HEAD", "/v2/models/cnn/infer", 405, None),
    ("POST", "/v2/models/cnn/infer/", 307, None),  # FastAPI's redirect to the path without the slash
])
def test_infer_paths_answer_as_the_routed_app_did(server: Server, method: str, path: str, status: int,
                                                  words: str | None) -> None:
    """Inference requests skip FastAPI's router: odd paths and other methods still get its answers."""
    body = json.dumps(_request()).encode() if method in ("POST", "PUT") else b""
    code, headers, reply = _raw_http(server, f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert code == status, reply
    if status == 200:
        assert json.loads(reply)["outputs"][0]["shape"] == [1, 10]
    elif status == 405:
        assert headers["allow"] == "POST"
    elif status == 307:
        assert headers["location"].endswith("/v2/models/cnn/infer")
    if words is not None:
        error = json.loads(reply)["error"]
        assert words in error and "spare" not in error, error


def test_chunked_request_body(server: Server, raw: httpx.Client) -> None:
    body = json.dumps(_request()).encode()
    pieces = iter([body[:10], body[10:5000], body[5000:]])
    response = raw.post("/v2/models/cnn/versions/1/infer", content=pieces)  # no Content-Length: chunked
    assert response.request.headers["transfer-encoding"] == "chunked"
    logits = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(1, 10)
    np.testing.assert_allclose(logits, _expected("1", _images()), rtol=1e-5, atol=1e-6)


def test_internal_error_is_a_500_without_details(server: Server, raw: httpx.Client, grpc,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A bug of the server's own (not a Hetero error) answers a bare 500 / INTERNAL; the log has the
    traceback."""
    def crash(*_: object) -> None:
        raise KeyError("internal detail /etc/secret")
    monkeypatch.setattr(server.repository.get("cnn", "1"), "decode", crash)
    response = raw.post("/v2/models/cnn/versions/1/infer", content=json.dumps(_request()).encode())
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (KeyError); the server log has the details"}
    tensor = tritongrpc.InferInput("images", [1, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(_images())
    with pytest.raises(InferenceServerException) as caught:
        grpc.infer("cnn", [tensor], model_version="1")
    assert "StatusCode.INTERNAL" in caught.value.status() and "secret" not in caught.value.message()
    crashes = [r for r in caplog.records if r.getMessage() == "internal error"]
    assert len(crashes) == 2 and all(r.exc_info and r.exc_info[0] is KeyError for r in crashes)


def test_bad_grpc_requests(grpc) -> None:
    cases = [("nope", "FP32", _images(), "NOT_FOUND"), ("cnn", "INT64", _images().astype(np.int64),
             "INVALID_ARGUMENT"), ("cnn", "FP32", _images()[:, :2], "INVALID_ARGUMENT"),
             ("bad", "FP32", _images(), "UNAVAILABLE")]
    for model, datatype, array, code in cases:
        tensor = tritongrpc.InferInput("images", list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        with pytest.raises(InferenceServerException) as caught:
            grpc.infer(model, [tensor])
        assert code in caught.value.status(), (model, caught.value)
    tensor = tritongrpc.InferInput("images", [1, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(_images())
    assert grpc.infer("cnn", [tensor]).as_numpy("logits").shape == (1, 10)


def test_slow_client_gets_408(server: Server, http) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
        sock.sendall(b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inp")
        start = time.perf_counter()
        reply = b""
        while not reply.endswith(b"}") and (chunk := sock.recv(4096)):
            reply += chunk
        assert time.perf_counter() - start < 4
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408") and "not received within 1 s" in reply, reply
    assert http.is_server_live()


def test_dynamic_batching(http, raw: httpx.Client) -> None:
    images = [_images(1, seed) for seed in range(16)]
    before = _executions(raw, "cnn", "2")
    pending = [http.async_infer("cnn", [_http_input(x)]) for x in images]
    results = [p.get_result().as_numpy("logits") for p in pending]
    executions = _executions(raw, "cnn", "2") - before
    assert 1 <= executions < 16
    expected = _expected("2", np.concatenate(images))
    for index, result in enumerate(results):
        np.testing.assert_allclose(result, expected[index:index + 1], rtol=1e-4, atol=1e-5)
    text = raw.get("/metrics").text
    assert 'hetero_batch_size_bucket{le="16.0",model="cnn",version="2"}' in text
    assert "hetero_queue_duration_seconds_count" in text and "hetero_request_duration_seconds_bucket" in text
    assert re.search(r'hetero_inference_requests_total\{model="cnn",outcome="success",version="2"\} \d', text)
    assert re.search(r'hetero_device_busy_seconds_total\{resource="cpu[^"]*"\} [0-9.]+', text)


def test_api_key(server: Server, raw: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "api_key", "s3cret")
    body = json.dumps(_request()).encode()
    _check_error(raw.post("/v2/models/cnn/infer", content=body), 401, "API key")
    _check_error(raw.post("/v2/models/cnn/infer", content=body, headers={"api-key": "wrong"}), 401, "API key")
    _check_error(raw.post("/v2/repository/index"), 401, "API key")
    _check_error(raw.post("/v2/repository/models/spare/unload"), 401, "API key")
    _check_error(raw.get("/v2/models/cnn/ready"), 401, "API key")
    _check_error(raw.get("/v2/models/cnn/stats"), 401, "API key")
    assert raw.get("/v2/health/live").status_code == 200 and raw.get("/metrics").status_code == 200
    assert raw.get("/v2/health/ready").status_code == 503  # open, and says not ready ('bad' failed)
    assert raw.post("/v2/models/cnn/infer", content=body, headers={"api-key": "s3cret"}).status_code == 200
    assert raw.post("/v2/repository/index", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    assert client.is_server_live()
    for call in (client.get_model_repository_index, lambda: client.is_model_ready("cnn"),
                 lambda: client.get_inference_statistics("cnn")):
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            call()
    assert client.get_model_repository_index(headers={"authorization": "Bearer s3cret"}).models
    client.close()


def test_queue_limit(server: Server, raw: httpx.Client) -> None:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0] * 4}]})
    DELAY["seconds"] = 0.5
    try:
        with ThreadPoolExecutor(4) as threads:
            responses = list(threads.map(lambda _: raw.post("/v2/models/sleepy/infer", content=body),
                                         range(4)))
    finally:
        DELAY["seconds"] = 0.0
    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert "max_queue_size" in refused.json()["error"]
    assert raw.post("/v2/models/sleepy/infer", content=body).json()["outputs"][0]["data"] == [1.0] * 4


def test_repository_load_unload(http, grpc, raw: httpx.Client) -> None:
    index = {(m["name"], m["version"]): m for m in http.get_model_repository_index()}
    assert index["cnn", "1"]["state"] == "READY" and index["spare", "1"]["state"] == "READY"
    assert index["bad", "1"]["state"] == "UNAVAILABLE" and "not an ONNX model" in index["bad", "1"]["reason"]
    assert "dynamic dim 0" in index["misconfigured", "1"]["reason"]
    http.unload_model("spare")
    assert not http.is_model_ready("spare")
    with pytest.raises(InferenceServerException, match="not ready"):
        http.infer("spare", [_http_input(_images())])
    ready = raw.post("/v2/repository/index", json={"ready": True}).json()
    assert "cnn" in {m["name"] for m in ready} and "spare" not in {m["name"] for m in ready}
    assert ("spare", "1", "UNAVAILABLE") in {(m.name, m.version, m.state)
                                             for m in grpc.get_model_repository_index().models}
    grpc.load_model("spare")
    assert http.is_model_ready("spare")
    assert http.infer("spare", [_http_input(_images())]).as_numpy("logits").shape == (1, 10)
    with pytest.raises(InferenceServerException, match="not an ONNX model"):
        http.load_model("bad")
    with pytest.raises(InferenceServerException, match="no model 'ghost'"):
        grpc.load_model("ghost")


def test_shutdown_finishes_in_flight(tmp_path: Path) -> None:
    _model(tmp_path, "sleepy", {"1": _sleepy()}, "executors: [numpy]\ncpu_streams: 1\n")
    server = Server(tmp_path, http_port=0, grpc_port=0).start()
    http = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    grpc = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    x = np.zeros((1, 4), np.float32)
    http_input = tritonhttp.InferInput("x", [1, 4], "FP32")
    grpc_input = tritongrpc.InferInput("x", [1, 4], "FP32")
    http_input.set_data_from_numpy(x)
    grpc_input.set_data_from_numpy(x)
    DELAY["seconds"] = 0.5
    try:
        with ThreadPoolExecutor(2) as threads:
            in_flight = [threads.submit(http.infer, "sleepy", [http_input]),
                         threads.submit(grpc.infer, "sleepy", [grpc_input])]
            time.sleep(0.2)
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            results = [f.result(timeout=10).as_numpy("y") for f in in_flight]
            stopper.join(10)
    finally:
        DELAY["seconds"] = 0.0
    assert not stopper.is_alive()
    for result in results:
        np.testing.assert_array_equal(result, x + 1)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.http_port), timeout=1).close()
    http.close()
    grpc.close()


def test_config_errors(tmp_path: Path) -> None:
    for data, words in [({"max_batch": 4}, "unknown field 'max_batch'; fields are executors"),
                        ({"max_batch_size": -1}, "max_batch_size: Input should be greater than or equal"),
                        ({"max_batch_size": True}, "max_batch_size: Input should be a valid integer"),
                        ({"cpu_streams": 0}, "cpu_streams"), ({"executors": []}, "executors"),
                        ({"policy": "fastest"}, "policy: Input should be 'priority'"),
                        ({"dynamic_batching": {"delay": 1}}, "unknown field 'dynamic_batching.delay'"),
                        ({"replicas": [["numpy"]], "executors": ["numpy"]}, "not both"),
                        ({"dynamic_batching": {}}, "needs max_batch_size > 0"),
                        ({"max_batch_size": 4, "dynamic_batching": {"preferred_batch_size": [8]}}, "exceed"),
                        ({"version_policy": "newest"}, "version_policy"), ("x", "mapping")]:
        with pytest.raises(ModelError, match=re.escape(words)):
            ModelConfig.parse(data, "config.yaml")
    (tmp_path / "config.yaml").write_text("max_batch_size: [")
    with pytest.raises(ModelError, match="YAML"):
        ModelConfig.read(tmp_path / "config.yaml")
    assert ModelConfig.read(tmp_path / "missing.yaml") == ModelConfig()


def test_batcher_merges_only_equal_shapes() -> None:
    from hetero.runtime import ReplicaPool
    from hetero.serve.batcher import Batcher

    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "neg",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])])
    pool = ReplicaPool.build(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                             [["numpy"]], cpu_streams=1)
    batches: list[int] = []
    batcher = Batcher(pool, "neg", max_batch_size=8, delay_s=5.0, preferred=[4],
                      observe=lambda rows, waits, seconds: batches.append(rows))
    start = time.perf_counter()
    arrays = [np.full((1, 3 if i % 2 else 5), i, np.float32) for i in range(8)]
    futures = [batcher.submit({"x": a}, ["y"]) for a in arrays]
    results = [f.result(timeout=10)["y"] for f in futures]
    assert time.perf_counter() - start < 4  # each group reached the preferred size: no waiting the delay
    assert batches == [4, 4]
    for array, result in zip(arrays, results, strict=True):
        np.testing.assert_array_equal(result, -array)
    batcher.close()
