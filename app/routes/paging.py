"""One shape and one paging for every collection: `{"items": [...], "next_cursor": ...}`,
newest first, `?limit=` (1-200, default 50) and `?cursor=` (the next_cursor of the page before)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query
from fastapi.exceptions import RequestValidationError

from app.schemas import CleanStr, Page

T = TypeVar("T")


def field_error(loc: tuple[str | int, ...], msg: str) -> RequestValidationError:
    """A 422 in FastAPI's own shape, naming the field, for checks that need the server's state."""
    return RequestValidationError([{"loc": loc, "msg": msg, "type": "value_error"}])


@dataclass(frozen=True)
class PageParams:
    limit: int
    cursor: str | None


def page_params(
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[CleanStr | None, Query(max_length=500)] = None,
) -> PageParams:
    return PageParams(limit, cursor)


PageDep = Annotated[PageParams, Depends(page_params)]


def paged(fetch: Callable[[int, str | None], tuple[list[Any], str | None]],
          view: Callable[[Any], T], page: PageParams) -> Page[T]:
    """A page from a store list call fetch(limit, cursor); a cursor it refuses is a 422."""
    try:
        rows, next_cursor = fetch(page.limit, page.cursor)
    except ValueError as exc:
        raise field_error(("query", "cursor"), str(exc)) from exc
    return Page(items=[view(row) for row in rows], next_cursor=next_cursor)
