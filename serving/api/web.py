"""The search page and the thumbnails it shows, mounted on the public service (no separate web server).

- ``/ui/``: static HTML/CSS/JS shipped in the package (``static/``), no build step; it calls the JSON API
  (``/search``, ``/recommend``, ``/duplicates``, ``/classify``, ``/collections``, ``/info``, ``/stats``) with the
  API key the user types in, if any;
- ``GET /thumbnails/{id}[?collection=NAME]``: an item's stored WebP thumbnail with ``ETag``/``Cache-Control``
  (behind the API key like every data path; the page fetches it with the key and shows it as a blob);
- ``GET /``: a redirect to the page (``FrontDoor``); BentoML's API docs page, which it serves at ``/``, is at
  ``/docs`` instead, its OpenAPI spec still at ``/docs.json``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from corinfomax.core.errors import BadInput
from corinfomax.core.thumbnails import MEDIA_TYPE
from corinfomax.serving.index.catalog import check_name

STATIC = Path(__file__).with_name("static")
PAGE = "/ui/"
DOCS = "/docs"  # no trailing slash: the docs page loads ./docs.json and ./static_content/ beside it
# A thumbnail of an id never changes (ids are never reused), but the key may be revoked: private, one day.
CACHE_CONTROL = "private, max-age=86400"
MAX_ID = 2**63 - 1  # SQLite's INTEGER


async def thumbnail(request: Request) -> Response:
    item_id = request.path_params["item_id"]
    if item_id > MAX_ID:
        return JSONResponse({"error": f"thumbnail id {item_id} is out of range (ids are below 2**63)"}, status_code=400)
    collection = request.query_params.get("collection")
    try:
        if collection is not None:
            check_name(collection)
        data = await bentoml.get_current_service().thumbnail_bytes(item_id, collection)
    except BadInput as err:
        return JSONResponse({"error": str(err)}, status_code=err.status)
    etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=MEDIA_TYPE, headers=headers)


async def bad_id(request: Request) -> Response:
    return JSONResponse({"error": f"thumbnail id must be an integer, got {request.path_params['rest']!r}"},
                        status_code=400)


def mount(service: Any) -> None:
    """Mount the page at ``/ui`` and the thumbnails at ``/thumbnails`` on a BentoML service."""
    service.mount_asgi_app(StaticFiles(directory=STATIC, html=True), path="/ui")
    service.mount_asgi_app(Starlette(routes=[Route("/{item_id:int}", thumbnail),
                                             Route("/{rest:path}", bad_id)]), path="/thumbnails")


class FrontDoor:
    """ASGI middleware: ``GET /`` redirects to the search page (people open the address, not the API), and
    ``GET /docs`` shows BentoML's API docs page, which BentoML serves at ``/``.

    It sits outside the API-key guard for the redirect only (it reveals nothing); ``/docs`` reaches the guard
    as ``/``, so it needs the key exactly as the docs page did there. Other methods on ``/`` are untouched.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            if scope["path"] == "/":
                await RedirectResponse(PAGE)(scope, receive, send)
                return
            if scope["path"] == DOCS:
                scope = {**scope, "path": "/", "raw_path": b"/"}
        await self.app(scope, receive, send)
