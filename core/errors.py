"""Errors a user can fix, shared by every stage: the CLI prints them without a traceback, the service maps
the `BadInput` family to 4xx answers."""

from __future__ import annotations


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
