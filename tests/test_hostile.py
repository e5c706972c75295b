"""The service against hostile and careless clients, over real HTTP (one `bentoml serve` for the module).

Every bad request must get a 4xx ``{"error": "..."}`` quickly, nothing may be fetched that the service
did not choose to fetch, and the server's memory (all its processes) must stay bounded.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest
from PIL import Image
from servekit import start_service

from bench.launcher import Server
from corinfomax.serving.api.limits import MAX_HITS
from corinfomax.serving.index.backend import MAX_ANSWER_BYTES, MAX_METADATA_BYTES

pytestmark = pytest.mark.slow  # a server subprocess

REPO = Path(__file__).resolve().parents[1]
KEY = "hostile-key"
MAX_REQUEST = 4 << 20
BAD_INPUT_SECONDS = 10.0
BODY_SECONDS = 3  # the test server's body deadline (the default is 30 s)
DIM = 256


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("hostile")
    srv = start_service(root, model=str(tiny_bundle), demo_dir="", api_key=KEY, workers="2",
                        max_request_bytes=str(MAX_REQUEST), access_log="0", body_timeout_s=str(BODY_SECONDS))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def jpeg(cifar10: Path) -> bytes:
    return (cifar10 / "test" / "cat" / "0001.jpg").read_bytes()


class _Bait(http.server.BaseHTTPRequestHandler):
    """An HTTP server that counts requests: the service must never call it on a client's behalf."""

    hits = 0

    def do_GET(self) -> None:  # the name http.server calls
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"x" * 1000)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def bait() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Bait)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def server_rss(server: Server) -> int:
    """Resident memory of the server and all its workers, in bytes."""
    assert server.proc is not None
    root = psutil.Process(server.proc.pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, "PNG")
    return buffer.getvalue()


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def _json(body: str | bytes, content_type: str = "application/json") -> dict[str, Any]:
    return {"content": body.encode() if isinstance(body, str) else body, "headers": {"content-type": content_type}}


