"""Can this machine reach a download source? Asked once per host, quietly, within about a second.

Offline, a download retries for a minute or more and prints every retry (the Hugging Face hub's
client backs off between attempts; timm tries two files). Before one starts, the builders ask
``unreachable(url)``: one TCP connection to the source's host, or to the proxy the environment
names for it (``https_proxy``, ``no_proxy``...), within ``TIMEOUT_S``. Only a connection is tried,
no request, so certificates, a proxy's login or the server's answer never make a reachable host
look unreachable; name resolution, which has no timeout of its own, runs under the same deadline.
"""

from __future__ import annotations

import functools
import socket
import threading
import urllib.parse
import urllib.request

TIMEOUT_S = 1.5
DEFAULT_PORTS = {"https": 443, "http": 80}


def connect_target(url: str) -> tuple[str, int]:
    """The host and port a download of ``url`` connects to first: its proxy's, where the
    environment gives one that ``no_proxy`` does not exempt the host from, else its own."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or DEFAULT_PORTS.get(parts.scheme, 443)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return via.hostname or "", via.port or DEFAULT_PORTS.get(via.scheme, 80)
    return host, port


def _reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return "its name does not resolve"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer"
    return exc.strerror or type(exc).__name__


@functools.cache
def _connect_error(host: str, port: int, timeout_s: float) -> str | None:
    """Why a TCP connection to ``host:port`` fails within ``timeout_s``; None when it opens."""
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append(None)
        except OSError as exc:
            outcome.append(_reason(exc))

    worker = threading.Thread(target=attempt, name=f"reach-{host}", daemon=True)
    worker.start()
    worker.join(timeout_s)  # getaddrinfo may hang past the socket's timeout: give up on it here
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


def unreachable(url: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """None when a download of ``url`` can open a connection; else why not, in a few words
    (``huggingface.co:443: its name does not resolve``). The answer for a host is kept for the
    life of the process: a search asks once."""
    host, port = connect_target(url)
    if not host:
        return f"{url}: no host in the address"
    why = _connect_error(host, port, timeout_s)
    return None if why is None else f"{host}:{port}: {why}"
