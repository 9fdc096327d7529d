"""The ``@worker`` decorator and the registry of workers by dotted name."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, overload

from ._backoff import default_backoff
from ._crypto import Encrypted
from ._unique import Unique
from ._worker import Backoff, JobFunction, Worker

_registry: dict[str, Worker] = {}


@overload
def worker(target: type[Any] | JobFunction, /) -> Worker: ...
@overload
def worker(
    *,
    queue: str = ...,
    max_attempts: int = ...,
    priority: int = ...,
    tags: Sequence[str] = ...,
    backoff: Backoff = ...,
    timeout: float | None = ...,
    args: type[Any] | None = ...,
    result: type[Any] | None = ...,
    strict_args: bool = ...,
    recorded: bool | int = ...,
    encrypted: Encrypted | None = ...,
    unique: Unique | None = ...,
    cron: str | None = ...,
    flavor: str = ...,
) -> Callable[[type[Any] | JobFunction], Worker]: ...
def worker(
    target: type[Any] | JobFunction | None = None,
    /,
    *,
    queue: str = "default",
    max_attempts: int = 20,
    priority: int = 0,
    tags: Sequence[str] = (),
    backoff: Backoff = default_backoff,
    timeout: float | None = None,
    args: type[Any] | None = None,
    result: type[Any] | None = None,
    strict_args: bool = True,
    recorded: bool | int = False,
    encrypted: Encrypted | None = None,
    unique: Unique | None = None,
    cron: str | None = None,
    flavor: str = "trio",
) -> Worker | Callable[[type[Any] | JobFunction], Worker]:
    """Register an ``async def f(job)`` or a class with ``async def process(self, job)``.

    Options are validated at decoration time. ``timeout`` (seconds) cancels a job that runs
    too long, recorded as an error; ``backoff(attempt) -> seconds`` spaces out retries.
    ``args``/``result`` name attrs classes or dataclasses the args and return value are
    converted to and from (``strict_args=False`` ignores unknown args keys). ``recorded``
    stores the return value with the job (``True``, or a size limit in bytes of JSON).
    ``encrypted=Encrypted(key=...)`` encrypts args at rest; ``unique=Unique(...)`` makes
    duplicate inserts return the existing job. ``cron="*/5 * * * *"`` enqueues the worker on
    that schedule (UTC), from the nodes that run its queue. ``flavor="asyncio"`` runs
    asyncio code (under trio-asyncio, cancellation included).
    """

    def register(target: type[Any] | JobFunction) -> Worker:
        _check_target(target)
        built = Worker(
            target,
            queue=queue,
            max_attempts=max_attempts,
            priority=priority,
            tags=tags,
            backoff=backoff,
            timeout=timeout,
            args=args,
            result=result,
            strict_args=strict_args,
            recorded=recorded,
            encrypted=encrypted,
            unique=unique,
            cron=cron,
            flavor=flavor,
        )
        existing = _registry.get(built.name)
        if existing is not None:
            _check_replaces(existing, built)
        _registry[built.name] = built
        return built

    return register if target is None else register(target)


def _check_replaces(existing: Worker, built: Worker) -> None:
    """``built`` may take the name of ``existing`` if it is the same code with the same options,
    or a module-level definition run again (``importlib.reload`` re-creates it), not a second
    one sharing the name (jobs name their worker, so all its jobs would run with its options)."""
    target = built.target
    if existing.target is not target:
        if "<locals>" in target.__qualname__:
            raise ValueError(
                f"another worker is already registered as {built.name!r}: a worker defined in "
                "a function gets the same name each time the function runs; define it once, "
                "at module level"
            )
        return
    old, new = existing._options(), built._options()
    changed = [
        f"{key}={old[key]!r}, then {new[key]!r}" for key in old if not _same(old[key], new[key])
    ]
    if changed:
        name = target.__name__
        variant = (
            f"a subclass (`class Urgent{name}({name}): pass`)"
            if isinstance(target, type)
            else f"a wrapper (`async def urgent_{name}(job): return await {name}(job)`)"
        )
        raise ValueError(
            f"{target.__qualname__} is already registered as worker {built.name!r} with other "
            f"options ({'; '.join(changed)}); jobs name their worker, so one name can't have "
            f"two sets of options: register the variant under a name of its own, e.g. {variant}"
        )


def _same(old: object, new: object) -> bool:
    if isinstance(old, Encrypted) and isinstance(new, Encrypted):
        return old is new or old._key == new._key  # Encrypted(key=K) twice is the same option
    return old is new or old == new


def _check_target(target: object) -> None:
    if isinstance(target, type):
        if not inspect.iscoroutinefunction(getattr(target, "process", None)):
            raise TypeError(
                f"worker class {target.__qualname__} needs an `async def process(self, job)`"
            )
    elif not inspect.iscoroutinefunction(target):
        raise TypeError(f"@worker expects an async function or a class, got {target!r}")


def asyncio_queues() -> set[str]:
    """Queues of the registered asyncio-flavored workers."""
    return {found.queue for found in _registry.values() if found.flavor == "asyncio"}


def scheduled() -> list[Worker]:
    """The registered workers with a ``cron`` schedule."""
    return [found for found in _registry.values() if found.cron is not None]


def lookup(name: str) -> Worker | None:
    """The registered worker called ``name``, if its module has been imported."""
    return _registry.get(name)