def _hostile(jpeg: bytes, bait: str) -> list[tuple[str, str, str, dict[str, Any], int]]:
    """(name, method, path, httpx arguments, expected status)."""
    vec = [0.1] * DIM
    b64 = base64.b64encode(jpeg).decode()
    form_fields = "&".join(f"f{i}=1" for i in range(10_000))
    big = _png((7000, 7000))  # 49 Mpx each: under the per-image limit, three are over the per-request one
    return [
        # images only through paths the service controls: text in a file field is never fetched
        ("URL in a file field", "POST", "/embed", {"files": {"images": (None, f"{bait}/a.jpg")}}, 400),
        ("file URL in a file field", "POST", "/embed", {"files": {"images": (None, "file:///etc/passwd")}}, 400),
        ("word in a file field", "POST", "/embed", {"files": {"images": (None, "hello")}}, 400),
        ("URL as the whole JSON body", "POST", "/embed", _json(f"{bait}/a.jpg"), 400),
        ("URL as a urlencoded file field", "POST", "/search", _json(f"images={bait}/a.jpg&k=1",
                                                                    "application/x-www-form-urlencoded"), 400),
        ("private URL", "POST", "/embed", {"json": {"urls": [f"{bait}/a.jpg"]}}, 400),
        ("gopher URL", "POST", "/embed", {"json": {"urls": ["gopher://127.0.0.1:70/"]}}, 400),
        ("URL with credentials to localhost", "POST", "/embed", {"json": {"urls": ["http://u:p@localhost/"]}}, 400),
        ("URL not a string", "POST", "/embed", {"json": {"urls": [{"href": "x"}]}}, 400),
        ("500 URLs (refused before fetching)", "POST", "/embed", {"json": {"urls": [f"{bait}/{i}" for i in
                                                                                     range(500)]}}, 400),
        # ids outside SQLite's range, or not ids
        ("id 2**63 get", "POST", "/get", {"json": {"id": 2**63}}, 400),
        ("id 2**64 delete", "POST", "/delete", {"json": {"ids": [2**64]}}, 400),
        ("id 2**63 search", "POST", "/search", {"json": {"ids": [2**63]}}, 400),
        ("id -1 search", "POST", "/search", {"json": {"ids": [-1]}}, 400),
        ("id 10**400", "POST", "/get", _json('{"id": 1' + "0" * 400 + "}"), 400),
        ("id as bool", "POST", "/delete", {"json": {"ids": [True]}}, 400),
        ("id as float", "POST", "/get", {"json": {"id": 1.5}}, 400),
        # broken bodies and content types
        ("multipart without boundary", "POST", "/embed", _json(b"--x\r\n", "multipart/form-data"), 400),
        ("JSON labelled multipart", "POST", "/search", _json('{"ids": [1]}', "multipart/form-data; boundary=zz"),
         400),
        ("10,000 form fields", "POST", "/embed", _json(form_fields, "application/x-www-form-urlencoded"), 400),
        ("1,000 file parts", "POST", "/embed", {"files": [("images", ("a.jpg", b"x", "image/jpeg"))] * 1000}, 400),
        ("pickle body", "POST", "/embed", _json(b"\x80\x04N.", "application/vnd.bentoml+pickle"), 415),
        ("unknown content type", "POST", "/embed", _json(b"\x00\x01", "application/x-weird"), 400),
        ("JSON array body", "POST", "/search", {"json": [1, 2]}, 400),
        ("JSON null body", "POST", "/search", _json("null"), 400),
        ("invalid UTF-8", "POST", "/search", _json(b'{"k": "\xff\xfe"}'), 400),
        ("number 1e999", "POST", "/search", _json('{"vectors": [[1e999]], "k": 1}'), 400),
        ("JSON nested 100,000 deep", "POST", "/add", _json('{"vectors": [[0.1]], "metadata": [' + _nested(100_000)
                                                           + "]}"), 400),
        ("image in a text field", "POST", "/add", {"files": [("images", ("a.jpg", jpeg, "image/jpeg")),
                                                             ("metadata", ("m.jpg", jpeg, "image/jpeg"))]}, 400),
        ("form metadata nested 100,000 deep", "POST", "/add",
         {"files": [("images", ("a.jpg", jpeg, "image/jpeg"))], "data": {"metadata": "[" + _nested(100_000) + "]"}},
         400),
        ("metadata nested 50 deep", "POST", "/add", _json('{"vectors": [[' + ",".join(["0.1"] * DIM) + ']], '
                                                          '"metadata": [' + _nested(50) + "]}"), 400),
        ("metadata over the size limit", "POST", "/add", {"json": {"vectors": [vec], "metadata": [
            {"blob": "x" * (MAX_METADATA_BYTES + 1)}]}}, 400),
        ("label of 10,000 characters", "POST", "/add", {"json": {"vectors": [vec], "labels": ["x" * 10_000]}}, 400),
        ("idempotency key of 10,000 characters", "POST", "/add", {"json": {"vectors": [vec],
                                                                           "idempotency_key": "k" * 10_000}}, 400),
        # sizes and counts
        ("body over the limit", "POST", "/embed", _json(b"x" * (MAX_REQUEST + 1)), 413),
        ("chunked body over the limit", "POST", "/embed", {"content": iter([b"x" * (1 << 20)] * 5),
                                                           "headers": {"content-type": "application/json"}}, 413),
        ("queries x k over the limit", "POST", "/search", {"json": {"vectors": [vec] * 20, "k": 1000}}, 400),
        ("kNN queries x neighbours over the limit", "POST", "/classify",
         {"json": {"images_b64": [b64] * 64, "method": "knn", "neighbours": 1000}}, 400),
        ("65 images", "POST", "/embed", {"json": {"images_b64": [b64] * 65}}, 400),
        ("pixel bomb PNG", "POST", "/embed", {"files": [("images", ("a.png", _png((20_000, 20_000)), "image/png"))]},
         413),
        ("images declaring 147 Mpx together", "POST", "/embed",
         {"files": [("images", ("a.png", big, "image/png"))] * 3}, 413),
        ("k as a word", "POST", "/search", {"json": {"vectors": [vec], "k": "ten"}}, 400),
        ("k = 10**30", "POST", "/search", {"json": {"vectors": [vec], "k": 10**30}}, 400),
        ("neighbours = -5", "POST", "/classify", {"json": {"images_b64": [b64], "method": "knn",
                                                           "neighbours": -5}}, 400),
        ("vectors of strings", "POST", "/search", {"json": {"vectors": [["a"] * DIM]}}, 400),
        ("ragged vectors", "POST", "/add", {"json": {"vectors": [vec, [0.1]]}}, 400),
        ("base64 of text", "POST", "/embed", {"json": {"images_b64": [base64.b64encode(b"hello").decode()]}}, 400),
        ("data URL of garbage", "POST", "/embed", {"json": {"images_b64": ["data:image/png;base64,!!!"]}}, 400),
        ("base64 not a string", "POST", "/embed", {"json": {"images_b64": [123]}}, 400),
        ("file part that is a PDF", "POST", "/embed", {"files": [("images", ("a.pdf", b"%PDF-1.4\n" * 50,
                                                                            "application/pdf"))]}, 400),
        # collections, models, jobs: names checked before any work, unknown ones named
        ("collection name with a slash", "POST", "/search", {"json": {"vectors": [vec], "collection": "../x"}}, 400),
        ("collection name of 65 characters", "POST", "/stats", {"json": {"collection": "a" * 65}}, 400),
        ("collection name with capitals", "POST", "/add", {"json": {"vectors": [vec], "collection": "Cats"}}, 400),
        ("unknown collection", "POST", "/stats", {"json": {"collection": "nope"}}, 404),
        ("unknown collection search", "POST", "/search", {"json": {"vectors": [vec], "collection": "nope"}}, 404),
        ("unknown collection delete", "POST", "/delete", {"json": {"ids": [1], "collection": "nope"}}, 404),
        ("unknown collection in the form", "POST", "/classify",
         {"files": [("images", ("a.jpg", jpeg, "image/jpeg"))], "data": {"collection": '"nope"'}}, 404),
        ("unknown model", "POST", "/embed", {"json": {"images_b64": [b64], "model": "nope"}}, 404),
        ("model name of 10,000 characters", "POST", "/embed", {"json": {"images_b64": [b64], "model": "m" * 10_000}},
         400),
        ("model name with a newline", "POST", "/embed", {"json": {"images_b64": [b64], "model": "a\nb"}}, 400),
        ("new collection with a bad name", "POST", "/create_collection", {"json": {"name": "a b", "model": "x"}}, 400),
        ("new collection of an unknown model", "POST", "/create_collection", {"json": {"name": "ok", "model": "x"}},
         404),
        ("new collection without a model", "POST", "/create_collection", {"json": {"name": "ok"}}, 400),
        ("dropping the default collection", "POST", "/drop_collection", {"json": {"name": "default"}}, 400),
        ("dropping an unknown collection", "POST", "/drop_collection", {"json": {"name": "nope"}}, 404),
        ("re-embed an unknown collection", "POST", "/reembed", {"json": {"collection": "nope", "model": "x"}}, 404),
        ("re-embed without a model", "POST", "/reembed", {"json": {"collection": "default"}}, 400),
        ("job id with a slash", "POST", "/jobs", {"json": {"job": "../../x"}}, 400),
        ("unknown job", "POST", "/jobs", {"json": {"job": "abc123"}}, 404),
        ("rollback without a previous generation", "POST", "/rollback", {"json": {"collection": "default"}}, 409),
        ("drop a generation there is not", "POST", "/drop_generation", {"json": {"collection": "default"}}, 409),
        ("thumbnail of an unknown collection", "GET", "/thumbnails/1?collection=nope", {}, 404),
        ("thumbnail with a bad collection name", "GET", "/thumbnails/1?collection=..%2Fx", {}, 400),
        ("reload_models given a path", "POST", "/reload_models", {"json": {"path": "/etc"}}, 400),
        # routes and methods
        ("unknown route", "POST", "/admin", {"json": {}}, 404),
        ("path traversal", "POST", "/embed/../../etc/passwd", {"json": {}}, 404),
        ("GET on an API", "GET", "/embed", {}, 405),
        ("PUT on an API", "PUT", "/add", {"json": {}}, 405),
        ("DELETE on an API", "DELETE", "/delete", {}, 405),
    ]


