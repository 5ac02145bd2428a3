"""A deadline on every network contact: the MLflow server, the Optuna storage, the Hugging Face Hub.

Left to their defaults, MLflow's client retries a dead server for minutes (7 retries, backoff factor 2, 120 s a
request) and the Hub's downloader prints five "Retrying in Ns" lines per load: a run against an unreachable
server looked hung, and a campaign with no Hub access spent ~23 s per cell failing. `apply(seconds)` bounds
each contact to about `seconds` (the `network_timeout` option, 30 by default): MLflow's request timeout and
retries are derived from it (variables a user set win), the storages take it as their connect and socket
timeouts, and a contact that still fails is one line naming the URI. Torch-free and light: every command
calls `apply` before it touches the network.
"""
from __future__ import annotations

import os
import time
from urllib.parse import urlsplit, urlunsplit

DEFAULT_TIMEOUT = 30
_timeout = DEFAULT_TIMEOUT


def redact(url: str | None) -> str | None:
    """The URL with any password replaced by ***, for logs, params and error lines."""
    parts = urlsplit(url or "")
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


class Unreachable(RuntimeError):
    """A server that did not answer within the deadline; the message is one line naming it."""


def apply(seconds: int = DEFAULT_TIMEOUT) -> None:
    """Bound every network contact of this process (and the processes it starts) to about `seconds`.
    MLflow: 2 retries, backoff factor 1 (urllib3 sleeps 0 s, then 2 s, plus up to 1 s jitter each), and a
    request timeout of (seconds - 4) / 3, so three attempts end within `seconds`."""
    global _timeout
    _timeout = max(1, int(seconds))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, (_timeout - 4) // 3)))


def timeout() -> int:
    """The deadline in seconds `apply` set (DEFAULT_TIMEOUT before)."""
    return _timeout


def check_http(url: str, path: str = "/health", what: str = "the MLflow server") -> None:
    """Unreachable (one line) unless `url` + `path` answers 200 within the deadline: one request, no retries,
    so an unreachable server is named at once instead of after the client's retries."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=_timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        reason = " ".join(f"{type(getattr(e, 'reason', e)).__name__}: {getattr(e, 'reason', e)}".split())
    raise Unreachable(f"{what} {redact(url)} does not answer {path} within {_timeout} s ({reason})")


TRANSIENT_STATUS = (408, 425, 429, 500, 502, 503, 504)


def is_transient(error: BaseException) -> bool:
    """HTTP 429 / 5xx and timeouts: worth a retry. A refused connection, a missing repository or revision and
    bad content are not: retrying them only delays the one line that says so."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status is not None:
        return status in TRANSIENT_STATUS
    return "timeout" in type(error).__name__.lower() or isinstance(error, TimeoutError)


def with_retries(call, what: str, attempts: int = 4, cap: float = 60.0, log=print):
    """`call()`, retried on transient errors (`is_transient`) with a capped exponential backoff (2, 4, 8 s...,
    at most `cap`), one line per retry; other errors and the last failure propagate."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as e:
            if attempt == attempts or not is_transient(e):
                raise
            wait = min(cap, 2.0 ** attempt)
            log(f"{what}: {type(e).__name__} ({' '.join(str(e).split())[:200]}); retry {attempt} of "
                f"{attempts - 1} in {wait:.0f} s")
            time.sleep(wait)
