"""The migrations of the library's own ``tasks`` table, from a checkout or an installed wheel.

The wheel carries the repository's ``alembic/`` folder as ``tasklib_sqla/migrations``, so

- ``tasklib-sqla migrate`` (or :func:`migrate`) upgrades a database with no ``alembic.ini``
  at all, and
- an app's own ``alembic.ini`` may point at it as ``script_location = tasklib_sqla:migrations``.

Revisions are kept in ``tasklib_alembic_version``, never in an app's ``alembic_version``.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

from .urls import async_url

VERSION_TABLE = "tasklib_alembic_version"


def migrations_dir() -> Path:
    """Where the migration scripts are: inside the installed package, or the checkout's."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "migrations", package.parent / "alembic"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("the tasklib-sqla migrations are missing from this installation")


def _alembic_config(database_url: str, stdout: io.StringIO | None = None) -> object:
    from alembic.config import Config as AlembicConfig

    # Alembic prints (--sql, current) to the stream its Config was given.
    cfg = AlembicConfig(stdout=stdout) if stdout is not None else AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("version_table", VERSION_TABLE)
    # ConfigParser interpolation: a literal % (in a password, say) is written %%.
    cfg.set_main_option("sqlalchemy.url", async_url(database_url).replace("%", "%%"))
    return cfg


def migrate(database_url: str, revision: str = "head", *, sql: bool = False) -> str:
    """Upgrade the database to ``revision`` (``head``: the newest).

    With ``sql=True`` nothing runs: the SQL is returned instead.
    """
    from alembic import command

    out = io.StringIO()
    cfg = _alembic_config(database_url, out)
    with redirect_stdout(out):  # offline mode (--sql) writes to sys.stdout itself
        command.upgrade(cfg, revision, sql=sql)  # type: ignore[arg-type]
    return out.getvalue()


def downgrade(database_url: str, revision: str) -> None:
    """Downgrade the database to ``revision`` (``base`` removes the tables)."""
    from alembic import command

    command.downgrade(_alembic_config(database_url), revision)  # type: ignore[arg-type]


def current(database_url: str) -> str:
    """The revision the database is at, as ``alembic current`` prints it."""
    from alembic import command

    out = io.StringIO()
    command.current(_alembic_config(database_url, out))  # type: ignore[arg-type]
    return out.getvalue().strip()
