"""The patches of BentoML's internals (serving/api/bentoml_patches.py) against the installed BentoML, without a
server: every private name they touch still exists with the shape they use, and each still does its job. A
BentoML upgrade that moves one fails here, in the test named after the patch."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import importlib.metadata
import inspect
import json
import tomllib
import weakref
from pathlib import Path
from typing import Any, Iterator

import bentoml
import pydantic
import pytest
from packaging.requirements import Requirement
from servekit import request_with_body

from corinfomax.serving.api import bentoml_patches
from corinfomax.serving.api.serde import GuardedJSONSerde, GuardedMultipartSerde, RequestError

REPO = Path(__file__).resolve().parents[1]


def code_names(function: Any) -> set[str]:
    """The global and attribute names a function's code refers to (what it calls or imports by name), its
    comprehensions and inner functions included."""
    names: set[str] = set()
    codes = [inspect.unwrap(function).__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes += [const for const in code.co_consts if inspect.iscode(const)]
    return names


@pytest.fixture(scope="module")
def tiny() -> Any:
    """A BentoML service with the parameter kinds the real one has: files, lists, an int with a default."""

    @bentoml.service
    class Tiny:
        @bentoml.api
        def search(self, images: list[Path] = [], ids: list[int] | None = None, k: int = 10) -> dict:  # noqa: B006
            return {}

    return Tiny


def test_installed_bentoml_is_the_range_the_patches_were_checked_against() -> None:
    serve = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    (requirement,) = [Requirement(line) for line in serve if Requirement(line).name == "bentoml"]
    assert importlib.metadata.version("bentoml") in requirement.specifier, requirement


def test_use_guarded_parsers(monkeypatch: pytest.MonkeyPatch) -> None:
    from _bentoml_impl.serde import ALL_SERDE
    from _bentoml_impl.server.app import ServiceAppFactory

    assert "ALL_SERDE" in code_names(ServiceAppFactory.api_endpoint), "BentoML no longer picks parsers there"
    for media_type in ("application/json", "multipart/form-data", "application/x-www-form-urlencoded"):
        monkeypatch.setitem(ALL_SERDE, media_type, ALL_SERDE[media_type])  # restored after the test
    bentoml_patches.use_guarded_parsers()
    assert ALL_SERDE["application/json"] is GuardedJSONSerde
    assert ALL_SERDE["multipart/form-data"] is ALL_SERDE["application/x-www-form-urlencoded"] is GuardedMultipartSerde


def _form(fields: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart body: (name, filename or None for a text field, content) per part."""
    body = b""
    for name, filename, content in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--zz\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return body + b"--zz--\r\n", "multipart/form-data; boundary=zz"


def test_guarded_parsers_on_bentoml_parsers_internals(tiny: Any) -> None:
    """The guarded parsers subclass BentoML's: a file part is parsed, text in a file field is refused, a JSON
    body is parsed without a fetch. The form parser relies on the input models naming their file parameters
    (``multipart_fields``), and BentoML's own fetching ``ensure_file`` is replaced in case anything calls it."""
    from _bentoml_impl.serde import JSONSerde, MultipartSerde

    assert list(inspect.signature(JSONSerde.deserialize_model).parameters) == ["self", "payload", "cls"]
    assert isinstance(inspect.getattr_static(MultipartSerde, "ensure_file"), staticmethod)
    spec = tiny.apis["search"].input_spec
    assert list(spec.multipart_fields) == ["images"]
    with pytest.raises(RequestError, match="a file field got text"):
        asyncio.run(GuardedMultipartSerde.ensure_file("http://example.com/a.jpg"))

    async def parse(serde: Any, body: bytes, content_type: str) -> Any:
        request = request_with_body(body, content_type)
        with tiny.context.in_request(request):  # as BentoML's ContextMiddleware: uploaded files need it
            return await serde.parse_request(request, spec)

    parsed = asyncio.run(parse(GuardedMultipartSerde(), *_form([("images", "a.jpg", b"\xff\xd8"), ("k", None, b"3")])))
    assert len(parsed.images) == 1 and parsed.k == 3
    with pytest.raises(RequestError, match="a file field got text"):
        asyncio.run(parse(GuardedMultipartSerde(), *_form([("images", None, b"http://example.com/a.jpg")])))
    with pytest.raises(pydantic.ValidationError, match="image"):  # a file part under a name the API lacks
        asyncio.run(parse(GuardedMultipartSerde(), *_form([("image", "a.jpg", b"\xff\xd8")])))
    with pytest.raises(RequestError, match="not UTF-8"):  # a file part where the API takes text
        asyncio.run(parse(GuardedMultipartSerde(), *_form([("k", "a.jpg", b"\xff\xd8")])))
    assert asyncio.run(parse(GuardedJSONSerde(), b'{"ids": [1], "k": 2}', "application/json")).ids == [1]


