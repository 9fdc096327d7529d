"""Shared pieces of the reliability tests: a runs table and its figures."""

from __future__ import annotations

import trioban


async def create_runs(oban: trioban.Oban) -> None:
    async with oban.transaction() as conn:
        await conn.execute("CREATE TABLE runs (job_id bigint NOT NULL, node text)")


async def rows(oban: trioban.Oban, statement: str, *params: object) -> list[tuple[object, ...]]:
    async with oban.transaction() as conn:
        cur = await conn.execute(statement, params)
        return await cur.fetchall()


async def count(oban: trioban.Oban, statement: str, *params: object) -> int:
    ((value,),) = await rows(oban, statement, *params)
    assert isinstance(value, int)
    return value
