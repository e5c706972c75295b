"""Request parsing for the public service: BentoML's JSON and form parsers without their URL fetches.

Why replace them: for an API with file parameters, BentoML's own parsers download any text given in
place of a file (a multipart text field ``images=http://...``, or a raw JSON body that is a URL) with
no size limit, no timeout and no private-address guard, and answer 500 when that fails. Here files
arrive only as uploaded parts; URLs go through ``serving.api.fetch`` with the service's limits. Form
parsing also gets explicit part and field limits, and parse failures (no boundary, too many fields,
nesting too deep for the JSON decoder) become 400s instead of 500s. ``bentoml_patches`` puts these parsers in
BentoML's place and makes the validation of the parsed inputs strict; ``direct`` reads forms with ``read_form``
too. They subclass BentoML's own parsers and rely on ``JSONSerde.deserialize_model``, ``Payload``, the input
models' ``multipart_fields`` (their file parameters); tests/test_bentoml_patches.py checks them.
"""

from __future__ import annotations

import json
import types
from http import HTTPStatus
from typing import Any, TypeVar, Union, get_args, get_origin

from _bentoml_impl.serde import JSONSerde, MultipartSerde, Payload
from bentoml.exceptions import BentoMLException
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

T = TypeVar("T")

MAX_FORM_FIELDS = 100  # text fields in one form (an API has at most a dozen parameters)
MAX_FORM_FILES = 256  # file parts in one form; the image-count limit is checked after parsing


class RequestError(BentoMLException):
    """A request body the service cannot parse (400)."""

    error_code = HTTPStatus.BAD_REQUEST


class GuardedJSONSerde(JSONSerde):
    """JSON bodies: parsed as JSON only (never fetched as a URL)."""

    async def parse_request(self, request: Request, cls: type[T]) -> T:
        body = await request.body()
        try:
            return self.deserialize_model(Payload((body,), metadata=request.headers), cls)
        except RecursionError as err:
            raise RequestError("request body: JSON nested too deeply") from err


class GuardedMultipartSerde(MultipartSerde):
    """Multipart and urlencoded forms: file parameters take uploaded files only."""

    @staticmethod
    async def ensure_file(obj: str | UploadFile) -> UploadFile:
        """BentoML's fetches text given as a file as a URL: nothing here calls it, and no one else may."""
        return ensure_upload(obj)

    async def parse_request(self, request: Request, cls: type[T]) -> T:
        data, files = await read_form(request, cls)
        for name, parts in files.items():  # a list parameter takes every part, another the first
            data[name] = parts if takes_list(cls.model_fields[name].annotation) else parts[0]  # type: ignore[attr-defined]
        return cls.model_validate(data)  # type: ignore[attr-defined]


async def read_form(request: Request, cls: type) -> tuple[dict[str, Any], dict[str, list[UploadFile]]]:
    """A form's text fields (each read as a JSON value, else kept as text, as BentoML does) and its uploaded
    files by the names of ``cls``'s file parameters (``multipart_fields``); parse failures, text in a file
    field and names ``cls`` lacks are refused (400)."""
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except MultiPartException as err:  # too many parts, a malformed part
        raise RequestError(f"malformed form: {err.message}") from err
    except HTTPException as err:  # Starlette's wrapping of the same inside an app
        raise RequestError(f"malformed form: {err.detail}") from err
    except KeyError as err:  # Content-Type multipart/form-data without boundary=
        raise RequestError("multipart body without a boundary in its Content-Type") from err
    except (ValueError, AssertionError) as err:  # the parser's own checks on a broken body
        raise RequestError(f"malformed form: {err}") from err
    # Before any part is read: a file part under an unknown name would be decoded as text (a 500 for an image).
    unknown = [name for name in form if name not in cls.model_fields]  # type: ignore[attr-defined]
    if unknown:
        raise unknown_fields(cls, unknown)
    data: dict[str, Any] = {}
    files: dict[str, list[UploadFile]] = {}
    for name in form:
        if name in cls.multipart_fields:  # type: ignore[attr-defined]
            files[name] = [ensure_upload(part) for part in form.getlist(name)]
        else:
            data[name] = await _json_value(form[name])
    return data, files


def ensure_upload(part: str | UploadFile) -> UploadFile:
    """A file field's part, which must be an uploaded file: BentoML would fetch text given there as a URL."""
    if isinstance(part, UploadFile):
        return part
    raise RequestError("a file field got text: upload the image as a file part (curl -F images=@cat.jpg), "
                       "or send its address in the list field 'urls'")


async def _json_value(value: str | UploadFile) -> Any:
    raw = await value.read() if isinstance(value, UploadFile) else value
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw
    except RecursionError as err:
        raise RequestError("form field: JSON nested too deeply") from err
    except UnicodeDecodeError as err:  # a file part where the API takes text, e.g. -F metadata=@cat.jpg
        raise RequestError("a form field that takes text got a file that is not UTF-8 text; images go in "
                           "the file field 'images'") from err


def takes_list(annotation: Any) -> bool:
    """Whether a parameter's type is a list (``Optional[list[...]]`` included)."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = get_args(annotation)[0]
    return get_origin(annotation) is list


def unknown_fields(model: type, names: list[str]) -> ValidationError:
    """The error pydantic raises for fields ``model`` does not take, so a form's unknown parts are answered like
    a JSON body's unknown fields."""
    return ValidationError.from_exception_data(
        model.__name__, [{"type": "extra_forbidden", "loc": (name,), "input": None} for name in names])
