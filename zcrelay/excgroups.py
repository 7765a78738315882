"""Finding the error inside the exception groups that trio's nurseries raise.

A nursery wraps whatever its tasks raise in a (Base)ExceptionGroup, so `except PeerGone` or
`except ConnectionLost` above a nursery never matches on its own. These helpers are the one
place that looks inside.
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 11):  # pragma: no cover  (trio depends on the backport there)
    # The backport: mypy checks this branch (python_version 3.10), an env on 3.11+ lacks it.
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found]
else:
    BaseExceptionGroup = BaseExceptionGroup  # re-exported for the except clauses of callers


def first_error(exc: BaseException) -> BaseException:
    """The first leaf inside (nested) exception groups; `exc` itself if it is not a group."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def single_error(exc: BaseException) -> BaseException | None:
    """The one exception other than trio.Cancelled inside `exc` (nested groups flattened),
    `exc` itself if it is not a group, or None when there are several (or only cancellations,
    which trio handles)."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    import trio  # groups come from trio's nurseries: it is loaded already

    leaves: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending:
        item = pending.pop()
        if isinstance(item, BaseExceptionGroup):
            pending.extend(item.exceptions)
        elif not isinstance(item, trio.Cancelled):
            leaves.append(item)
    return leaves[0] if len(leaves) == 1 else None


def split_cancelled(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """(the trio.Cancelled exceptions in `exc`, everything else), each None when empty; groups
    keep their nesting (BaseExceptionGroup.split)."""
    import trio  # groups come from trio's nurseries: it is loaded already

    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)
    return (exc, None) if isinstance(exc, trio.Cancelled) else (None, exc)