def test_validate_strictly(tiny: Any) -> None:
    spec = tiny.apis["search"].input_spec
    assert isinstance(spec.model_config, dict) and issubclass(spec, pydantic.BaseModel)
    bentoml_patches.validate_strictly(tiny)
    assert spec.model_validate({"ids": [1], "k": 10}).k == 10
    for lax in ({"k": "10"}, {"k": 10.0}, {"ids": [True]}):
        with pytest.raises(pydantic.ValidationError):
            spec.model_validate(lax)
    with pytest.raises(pydantic.ValidationError) as refused:
        spec.model_validate({"k": 3, "fitler": 1})
    assert [(e["type"], e["loc"]) for e in refused.value.errors()] == [("extra_forbidden", ("fitler",))]


def test_keep_one_session() -> None:
    from _bentoml_impl.client import RemoteProxy
    from _bentoml_sdk.service.dependency import Dependency

    assert "RemoteProxy" in code_names(Dependency.get), "bentoml.depends no longer gives a RemoteProxy"
    proxy = RemoteProxy("http://127.0.0.1:9")  # not connected until a request
    bentoml_patches.keep_one_session(proxy)
    sessions = proxy.to_async._session_manager
    sessions._created_at, sessions._request_count = 0.0, 10**12  # long-lived and busy: BentoML would replace it
    assert not sessions._should_refresh()


def test_count_known_routes_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as Metrics

    assert "RunnerTrafficMetricsMiddleware" in code_names(inspect.getattr_static(ServiceAppFactory, "middlewares").fget)
    assert list(inspect.signature(Metrics.__call__).parameters) == ["self", "scope", "receive", "send"]
    monkeypatch.setattr(Metrics, "__call__", Metrics.__call__)  # restored after the test
    bentoml_patches.count_known_routes_only(frozenset({"/search"}))
    reached = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    metrics = Metrics(app, namespace="test")
    asyncio.run(metrics({"type": "http", "path": "/random-path"}, None, None))  # type: ignore[arg-type]  # unused
    assert reached == ["/random-path"] and not metrics._is_setup  # passed through, no metric series made


