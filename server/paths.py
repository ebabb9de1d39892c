"""Paths from requests, confined to a configured root.

A request names a path relative to a root the operator configured. It is refused if
it is empty, absolute, contains a NUL or a ``..`` component, or if, with every
symlink resolved (``os.path.realpath``), it lands outside the root's own resolved
path. Files that are then read inside an allowed directory are checked the same way,
so a symlink inside the root cannot point elsewhere either. State files under those
roots are written with ``write_atomic``.
"""

from __future__ import annotations

import os


class PathError(ValueError):
    """A request's path is not acceptable; the message names the field."""


class RootMissing(PathError):
    """The server has no root configured for this kind of path."""


def resolve_under(root: str | None, relative: str, field: str, what: str = "root") -> str:
    """The real absolute path of ``relative`` inside ``root``; raises ``PathError``."""
    if not root:
        raise RootMissing(f"{field}: the server has no {what} configured")
    if not isinstance(relative, str) or not relative:
        raise PathError(f"{field} is empty")
    if "\x00" in relative:
        raise PathError(f"{field} contains a NUL character")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise PathError(f"{field} must be relative to the {what}, got an absolute path")
    parts = relative.replace("\\", "/").split("/")
    if ".." in parts:
        raise PathError(f"{field} must not contain '..'")
    if os.path.normpath(relative) in (".", ""):
        raise PathError(f"{field} must name something inside the {what}, not the {what} itself")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, relative))
    if not is_within(real_root, real) or real == real_root:
        raise PathError(f"{field} leads outside the {what} (through a symlink)")
    return real


def is_within(root: str, path: str) -> bool:
    """Whether real path ``path`` is ``root`` or inside it."""
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # different drives
        return False


def check_files_within(root: str, directory: str, names: tuple[str, ...], field: str) -> None:
    """Refuses a directory whose files (those that exist) resolve outside ``root``."""
    real_root = os.path.realpath(root)
    for name in names:
        path = os.path.join(directory, name)
        if os.path.lexists(path) and not is_within(real_root, os.path.realpath(path)):
            raise PathError(f"{field}: {name} leads outside the root (through a symlink)")


def write_atomic(path: str, data: bytes) -> None:
    """Writes a file whole or not at all (a crash never leaves half of it)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
