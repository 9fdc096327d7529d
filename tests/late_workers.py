"""A worker whose module no test imports at the top: code that reads its results must import
this module itself, as a process that doesn't run the worker's queue has to."""

from __future__ import annotations

import dataclasses

from trioban import Job, worker


@dataclasses.dataclass(frozen=True)
class Total:
    value: int


@worker(queue="late", result=Total, recorded=True)
async def total(job: Job) -> Total:
    return Total(job.args["n"])
