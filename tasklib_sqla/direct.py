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

The worker's claims and outcome writes take the same way (``fetch``): a statement per batch,
all day, where SQLAlchemy's execution cost about 0.1 ms of CPU each (measured on an empty
claim: 165-188 µs against 75-85 µs on asyncpg), 1-2 µs per task at batches of 100. Their rows
come back as asyncpg's records, which SQLAlchemy would hand over unchanged (no column of them
has a result processor; a statement with one keeps SQLAlchemy's execution).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

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


@dataclass(eq=False, slots=True)
class Compiled:
    """A statement as asyncpg takes it: ``$n`` text and the parameter names in order, with
    what SQLAlchemy would do to the values: the values the statement binds itself (literals
    it sends as parameters) and the types' bind processors."""

    sql: str
    names: tuple[str, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    binds: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    #: The result columns' types, and whether SQLAlchemy would hand their values over
    #: unchanged (None until the first ``fetch`` asks the server for the columns' types).
    result_types: tuple[Any, ...] = ()
    plain_rows: bool | None = None

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        binds, fixed = self.binds, self.fixed
        args = []
        for name in self.names:
            value = params[name] if name in params else fixed[name]
            process = binds.get(name)
            args.append(value if process is None else process(value))
        return args


# By dialect, then by statement: a worker's statements go with the worker.
_COMPILED: weakref.WeakKeyDictionary[Dialect, weakref.WeakKeyDictionary[Any, Compiled | None]] = (
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
    cache = _COMPILED.get(dialect)
    if cache is None:
        cache = _COMPILED[dialect] = weakref.WeakKeyDictionary()
    if statement not in cache:
        cache[statement] = None
        if dialect.paramstyle == "numeric_dollar":
            c = statement.compile(dialect=dialect)
            # Parameters SQLAlchemy computes or renders at execution: its own execution only.
            if not (c.insert_prefetch or c.literal_execute_params or c.post_compile_params):
                names = tuple(c.positiontup or ())
                cache[statement] = Compiled(
                    c.string,
                    names,
                    fixed={k: v for k, v in c.params.items() if k in names},
                    binds={k: v for k, v in c._bind_processors.items() if k in names},
                    result_types=tuple(column.type for column in c._result_columns),
                )
    return cache[statement]


async def execute(conn: AsyncConnection, statement: Compiled, params: Mapping[str, Any]) -> None:
    """Run ``statement`` on ``conn``'s asyncpg connection, outside any transaction.

    ``conn`` must be fresh from the pool (no transaction begun): the statement commits alone.
    """
    driver = await _driver(conn)
    args = statement.args(params)
    try:
        await driver.execute(statement.sql, *args)
    except BaseException as exc:
        await _raise_failure(conn, driver, statement, args, exc)


async def fetch(
    conn: AsyncConnection, statement: Any, params: Mapping[str, Any]
) -> Sequence[Sequence[Any]]:
    """The rows of ``statement`` (RETURNING), run as ``execute`` runs one where it can, through
    ``conn.execute`` otherwise. ``conn`` is in autocommit (the worker's connections)."""
    if usable(conn.engine):
        c = compiled(conn.dialect, statement)
        if c is not None and c.plain_rows is not False:
            driver = await _driver(conn)
            args = c.args(params)
            try:
                if c.plain_rows is None:
                    c.plain_rows = await _plain_rows(conn.dialect, driver, c)
                if c.plain_rows:
                    rows: list[asyncpg.Record] = await driver.fetch(c.sql, *args)
                    return rows
            except BaseException as exc:
                await _raise_failure(conn, driver, c, args, exc)
    return (await conn.execute(statement, params)).all()


async def _plain_rows(dialect: Dialect, driver: asyncpg.Connection, c: Compiled) -> bool:
    """Whether SQLAlchemy hands every result column over as asyncpg decodes it (no result
    processor for the column's type and the type the server reports)."""
    columns = (await driver.prepare(c.sql)).get_attributes()
    if len(columns) != len(c.result_types):
        return False
    return all(
        type_._cached_result_processor(dialect, column.type.oid) is None
        for type_, column in zip(c.result_types, columns, strict=True)
    )


async def _driver(conn: AsyncConnection) -> asyncpg.Connection:
    sync = conn.sync_connection
    # The pooled connection is in hand already (connect() checked it out); get_raw_connection
    # would cost one more greenlet switch to read the same attribute.
    fairy = (
        sync.connection
        if sync is not None and not sync.invalidated
        else await conn.get_raw_connection()
    )
    driver: asyncpg.Connection = fairy.driver_connection
    return driver


async def _raise_failure(
    conn: AsyncConnection,
    driver: asyncpg.Connection,
    statement: Compiled,
    args: Sequence[Any],
    exc: BaseException,
) -> NoReturn:
    """Raise ``exc`` as SQLAlchemy would, the connection invalidated if its state is unknown."""
    # A refusal by the server leaves the connection idle and usable; anything else (lost,
    # cancelled mid-statement, a protocol error) leaves it in a state nobody should inherit.
    lost = not isinstance(exc, asyncpg.PostgresError) or driver.is_closed()
    if lost:
        await conn.invalidate(exc if isinstance(exc, Exception) else None)
    if not isinstance(exc, Exception):
        raise exc  # cancelled: it stays a cancellation
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