def test_hostile_requests_get_a_quick_4xx_json_error(client: httpx.Client, server: Server, jpeg: bytes,
                                                     bait: str) -> None:
    client.post("/embed", files={"images": ("a.jpg", jpeg, "image/jpeg")})  # warm up
    before = server_rss(server)
    failures = []
    for name, method, path, kwargs, status in _hostile(jpeg, bait):
        started = time.monotonic()
        try:
            resp = client.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            failures.append(f"{name}: {type(err).__name__} {err}")
            continue
        seconds = time.monotonic() - started
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code != status or not isinstance(body, dict) or not isinstance(body.get("error"), str) \
                or not body["error"] or seconds > BAD_INPUT_SECONDS:
            failures.append(f"{name}: {resp.status_code} in {seconds:.1f}s: {resp.text[:200]}")
    assert not failures, "\n".join(failures)
    assert _Bait.hits == 0, "the service fetched a URL it was only given as text in a file field"
    assert client.get("/readyz").status_code == 200
    grown = server_rss(server) - before
    assert grown < 200 << 20, f"server grew by {grown >> 20} MiB over the hostile requests"


def _type_mistakes() -> list[tuple[str, dict[str, Any], str]]:
    """(path, JSON body, the field the 400 must name): values of the wrong JSON type that lax parsing would
    convert (true -> 1, "10" -> 10, "0.5" -> 0.5) and so act on something the client did not name."""
    vec = [0.1] * DIM
    return [
        ("/delete", {"ids": [True]}, "ids"),
        ("/delete", {"ids": ["1"]}, "ids"),
        ("/delete", {"ids": [1.0]}, "ids"),
        ("/get", {"id": "1"}, "id"),
        ("/get", {"id": True}, "id"),
        ("/search", {"vectors": [vec], "k": "10"}, "k"),
        ("/search", {"vectors": [vec], "k": True}, "k"),
        ("/search", {"vectors": [vec], "k": 10.0}, "k"),
        ("/search", {"ids": [False]}, "ids"),
        ("/search", {"vectors": [["0.5"] * DIM]}, "vectors"),
        ("/search", {"vectors": [[True] * DIM]}, "vectors"),
        ("/classify", {"images_b64": ["eA=="], "method": "knn", "neighbours": "20"}, "neighbours"),
        ("/classify", {"images_b64": ["eA=="], "k": "3"}, "k"),
        ("/add", {"vectors": [vec], "labels": [7]}, "labels"),
        ("/add", {"vectors": [vec], "labels": [True]}, "labels"),
        ("/add", {"vectors": [vec], "metadata": ['{"a": 1}']}, "metadata"),
        ("/add", {"vectors": [vec], "metadata": [[["a", 1]]]}, "metadata"),
        ("/add", {"vectors": [vec], "idempotency_key": 12345}, "idempotency_key"),
        ("/delete", {"ids": [1], "idempotency_key": ["k"]}, "idempotency_key"),
        ("/embed", {"urls": "https://example.com/a.jpg"}, "urls"),
        ("/search", {"vectors": [vec], "collection": True}, "collection"),
        ("/stats", {"collection": 5}, "collection"),
        ("/embed", {"images_b64": ["eA=="], "model": ["m"]}, "model"),
        ("/create_collection", {"name": "ok", "model": "m", "keep_originals": "yes"}, "keep_originals"),
        ("/rollback", {"collection": "default", "allow_missing": 1}, "allow_missing"),
        ("/jobs", {"job": 5}, "job"),
    ]


