"""Errors a user can fix, shared by every stage: the CLI prints them without a traceback, the service maps
the `BadInput` family to 4xx answers."""

from __future__ import annotations

import re

# "<_io.BytesIO object at 0x7f...>" in a library's message: differs per run, means nothing to a user.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class UserError(Exception):
    """A problem the user can fix (bad path, bad option, bad file): printed without a traceback."""


class BadInput(UserError):
    """Input the caller can fix: bad image, bad vector, bad parameter. HTTP 400 (or ``status``)."""

    status = 400


class ImageError(BadInput):
    """Bytes that are not a decodable image, or an image outside the size limits."""


class ImageTooLarge(ImageError):
    status = 413


class NotFound(BadInput):
    """An id or a named item that does not exist."""

    status = 404


class DataError(UserError):
    """A data folder that is missing, empty, or holds no readable image."""


class BundleError(UserError):
    """A model bundle folder that is missing, incomplete or of an unknown format."""


class CardError(BundleError):
    """A model card that breaks the bundle contract (e.g. a name or version that is not a valid tag)."""


def describe(err: BaseException) -> str:
    """``Type: message`` of an exception from a library, without memory addresses, so the same failure gives
    the same text in every run (error texts land in feature files that must repeat byte for byte)."""
    return f"{type(err).__name__}: {_ADDRESS.sub('', str(err))}"
