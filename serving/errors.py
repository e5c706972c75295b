"""Errors the serving side raises for bad input; the service maps them to 4xx, the CLI prints them."""

from __future__ import annotations

from corinfomax_cli import UserError


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


class BundleError(UserError):
    """A model bundle folder that is missing, incomplete or of an unknown format."""