def test_values_of_the_wrong_type_are_refused_naming_the_field(client: httpx.Client) -> None:
    failures = []
    for path, body, field in _type_mistakes():
        resp = client.post(path, json=body)
        error = resp.json().get("error", "") if resp.headers.get("content-type") == "application/json" else ""
        if resp.status_code != 400 or not re.search(rf"; {field}[.:]", error):  # pydantic's location, e.g. "ids.0:"
            failures.append(f"{path} {json.dumps(body)[:80]}: {resp.status_code} {resp.text[:200]}")
    assert not failures, "\n".join(failures)


def _unknown_fields(jpeg: bytes) -> list[tuple[str, dict[str, Any], set[str]]]:
    """(path, httpx arguments, the unknown fields the 400 must name): misspelt or invented options, each
    beside valid ones, in JSON bodies, multipart forms (text and file parts) and urlencoded forms."""
    vec = [0.1] * DIM
    b64 = base64.b64encode(jpeg).decode()
    image = [("images", ("a.jpg", jpeg, "image/jpeg"))]
    return [
        ("/search", {"json": {"ids": [1], "k": 3, "fitler": 1}}, {"fitler"}),
        ("/search", {"json": {"vectors": [vec], "top_k": 5}}, {"top_k"}),
        ("/embed", {"json": {"images_b64": [b64], "size": 64}}, {"size"}),
        ("/classify", {"json": {"images_b64": [b64], "method": "knn", "neighbors": 5}}, {"neighbors"}),
        ("/add", {"json": {"vectors": [vec], "label": ["cat"], "meta": [{}]}}, {"label", "meta"}),
        ("/delete", {"json": {"ids": [1], "key": "k1"}}, {"key"}),
        ("/get", {"json": {"id": 1, "ids": [1]}}, {"ids"}),
        ("/stats", {"json": {"verbose": True}}, {"verbose"}),
        ("/info", {"json": {"x": 1}}, {"x"}),
        ("/collections", {"json": {"x": 1}}, {"x"}),
        ("/reembed", {"json": {"collection": "default", "model": "m", "allowmissing": True}}, {"allowmissing"}),
        ("/search", {"files": image, "data": {"k": "3", "fitler": "1"}}, {"fitler"}),
        ("/embed", {"files": [("image", ("a.jpg", jpeg, "image/jpeg"))]}, {"image"}),  # the file part misnamed
        ("/classify", {"files": image, "data": {"neighbors": "5", "method": "knn"}}, {"neighbors"}),
        ("/add", {"files": image, "data": {"label": '["cat"]'}}, {"label"}),
        ("/search", {"content": b"ids=[1]&k=1&fitler=1",
                     "headers": {"content-type": "application/x-www-form-urlencoded"}}, {"fitler"}),
    ]