@pytest.fixture
def original_timeout(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    monkeypatch.setattr(TimeoutMiddleware, "__call__", TimeoutMiddleware.__call__)  # restored after the test
    yield


def test_free_timeout_timers(original_timeout: None) -> None:
    """BentoML's request timeout kept each request's context (its tracing span, its objects) alive for the
    whole timeout after the answer (issue 13's memory growth); with ``free_timeout_timers`` nothing is kept,
    and a request still gets its 504 when no answer started in time."""
    from bentoml._internal.server.base_app import BaseAppFactory
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    assert "TimeoutMiddleware" in code_names(inspect.getattr_static(BaseAppFactory, "middlewares").fget)
    assert list(inspect.signature(TimeoutMiddleware.__init__).parameters) == ["self", "app", "timeout"]
    bentoml_patches.free_timeout_timers()
    current: contextvars.ContextVar[object] = contextvars.ContextVar("current")
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def never(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(3600)

    class RequestState:
        pass

    async def request() -> weakref.ref:
        state = RequestState()
        current.set(state)  # as the tracing middleware sets the request's span
        await TimeoutMiddleware(answer, timeout=600)({"type": "http"}, None, send)  # type: ignore[arg-type]
        return weakref.ref(state)

    async def scenario() -> list[object]:
        refs = [await asyncio.create_task(request()) for _ in range(3)]  # each in its own context, like uvicorn's
        await TimeoutMiddleware(never, timeout=0.05)({"type": "http"}, None, send)  # type: ignore[arg-type]
        gc.collect()
        return [ref() for ref in refs]  # while the loop (and any timer it still holds) is alive

    assert asyncio.run(scenario()) == [None, None, None]
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200, 200, 200, 504]
    assert "able to process the request in 0.05 seconds" in json.loads(sent[-1]["body"])["error"]


def test_log_tracebacks_for_5xx_only(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from _bentoml_impl.server import app
    from bentoml.exceptions import BentoMLException, NotFound

    assert "log_exception" in code_names(app.ServiceAppFactory.api_endpoint_wrapper)
    assert list(inspect.signature(app.log_exception).parameters) == ["request", "exc_info"]
    monkeypatch.setattr(app, "log_exception", app.log_exception)  # restored after the test
    bentoml_patches.log_tracebacks_for_5xx_only()
    request = request_with_body(b"", "application/json")
    errors: list[Exception] = [RequestError("bad form"), NotFound("no such thing"), BentoMLException("broken")]
    try:
        pydantic.TypeAdapter(int).validate_python("x")
    except pydantic.ValidationError as err:
        errors.append(err)
    for error in errors:
        try:
            raise error
        except Exception:
            app.log_exception(request)
    assert [record.exc_info[1] for record in caplog.records if record.exc_info] == [errors[2]]  # the 500 only


def test_bentoml_serves_its_docs_page_at_the_root() -> None:
    """``web.FrontDoor`` moves BentoML's docs page from ``/`` to ``/docs``: BentoML must still serve it at ``/``
    (``index_page``) beside its spec at ``docs.json``, as a page that loads both by relative paths."""
    from _bentoml_impl.server.app import ServiceAppFactory

    assert {"index_page", "openapi_spec_view"} <= code_names(ServiceAppFactory.__call__)
    page = (Path(inspect.getfile(ServiceAppFactory)).parent / "main-openapi.html").read_text()
    assert "./static_content/swagger-initializer.js" in page


def test_route_calls() -> None:
    """The dependency proxy's calls reach the route (the index channel), BentoML's own call as its fallback."""
    from _bentoml_impl.client import RemoteProxy
    from _bentoml_impl.client.base import AbstractClient, ClientEndpoint

    assert "call" in code_names(AbstractClient._make_method), "BentoML's client methods no longer go through call"
    proxy = RemoteProxy("http://127.0.0.1:9")  # no server: nothing is sent over HTTP here
    routed: list[tuple[str, dict[str, Any], Any]] = []

    async def route(name: str, kwargs: dict[str, Any], fallback: Any) -> Any:
        routed.append((name, kwargs, fallback))
        return {"ok": []}

    bentoml_patches.route_calls(proxy, route)
    bentoml_patches.route_calls(proxy, route)  # once only
    client = proxy.to_async
    client.endpoints["search"] = ClientEndpoint(name="search", route="/search")
    search = client._make_method("search")  # what BentoML makes of each endpoint when it opens the proxy
    assert asyncio.run(search(ids=[1], k=2)) == {"ok": []}
    assert [(name, kwargs) for name, kwargs, _ in routed] == [("search", {"ids": [1], "k": 2})]
    assert getattr(routed[0][2], "__self__", None) is client  # BentoML's own call, bound
