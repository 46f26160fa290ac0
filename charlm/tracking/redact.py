"""What may be written to MLflow: secrets removed (URL passwords and users, signed-URL query
values, the values of secret-looking environment variables), values as strings, clipped."""

from __future__ import annotations

import json
import os
import re
from typing import Any

_SECRET_ENV = re.compile(
    r"SECRET|TOKEN|PASSW|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY|AUTH|SESSION|SIGNATURE", re.I
)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]*):[^/@\s]*@")
_URL_USER = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:[^=&\s]*(?:token|signature|secret|passw|credential|key|sig|auth)[^=&\s]*)=)"
    r"[^&\s#\"'<>]*",
    re.I,
)
_MIN_SECRET_LEN = 8
REDACTED = "***"


def _secret_values() -> list[str]:
    vals = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v.strip()) >= _MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def redact(text: str) -> str:
    """text without URL passwords/users, secret query values and secret environment values."""
    if not text:
        return text
    for v in _secret_values():
        text = text.replace(v, REDACTED)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head').split('://')[0]}://{REDACTED}@", text)
    text = _URL_USER.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: m.group("key") + REDACTED, text)


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-able structure with every string (keys too) redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k) if isinstance(k, str) else k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v) for v in obj]
    return obj


def display_uri(uri: str) -> str:
    """The URI as it may be shown or logged (no credentials)."""
    return redact(uri)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _str(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v) if isinstance(v, list | dict) else str(v)