def test_unknown_fields_are_refused_naming_them(client: httpx.Client, jpeg: bytes) -> None:
    """A request with a field the endpoint does not take did something other than the client meant (the option
    silently ignored): a 400 naming each unknown field, for JSON, multipart and urlencoded bodies."""
    failures = []
    for path, kwargs, fields in _unknown_fields(jpeg):
        resp = client.post(path, **kwargs)
        error = resp.json().get("error", "") if resp.headers.get("content-type") == "application/json" else ""
        named = set(re.findall(r"; (\w+): unknown field", error))
        if resp.status_code != 400 or named != fields:
            failures.append(f"{path} {str(kwargs)[:80]}: {resp.status_code} {resp.text[:200]}")
    assert not failures, "\n".join(failures)
    image = {"images": ("a.jpg", jpeg, "image/jpeg")}  # the same requests without the stray fields still work
    assert client.post("/search", files=image, data={"k": "3"}).status_code == 200
    assert client.post("/stats", json={}).status_code == 200


def test_each_bad_request_is_one_log_line_without_a_traceback(client: httpx.Client, server: Server, jpeg: bytes,
                                                              bait: str) -> None:
    """An operator reads one line per client error, naming route, status and reason; tracebacks are for 5xx.
    (The server runs without the access log, which would add its own line per request.)"""
    cases = [(method, path, kwargs, status) for _, method, path, kwargs, status in _hostile(jpeg, bait)]
    cases += [("POST", path, {"json": body}, 400) for path, body, _ in _type_mistakes()]
    cases += [("POST", path, kwargs, 400) for path, kwargs, _ in _unknown_fields(jpeg)]
    start = server.log.stat().st_size
    for method, path, kwargs, _status in cases:
        client.request(method, path, **kwargs)
    deadline = time.monotonic() + 10
    while True:  # each line is written before its answer is sent; the file is shared by every worker
        text = server.log.read_bytes()[start:].decode("utf-8", "replace")
        logged = re.findall(r"\] (?:GET|POST|PUT|DELETE) \S* (\d{3}): \S", text)
        if len(logged) >= len(cases) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "Traceback" not in text
    assert sorted(map(int, logged)) == sorted(status for *_, status in cases)
    noisy = [line for line in text.splitlines() if "[WARNING]" in line or "[ERROR]" in line]
    assert not noisy, "\n".join(noisy[:5])
    assert re.search(r"\] POST /search 400: 1 validation error for Input; fitler: unknown field", text)


