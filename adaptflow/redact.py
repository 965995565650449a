"""Masks secrets in URIs before the project writes them anywhere (Prefect, MLflow, logs, the terminal).

A tracking URI or a data path may carry a password (`postgresql://user:pw@host/db`), a token
(`https://hf_abc@host/...`, `?token=...`) or a presigned URL's signature (`X-Amz-Signature=...`).
Everything that writes a URI or a path passes it through `redact` first; the values used to
connect are never changed.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# scheme://[user[:password]@]rest, up to whitespace or a quote
URI = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>[^\s'\"<>`]+)")
# query or fragment parameters whose values are credentials (AWS, GCS, Azure SAS, tokens, API keys)
SECRET_PARAMETER = re.compile(
    r"(?i)(?P<name>[^&?#=]*(?:token|key|secret|passw|pwd|sig|credential|auth|session)[^&?#=]*)=[^&#]*"
)


def redact(text: str) -> str:
    """`text` with every URI's password (or lone user token) and secret query values replaced by ***."""
    return URI.sub(_redact_uri, text)


def redact_value(value: Any) -> Any:
    """`redact` applied to every string inside nested lists and dicts (e.g. data_files)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(item) for item in value]
    return value


def has_secret(text: str) -> bool:
    return redact(text) != text


def _redact_uri(match: re.Match[str]) -> str:
    head, query = _split_query(match["rest"])
    authority, slash, path = head.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        # user:password keeps the user; a lone userinfo is often a token (https://<token>@github.com)
        authority = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    query = SECRET_PARAMETER.sub(lambda m: f"{m['name']}={MASK}", query)
    return f"{match['scheme']}{authority}{slash}{path}{query}"


def _split_query(rest: str) -> tuple[str, str]:
    """(scheme-less URI up to the query, '?query#fragment')."""
    cut = min((rest.find(mark) for mark in "?#" if mark in rest), default=len(rest))
    return rest[:cut], rest[cut:]
