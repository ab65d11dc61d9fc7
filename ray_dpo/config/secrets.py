"""Credentials written into a config's URLs: found, refused where they would be published, and
kept out of everything a run logs. Pure (no torch, no Ray).

A URL may carry a credential in two places:

    the user part     s3://KEY:SECRET@bucket/..., https://TOKEN@host/..., mlflow user:password@
    the query string  https://host/data.jsonl?token=..., a presigned URL's X-Amz-Signature=...,
                      an Azure SAS's sig=...

    credentials(cfg)     [(dotted key, what it holds)] for every URL-valued field that has one
    redact(text)         the same text with each URL's user part and secret query values as ***
    redact_config(cfg)   the config with every such field redacted (what MLflow and the console get)

A config holding one still runs (the URL is what reaches the data), but ``ray-dpo k8s``
refuses to render it into a ConfigMap, and params, config/resolved.yaml, console lines and
``ray-dpo validate --print`` show *** in its place. Credentials belong in the environment
(docs/deploy.md: the Secrets `ray-dpo k8s` mounts; locally, e.g. AWS_* and HF_TOKEN).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

MASK = "***"

# Query parameters that carry a secret (lower case). Presigned S3/GCS URLs, Azure SAS
# tokens, and the token/key parameters of HTTP APIs.
SECRET_QUERY_KEYS = frozenset({
    "token", "access_token", "auth", "auth_token", "api_key", "apikey", "key", "secret", "client_secret",
    "password", "passwd", "pwd", "sig", "signature", "x-amz-signature", "x-amz-credential",
    "x-amz-security-token", "x-goog-signature", "x-goog-credential",
})

_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/?#@]+)@")
_QUERY_PAIR = re.compile(r"([?&;])([^=&;#]+)=([^&;#]*)")


def _findings(url: str) -> list[str]:
    found = []
    m = _USERINFO.match(url)
    if m and m.group(2) != MASK:  # masked already: nothing left to find
        found.append("a password in its user part" if ":" in m.group(2) else "a user name or token in its user part")
    query = url.split("?", 1)[1] if "?" in url else ""
    names = sorted({k for _, k, v in _QUERY_PAIR.findall("?" + query) if k.lower() in SECRET_QUERY_KEYS and v and v != MASK})
    if names:
        found.append("a secret in its query string (" + ", ".join(f"{n}=" for n in names) + ")")
    return found


def url_credentials(value: str) -> list[str]:
    """What credentials the URLs in ``value`` hold, in words ([] when none)."""
    return [f for url in _URL.findall(value or "") for f in _findings(url)]


def _redact_url(match: re.Match) -> str:
    url = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", match.group(0), count=1)
    if "?" not in url:
        return url
    base, query = url.split("?", 1)

    def pair(m: re.Match) -> str:
        sep, key, value = m.groups()
        return f"{sep}{key}={MASK}" if key.lower() in SECRET_QUERY_KEYS and value else m.group(0)

    return base + _QUERY_PAIR.sub(pair, "?" + query)


def redact(text: str) -> str:
    """``text`` with every URL's user part and secret query values replaced by ***."""
    if not text or "://" not in text:
        return text
    return _URL.sub(_redact_url, text)


def _walk(node: Any, prefix: str):
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            yield from _walk(getattr(node, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{prefix}[{i}]")
    elif isinstance(node, str):
        yield prefix, node


def credentials(cfg: Any) -> list[tuple[str, str]]:
    """[(dotted key, what it holds)] for each config field whose URL carries a credential."""
    return [(key, what) for key, value in _walk(cfg, "") for what in url_credentials(value)]


def redact_config(cfg: Any) -> Any:
    """A copy of ``cfg`` (a dataclass tree) with every string field redacted."""
    def clean(node: Any) -> Any:
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            return dataclasses.replace(node, **{f.name: clean(getattr(node, f.name))
                                                for f in dataclasses.fields(node) if f.init})
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        if isinstance(node, tuple):
            return tuple(clean(v) for v in node)
        return redact(node) if isinstance(node, str) else node

    return clean(cfg) if credentials(cfg) else cfg
