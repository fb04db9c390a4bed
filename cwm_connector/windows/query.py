"""Filtering, sorting and paging of window listings: the arguments `list` takes, checked.

`page_spec` turns them into the catalog's SQL page (store/catalog_windows.py), which
`list` runs; `matches`/`apply` are the same rules over described windows in Python
(the reference the SQL is tested against, tests/unit/windows/test_query_sql.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cwm_connector.engine.sessions import salt_digest
from cwm_connector.errors import CwmError
from cwm_connector.store.catalog_windows import PageSpec

SORT_KEYS = ("name", "created", "tokens", "bytes")
MAX_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class WindowQuery:
    """What `list` was asked for; every field optional."""

    tags: tuple[str, ...] = ()
    model: str | None = None
    session: str | None = None  # a salt or its digest
    search: str | None = None
    sort_by: str = "name"
    sort_order: str = "asc"
    limit: int | None = None
    offset: int = 0

    @classmethod
    def parse(
        cls,
        tags: Sequence[str] | str | None = None,
        model: str | None = None,
        session: str | None = None,
        search: str | None = None,
        sort_by: str = "name",
        sort_order: str = "asc",
        limit: int | None = None,
        offset: int = 0,
    ) -> WindowQuery:
        """Validate raw op arguments; a bad one is a `bad_request` error."""
        if isinstance(tags, str):
            tags = [tags]
        if tags is not None and not all(isinstance(t, str) for t in tags):
            raise CwmError("tags must be strings", code="bad_request")
        if sort_by not in SORT_KEYS:
            raise CwmError(f"sort_by must be one of {SORT_KEYS}", code="bad_request")
        if sort_order not in ("asc", "desc"):
            raise CwmError("sort_order must be 'asc' or 'desc'", code="bad_request")
        for value, what in ((limit, "limit"), (offset, "offset")):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise CwmError(f"{what} must be an integer", code="bad_request")
        if (limit is not None and not 0 <= limit <= MAX_LIMIT) or offset < 0:
            raise CwmError(f"limit must be in [0, {MAX_LIMIT}], offset >= 0", code="bad_request")
        for value, what in ((model, "model"), (session, "session"), (search, "search")):
            if value is not None and not isinstance(value, str):
                raise CwmError(f"{what} must be a string", code="bad_request")
        return cls(tuple(tags or ()), model, session, search, sort_by, sort_order, limit, offset)

    def page_spec(self) -> PageSpec:
        """The same selection in catalog terms (a session matches by salt or by digest)."""
        sessions = () if self.session is None else (self.session, salt_digest(self.session))
        return PageSpec(
            tags=self.tags,
            model=self.model,
            sessions=sessions,
            search=self.search.lower() if self.search else None,
            sort_by=self.sort_by,
            descending=self.sort_order == "desc",
            limit=self.limit,
            offset=self.offset,
        )

    def matches(self, window: dict[str, Any]) -> bool:
        """Whether a described window passes every filter."""
        if not set(self.tags) <= set(window.get("tags") or []):
            return False
        if self.model is not None and self.model not in str(window.get("model", "")):
            return False
        if self.session is not None and self.session not in (
            window.get("salt"),
            window.get("session"),
        ):
            return False
        if self.search:
            text = f"{window.get('name', '')} {window.get('description', '')}".lower()
            if self.search.lower() not in text:
                return False
        return True

    def apply(self, windows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Filter, sort and page."""
        kept = [w for w in windows if self.matches(w)]
        kept.sort(key=lambda w: (w.get(self.sort_by), w["name"]), reverse=self.sort_order == "desc")
        end = None if self.limit is None else self.offset + self.limit
        return kept[self.offset : end]