def test_form_fields_are_read_as_json_values(client: httpx.Client, jpeg: bytes) -> None:
    """A form's text is parsed as JSON: -F k=5 is the number 5, -F k='"5"' the string "5" (refused)."""
    image = {"images": ("a.jpg", jpeg, "image/jpeg")}
    assert client.post("/search", files=image, data={"k": "5"}).status_code == 200
    for k in ('"5"', "true", "5.0"):
        resp = client.post("/search", files=image, data={"k": k})
        assert resp.status_code == 400 and "; k: " in resp.json()["error"], (k, resp.text)


def _drip(server: Server, request_head: bytes, seconds: float) -> tuple[bytes, bool]:
    """Send ``request_head``, then one more byte every 0.5 s for up to ``seconds``; return what the server
    answered and whether it closed the connection."""
    answer = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request_head)
        sock.settimeout(0.5)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                sock.sendall(b" ")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # reset after the server closed
                return answer, True
            if not chunk:
                return answer, True
            answer += chunk
    return answer, False


def test_a_dripped_body_gets_408_by_its_deadline_and_loses_its_connection(server: Server,
                                                                          client: httpx.Client) -> None:
    head = (b"POST /search HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
    started = time.monotonic()
    answer, closed = _drip(server, head, BODY_SECONDS + BAD_INPUT_SECONDS)
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout", answer[:300]
    assert "did not arrive within" in json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert closed and time.monotonic() - started < BODY_SECONDS + BAD_INPUT_SECONDS
    assert client.post("/stats", json={}).status_code == 200


def test_slow_headers_hold_no_request_slot(server: Server, client: httpx.Client) -> None:
    """Clients dripping their headers (slowloris) never reach the service: while twenty do, requests are
    answered. (uvicorn has no header deadline: see docs/LIMITS.md.)"""
    drips = [threading.Thread(target=_drip, args=(server, b"POST /stats HTTP/1.1\r\nX-Slow:", 4.0))
             for _ in range(20)]
    for drip in drips:
        drip.start()
    try:
        time.sleep(1)
        for _ in range(5):
            assert client.post("/stats", json={}).status_code == 200
    finally:
        for drip in drips:
            drip.join()


def test_api_key_scheme_is_case_insensitive_and_a_bare_key_is_refused(server: Server) -> None:
    def status(headers: dict[str, str]) -> int:
        return httpx.post(f"{server.url}/stats", json={}, headers=headers).status_code

    assert status({"Authorization": f"bearer {KEY}"}) == 200
    assert status({"Authorization": f"BEARER  {KEY}"}) == 200
    assert status({"Authorization": KEY}) == 401
    assert status({"Authorization": f"Basic {KEY}"}) == 401
    assert status({"Authorization": "Bearer"}) == 401
    assert status({"X-API-Key": KEY[:-1]}) == 401
    resp = httpx.post(f"{server.url}/nowhere", json={})
    assert resp.status_code == 401 and "error" in resp.json()


def test_unknown_paths_add_no_metric_series(client: httpx.Client) -> None:
    size = len(client.get("/metrics").text)
    marker = uuid.uuid4().hex
    for i in range(200):
        httpx.post(f"{client.base_url}/{marker}{i}", json={})  # without the key: 401
        client.post(f"/{marker}x{i}", json={})  # with it: 404
    text = client.get("/metrics").text
    assert marker not in text
    assert len(text) < size + 20_000  # only the counters of the known routes moved


def test_info_shows_no_local_paths(client: httpx.Client) -> None:
    info = client.post("/info", json={}).json()
    text = json.dumps(info)
    assert "datasets" not in text and "/work/" not in text and "runs/" not in text
    assert info["limits"]["max_hits"] == MAX_HITS and info["limits"]["max_answer_bytes"] == MAX_ANSWER_BYTES


def test_answer_size_is_bounded_before_it_is_built(client: httpx.Client, server: Server) -> None:
    vec = [1.0] + [0.0] * (DIM - 1)
    added = client.post("/add", json={"vectors": [vec], "metadata": [{"blob": "x" * (MAX_METADATA_BYTES - 20)}]})
    assert added.status_code == 200, added.text
    before = server_rss(server)
    queries = MAX_ANSWER_BYTES // MAX_METADATA_BYTES + 10  # each answer row carries the same big item
    resp = client.post("/search", json={"vectors": [vec] * queries, "k": 1})
    assert resp.status_code == 413 and "limit" in resp.json()["error"], resp.text
    assert server_rss(server) - before < 100 << 20
    client.post("/delete", json={"ids": added.json()["ids"]})


def test_a_retried_write_with_the_same_key_lands_once(client: httpx.Client) -> None:
    vec = [0.3] * DIM
    key = uuid.uuid4().hex
    first = client.post("/add", json={"vectors": [vec, vec], "idempotency_key": key}).json()["ids"]
    again = client.post("/add", json={"vectors": [vec, vec], "idempotency_key": key}).json()["ids"]
    assert again == first
    assert client.post("/search", json={"ids": first[:1], "k": 3}).json()["results"][0][1]["id"] in first
    deleted = client.post("/delete", json={"ids": first, "idempotency_key": key + "d"})
    retried = client.post("/delete", json={"ids": first, "idempotency_key": key + "d"})
    assert deleted.json() == retried.json() == {"deleted": first}
    assert client.post("/get", json={"id": first[0]}).status_code == 404


def test_memory_stays_bounded_over_a_sustained_hostile_run(client: httpx.Client, server: Server, jpeg: bytes,
                                                           bait: str) -> None:
    """Four rounds of every hostile request: after the first (allocator warm-up), no further growth."""
    cases = _hostile(jpeg, bait)

    def round_() -> None:
        for name, method, path, kwargs, _status in cases:
            if "chunked" not in name:  # a consumed iterator cannot be resent
                client.request(method, path, **kwargs)

    round_()
    settled = server_rss(server)
    for _ in range(3):
        round_()
    grown = server_rss(server) - settled
    assert grown < 64 << 20, f"server grew by {grown >> 20} MiB over 3 more rounds of hostile requests"
    assert client.get("/readyz").status_code == 200
