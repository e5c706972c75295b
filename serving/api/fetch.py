"""Fetch an image by URL without letting callers reach private networks (SSRF guard).

Why not BentoML's ``make_safe_connect``: it monkeypatches uvloop's ``create_connection`` for the whole
process for the duration of one request, so concurrent fetches can run unguarded, and DNS failures
surface as 500s. Here the host is resolved once, every address is checked, and the connection goes
to that checked address (no DNS rebinding between check and connect); TLS still verifies the name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

import httpx

from corinfomax.core.errors import BadInput, ImageTooLarge


class UrlError(BadInput):
    """A URL that is malformed, unreachable, refused, or points at a private address."""


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_global and not ip.is_multicast


async def _resolve(host: str, port: int) -> str:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UrlError(f"cannot resolve host {host!r}: {err.strerror}") from err
    addresses = sorted({str(info[4][0]) for info in infos})
    private = [a for a in addresses if not _is_public(a)]
    if private:
        raise UrlError(f"URL host {host!r} resolves to a private or reserved address ({private[0]}); refused")
    return addresses[0]


async def fetch_url(url: str, max_bytes: int, timeout: float = 10.0, allow_private: bool = False) -> bytes:
    """GET ``url`` (http/https, no redirects) and return at most ``max_bytes`` of body."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UrlError(f"not an http(s) URL: {url[:200]!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    address = host if allow_private else await _resolve(host, port)
    netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1]}
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            async with client.stream("GET", pinned, headers=headers, extensions={"sni_hostname": host}) as resp:
                if resp.status_code != 200:
                    raise UrlError(f"fetching {url[:200]} answered HTTP {resp.status_code}; "
                                   "give a URL that serves the image directly")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise ImageTooLarge(f"image at {url[:200]} is larger than the limit of {max_bytes} bytes")
                return bytes(body)
    except httpx.HTTPError as err:
        raise UrlError(f"cannot fetch {url[:200]}: {type(err).__name__}: {err}") from err
