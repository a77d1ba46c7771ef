"""Paths that may be local or remote (gs://, or any fsspec URL).

Remote paths go through fsspec (gcsfs for gs://) with credentials from the environment only:
`token="google_default"`, never an anonymous fallback.
"""

from __future__ import annotations

import os


def is_remote(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """Remote paths as they are; local ones made absolute (Orbax refuses relative paths)."""
    return path if is_remote(path) else os.path.abspath(path)


def _fs(path: str):
    import fsspec  # noqa: PLC0415

    protocol = path.split("://", 1)[0]
    kwargs = {"token": "google_default"} if protocol in ("gs", "gcs") else {}
    return fsspec.filesystem(protocol, **kwargs)


def open_path(path: str, mode: str = "r"):
    if is_remote(path):
        return _fs(path).open(path, mode)
    return open(path, mode)


def makedirs(path: str) -> None:
    if is_remote(path):
        _fs(path).makedirs(path, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    return _fs(path).exists(path) if is_remote(path) else os.path.exists(path)


def join(path: str, *parts: str) -> str:
    if is_remote(path):
        return "/".join([path.rstrip("/"), *parts])
    return os.path.join(path, *parts)


def rename(src: str, dst: str) -> None:
    if is_remote(src):
        _fs(src).mv(src, dst, recursive=True)
    else:
        os.replace(src, dst)


def isdir(path: str) -> bool:
    return _fs(path).isdir(path) if is_remote(path) else os.path.isdir(path)
