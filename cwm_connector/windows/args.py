"""Arguments of the window ops, checked before they touch anything: names, tags, text, paths.

A hostile value (path separators, `..`, NUL, very long) is refused with a clear
error and nothing is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from cwm_connector.errors import CwmError

Progress = Callable[[int, int], None]


def no_progress(done: int, total: int) -> None:
    """The progress callback when nobody asked for progress."""


TAG_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class WindowError(CwmError):
    """A window operation that cannot be done as asked."""

    code = "bad_request"


def validate_name(name: object) -> str:
    """A window name: 1-128 of [A-Za-z0-9._-], not starting with a dot or dash."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise WindowError(
            f"invalid window name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            code="bad_name",
        )
    return name


def text_arg(value: object, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or "\x00" in value or len(value) > 4096:
        raise WindowError(f"{what} must be a string without NUL, at most 4096 characters")
    if not value and not allow_empty:
        raise WindowError(f"{what} must be a non-empty string")
    return value


def tags_arg(tags: object) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list | tuple) or len(tags) > 64:
        raise WindowError("tags must be a list of at most 64 strings")
    out = []
    for tag in tags:
        if not isinstance(tag, str) or not TAG_PATTERN.fullmatch(tag):
            raise WindowError(f"invalid tag {tag!r}: use 1-64 of [A-Za-z0-9._:-]", code="bad_tag")
        out.append(tag)
    return sorted(set(out))


def user_path(file: object, must_exist: bool = False) -> Path:
    if not isinstance(file, str) or not file or "\x00" in file:
        raise WindowError("file must be a path")
    path = Path(file).expanduser()
    if not path.is_absolute():
        raise WindowError("file must be an absolute path (the server resolves it)")
    if must_exist and not path.is_file():
        raise WindowError(f"no such file: {path}", code="not_found")
    return path
