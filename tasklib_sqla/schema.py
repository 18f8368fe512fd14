"""Schema pieces that live outside the ORM model: the NOTIFY trigger, and the DDL as plain SQL.

Submitting a task writes a row; a statement-level trigger on the table then sends one
``pg_notify(channel, queue)`` per queue the statement touched. PostgreSQL delivers it when, and
only when, the inserting transaction commits, so workers wake for committed tasks only, whatever
inserted them (the ORM, a Core batch, or hand-written SQL).

Alembic's autogenerate does not see triggers: a host app adds them to its migration with
``op.execute(...)`` over :func:`notify_trigger_sql` (see docs/alembic.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import DDL, Table, event
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

if TYPE_CHECKING:
    from .models import TaskMixin

DEFAULT_CHANNEL = "tasklib_tasks"
NOTIFY_FUNCTION = "tasklib_notify_insert"

_FUNCTION_SQL = f"""\
CREATE OR REPLACE FUNCTION {NOTIFY_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    q text;
BEGIN
    -- One notification per queue per statement, not per row: a batch of a thousand tasks
    -- wakes the workers once. TG_ARGV[0] is the channel.
    FOR q IN SELECT DISTINCT queue FROM tasklib_new_rows WHERE state = 'pending' LOOP
        PERFORM pg_notify(TG_ARGV[0], q);
    END LOOP;
    RETURN NULL;
END
$$"""


def _check_identifier(value: str, what: str) -> str:
    if not value.replace("_", "a").isalnum() or value[0].isdigit():
        raise ValueError(f"{what} must be a plain SQL identifier, got {value!r}")
    return value


def notify_trigger_sql(table_name: str, channel: str = DEFAULT_CHANNEL) -> list[str]:
    """The statements that install the NOTIFY trigger on a task table (idempotent)."""
    table = _check_identifier(table_name, "table name")
    chan = _check_identifier(channel, "channel")
    trigger = f"{table}_tasklib_notify"
    return [
        _FUNCTION_SQL,
        f"DROP TRIGGER IF EXISTS {trigger} ON {table}",
        f"CREATE TRIGGER {trigger} AFTER INSERT ON {table} "
        "REFERENCING NEW TABLE AS tasklib_new_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {NOTIFY_FUNCTION}('{chan}')",
    ]


def attach_notify_trigger(table: Table, channel: str = DEFAULT_CHANNEL) -> None:
    """Have ``metadata.create_all()`` install the trigger right after creating ``table``."""
    for statement in notify_trigger_sql(table.name, channel):
        ddl = DDL(statement)  # type: ignore[no-untyped-call]
        event.listen(table, "after_create", ddl.execute_if(dialect="postgresql"))


def schema_sql(model: type[TaskMixin], channel: str = DEFAULT_CHANNEL) -> str:
    """The whole schema of a task model as PostgreSQL DDL, for teams without Alembic."""
    table: Any = model.__table__  # type: ignore[attr-defined]
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    parts = [str(CreateTable(table).compile(dialect=dialect)).strip()]
    parts += [str(CreateIndex(ix).compile(dialect=dialect)).strip() for ix in table.indexes]
    parts += notify_trigger_sql(table.name, channel)
    from .models import limits_table, queues_table, workers_table  # models imports this module

    for beside in (workers_table(table), queues_table(table), limits_table(table)):
        parts.append(str(CreateTable(beside).compile(dialect=dialect)).strip())
    return ";\n\n".join(parts) + ";\n"
