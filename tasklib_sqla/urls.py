"""Database URLs: the asyncpg form the library connects with, and asyncpg's own DSN."""

from __future__ import annotations

from sqlalchemy.engine import make_url

from .exceptions import ConfigError

#: Drivers whose URLs the library rewrites to asyncpg: the app may keep its sync URL.
_TO_ASYNCPG = ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg")


def async_url(database_url: str) -> str:
    """The URL with asyncpg: ``postgresql://`` (or a sync driver's URL) becomes ``+asyncpg``.

    A Flask app's ``postgresql+psycopg://`` URL therefore serves its workers unchanged.
    """
    if not database_url:
        raise ConfigError("no database URL: set Config(database_url=...) or TASKLIB_DATABASE_URL")
    url = make_url(database_url)
    if url.drivername in _TO_ASYNCPG:
        url = url.set(drivername="postgresql+asyncpg")
    return url.render_as_string(hide_password=False)


def asyncpg_dsn(database_url: str) -> str:
    """A libpq-style DSN for asyncpg from a SQLAlchemy URL."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)
