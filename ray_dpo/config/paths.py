"""Local paths and object-store URIs as a config holds them.

    REMOTE_PREFIXES     URI schemes that are never local paths (s3://, gs://, hf://, ...)
    is_remote(path)     whether ``path`` is such a URI
    join_path(base, *parts)  os.path.join for local paths, "/" for URIs
    looks_local(path)   a path rather than a hub id: starts with . / ~ or exists

Pure: standard library only.
"""

from __future__ import annotations

import os

REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "hf://", "http://", "https://", "abfs://")


def is_remote(path: str) -> bool:
    """Whether ``path`` is an object-store or web URI (never resolved against the disk)."""
    return path.startswith(REMOTE_PREFIXES)


def join_path(base: str, *parts: str) -> str:
    """Join a local path or an object-store URI."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def looks_local(path: str) -> bool:
    """Whether a model-ish value is a local path rather than a hub id."""
    return path.startswith((".", "/", "~")) or os.path.exists(path)
