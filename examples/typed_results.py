"""Typed results, the task context and a transactional task, checked by ``mypy --strict``.

    TASKLIB_DATABASE_URL=postgresql://postgres@127.0.0.1/mydb python -m examples.typed_results

Creates its tables (``tasks`` and ``invoices``) if missing, submits an invoice run, works it
with an in-process worker and prints the typed results. ``mypy`` infers every result's type
from the task function: ``Invoice`` for ``issue_invoice``, ``int`` for ``total_cents``.
"""

from __future__ import annotations

import asyncio
from typing import assert_type

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tasklib_sqla import (
    CONTEXT,
    SESSION,
    Config,
    TaskContext,
    TaskFailedError,
    TaskRegistry,
    TaskWorker,
    get_client,
    init,
    metadata,
    submit_task,
)

tasks = TaskRegistry()


class Base(DeclarativeBase):
    pass


class InvoiceRow(Base):
    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str]
    cents: Mapped[int]
    task_id: Mapped[str]


class Invoice(BaseModel):
    number: int
    customer: str
    cents: int


@tasks.task(name="billing.issue_invoice", transactional=True)
async def issue_invoice(
    customer: str, cents: int, session: AsyncSession = SESSION, ctx: TaskContext = CONTEXT
) -> Invoice:
    """Books the invoice row in the worker's transaction: exactly once, however often it runs."""
    row = InvoiceRow(customer=customer, cents=cents, task_id=str(ctx.id))
    session.add(row)
    await session.flush()
    return Invoice(number=row.id, customer=customer, cents=cents)


@tasks.task(name="billing.total_cents")
async def total_cents(customers: list[str]) -> int:
    async with AsyncSession(get_client().engine) as session:
        query = select(func.coalesce(func.sum(InvoiceRow.cents), 0)).where(
            InvoiceRow.customer.in_(customers)
        )
        return int(await session.scalar(query) or 0)


@tasks.task(name="billing.refuse", max_retries=0)
async def refuse(reason: str) -> None:
    raise ValueError(reason)


async def main() -> None:
    config = Config.from_env()
    init(config, registry=tasks)
    engine = create_async_engine(
        config.database_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    )
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        await conn.run_sync(Base.metadata.create_all)
    await engine.dispose()

    worker = TaskWorker(config, registry=tasks, handle_signals=False)
    running = asyncio.create_task(worker.run())
    try:
        handles = [await submit_task(issue_invoice, customer=c, cents=1250) for c in ("ada", "bob")]
        invoices = [await h.result(timeout=30) for h in handles]
        assert_type(invoices, list[Invoice])
        total = await (await submit_task(total_cents, customers=["ada", "bob"])).result(timeout=30)
        assert_type(total, int)
        refused = await submit_task(refuse, reason="no such customer")
        try:
            await refused.result(timeout=30)
        except TaskFailedError as exc:
            print("refused:", exc.error)
        for invoice in invoices:
            print(f"invoice {invoice.number} for {invoice.customer}: {invoice.cents} cents")
        print("total:", total)
    finally:
        worker.stop()
        await running


if __name__ == "__main__":
    asyncio.run(main())
