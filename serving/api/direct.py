"""Serve the service's APIs straight from ASGI, past BentoML's per-request machinery, with the same answers.

Why: a one-image /embed spent ~0.5 ms of the event loop's ~1.8 ms of CPU inside BentoML's endpoint (py-spy,
bench/serve_profile.py): a temporary file written and read back per upload, the pydantic model of the
answer and its JSON schema built per answer, its request context, router and exception layers; on a small
model the event loop is what limits throughput. ``DirectApis`` is one ASGI middleware (BentoML's public
``add_asgi_middleware``) that answers every ``@bentoml.api`` method of the service it is given, new ones
included, and leaves everything else (other paths and methods, batchable or streaming APIs, APIs that take
BentoML's context) to BentoML.

The same: the API methods themselves, called with the same arguments; their input models, built by BentoML
from the signatures and validated strictly with unknown fields refused (``bentoml_patches``), with the same
error texts; forms read by ``serde.read_form`` (its limits and refusals); bodies as BentoML's parsers take
them (an unknown content type is read as JSON, pickle is refused with 415); the errors' statuses and shape
(``{"error"}``, validation details for ``http.JsonErrors``); BentoML's middlewares outside this one (tracing,
access log, request metrics, timeout) and the service's own (key, size and deadline, admission, stage metrics).
Different: uploaded files reach the method as ``bytes`` instead of paths of temporary files, and the answer
is encoded by orjson. ``CORINFOMAX_DIRECT_APIS=0`` sends every request through BentoML's own path
(bench/serve_load.py measures both).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from http import HTTPStatus
from typing import Any

import bentoml
import orjson
from bentoml.exceptions import BentoMLException
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from corinfomax.serving.api.http import Receive, Scope, Send
from corinfomax.serving.api.serde import RequestError, read_form, takes_list

log = logging.getLogger("corinfomax.service")
PICKLE = "application/vnd.bentoml+pickle"
FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")


def direct_methods(service: Any) -> dict[str, Any]:
    """The service's APIs this path can answer, by route: plain methods without BentoML's context or batching."""
    return {method.route: method for method in service.apis.values()
            if not (method.batchable or method.is_stream or method.is_task or method.ctx_param
                    or getattr(method.input_spec, "__root_input__", False))}


class DirectApis:
    """ASGI middleware: POST requests to the routes of ``direct_methods(service)`` are answered here."""

    def __init__(self, app: Any, service: Any) -> None:
        self.app, self.methods = app, direct_methods(service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = self.methods.get(scope.get("path", "")) if scope["type"] == "http" else None
        if method is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await answer(method, request)
            await response(scope, receive, send)  # type: ignore[arg-type]  # Starlette types send's message loosely
        finally:
            await request.close()  # the form's spooled files


async def answer(method: Any, request: Request) -> Response:
    """Parse, validate, call and encode, or the error BentoML would have answered."""
    try:
        kwargs = await arguments(method.input_spec, request)
        function = method.func
        if inspect.iscoroutinefunction(function):
            result = await function(bentoml.get_current_service(), **kwargs)
        else:
            result = await asyncio.to_thread(function, bentoml.get_current_service(), **kwargs)
    except ValidationError as err:
        return JSONResponse({"error": f"{err.error_count()} validation error for {err.title}",
                             "detail": err.errors(include_context=False, include_input=False)}, status_code=400)
    except BentoMLException as err:
        status = err.error_code.value
        if status >= 500:
            log.exception("%s failed", request.url.path)
            return JSONResponse({"error": "An unexpected error has occurred, please check the server log."}, status)
        return JSONResponse({"error": str(err)}, status_code=status)
    except Exception:
        log.exception("%s failed", request.url.path)
        return JSONResponse({"error": "An unexpected error has occurred, please check the server log."}, 500)
    if isinstance(result, Response):
        return result
    return Response(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


async def arguments(spec: Any, request: Request) -> dict[str, Any]:
    """The method's keyword arguments from the request body, validated by the API's input model ``spec``."""
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if media_type == PICKLE:
        raise BentoMLException(f"{PICKLE} is not allowed in main server", error_code=HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    if media_type not in FORMS:  # JSON, and (as BentoML does) any other type read as JSON
        body = await request.body()
        try:
            model = spec.model_validate_json(body or b"{}")
        except RecursionError as err:
            raise RequestError("request body: JSON nested too deeply") from err
        return {name: getattr(model, name) for name in spec.model_fields}
    data, files = await read_form(request, spec)
    model = spec.model_validate(data)  # the file parameters keep their defaults here
    kwargs = {name: getattr(model, name) for name in spec.model_fields}
    for name, parts in files.items():
        contents = [await part.read() for part in parts]
        kwargs[name] = contents if takes_list(spec.model_fields[name].annotation) else contents[0]
    return kwargs
