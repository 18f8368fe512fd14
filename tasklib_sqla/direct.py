"""One statement on asyncpg's own connection, when nothing watches SQLAlchemy's execution.

A standalone submit is one ``INSERT`` in autocommit. SQLAlchemy's execution layer (a greenlet
switch, the DBAPI cursor adapter, a result object, the event hooks) costs it about 0.15 ms of
client CPU more than asyncpg needs for the same statement; on a small machine shared with
PostgreSQL that was a third of the submit's time (``python -m bench --only submit``).

So the statement is still built and compiled by SQLAlchemy (the host's table name and schema,
its casts, the engine's dialect) and the connection still comes from the engine's pool; only
the execution skips the layer, and only when nothing would notice: the engine runs asyncpg,
no execution event is listened to (OpenTelemetry's SQLAlchemy instrumentation, a statement
logger), statements are not logged (``echo``) and no schema is translated. Otherwise the same
statement goes through ``Connection.execute``.

What SQLAlchemy would do around a failure is done here too: the error comes out in
SQLAlchemy's ``DBAPIError`` family (classed by SQLSTATE as PEP 249 drivers class them, the
asyncpg error as ``orig``), and a connection whose state is unknown afterwards (lost, or its
statement cancelled) is invalidated, so the pool never hands it out again.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

#: Events that see a statement's execution (the engine's, and the dialect's error hook): an
#: engine listening to any runs everything through SQLAlchemy.
_EXECUTION_EVENTS = (
    "before_execute",
    "after_execute",
    "before_cursor_execute",
    "after_cursor_execute",
)


@dataclass(frozen=True, slots=True)
class Compiled:
    """A statement as asyncpg takes it: ``$n`` text and the parameter names in order."""

    sql: str
    names: tuple[str, ...]


_COMPILED: weakref.WeakKeyDictionary[Dialect, dict[Any, Compiled | None]] = (
    weakref.WeakKeyDictionary()
)


def usable(engine: AsyncEngine) -> bool:
    """Whether a statement may skip SQLAlchemy's execution on this engine: see the module."""
    sync = engine.sync_engine
    if sync.dialect.driver != "asyncpg" or sync.logger.isEnabledFor(logging.INFO):
        return False
    if sync.get_execution_options().get("schema_translate_map"):
        return False
    if sync.dialect.dispatch.handle_error:
        return False
    return not any(getattr(sync.dispatch, name) for name in _EXECUTION_EVENTS)


def compiled(dialect: Dialect, statement: Any) -> Compiled | None:
    """``statement`` compiled for ``dialect`` once; None when SQLAlchemy would compute some of
    its parameters at execution (Python-side defaults of the host's own columns) or the dialect
    does not number its parameters."""
    cache = _COMPILED.setdefault(dialect, {})
    if statement not in cache:
        cache[statement] = None
        if dialect.paramstyle == "numeric_dollar":
            c = statement.compile(dialect=dialect)
            if not c.insert_prefetch:
                cache[statement] = Compiled(c.string, tuple(c.positiontup or ()))
    return cache[statement]


async def execute(conn: AsyncConnection, statement: Compiled, params: Mapping[str, Any]) -> None:
    """Run ``statement`` on ``conn``'s asyncpg connection, outside any transaction.

    ``conn`` must be fresh from the pool (no transaction begun): the statement commits alone.
    """
    sync = conn.sync_connection
    # The pooled connection is in hand already (connect() checked it out); get_raw_connection
    # would cost one more greenlet switch to read the same attribute.
    fairy = (
        sync.connection
        if sync is not None and not sync.invalidated
        else await conn.get_raw_connection()
    )
    driver: asyncpg.Connection = fairy.driver_connection
    args = [params[name] for name in statement.names]
    try:
        await driver.execute(statement.sql, *args)
    except BaseException as exc:
        # A refusal by the server leaves the connection idle and usable; anything else (lost,
        # cancelled mid-statement, a protocol error) leaves it in a state nobody should inherit.
        lost = not isinstance(exc, asyncpg.PostgresError) or driver.is_closed()
        if lost:
            await conn.invalidate(exc if isinstance(exc, Exception) else None)
        if not isinstance(exc, Exception):
            raise  # cancelled: it stays a cancellation
        hide = bool(getattr(conn.sync_engine, "hide_parameters", False))
        raise dbapi_error(exc, statement.sql, args, invalidated=lost, hide=hide) from exc


# SQLSTATE classes (https://www.postgresql.org/docs/current/errcodes-appendix.html) to PEP 249's
# exceptions, as psycopg maps them; SQLAlchemy wraps each in the class of the same name.
_BY_CLASS: dict[str, type[sa_exc.DBAPIError]] = {
    "0A": sa_exc.NotSupportedError,
    "08": sa_exc.OperationalError,
    "22": sa_exc.DataError,
    "23": sa_exc.IntegrityError,
    "40": sa_exc.OperationalError,
    "42": sa_exc.ProgrammingError,
    "44": sa_exc.ProgrammingError,
    "53": sa_exc.OperationalError,
    "54": sa_exc.OperationalError,
    "55": sa_exc.OperationalError,
    "57": sa_exc.OperationalError,
    "58": sa_exc.OperationalError,
    "XX": sa_exc.InternalError,
}


def dbapi_class(exc: Exception) -> type[sa_exc.DBAPIError]:
    """The ``DBAPIError`` subclass SQLAlchemy would raise for this asyncpg (or socket) error."""
    code = getattr(exc, "sqlstate", None)
    if isinstance(code, str) and len(code) == 5:
        return _BY_CLASS.get(code[:2], sa_exc.DatabaseError)
    if isinstance(exc, asyncpg.InterfaceError):
        return sa_exc.InterfaceError
    return sa_exc.OperationalError  # the socket's: reset, refused, timed out


def dbapi_error(
    exc: Exception, sql: str, args: Sequence[Any], *, invalidated: bool, hide: bool
) -> sa_exc.DBAPIError:
    """``exc`` as SQLAlchemy would raise it: its ``orig`` is ``exc``."""
    return dbapi_class(exc)(
        sql, tuple(args), exc, hide_parameters=hide, connection_invalidated=invalidated
    )
