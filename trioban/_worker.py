"""``Worker``: a registered worker's options, ``new()`` (an unsaved job) and ``relay()``."""

from __future__ import annotations

import contextvars
import math
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, Protocol, final

from . import _aio, _codec, _structured
from ._cron import check_expression
from ._crypto import Encrypted, unique_secret
from ._errors import TriobanError
from ._job import Job, JobState, evolve, utc_datetime
from ._unique import Unique
from ._validate import (
    MAX_ATTEMPTS,
    MAX_PRIORITY,
    check_flag,
    check_int,
    check_json_object,
    check_meta,
    check_name,
    check_queue,
    check_seconds,
    check_tags,
)

Backoff = Callable[[int], float]
JobFunction = Callable[[Job], Awaitable[Any]]

RECORDED_LIMIT: Final = 1_000_000
"""Default bound, in bytes of JSON, on a recorded result (``@worker(recorded=True)``)."""


class Relayer(Protocol):
    """What a job's code reaches through ``current_instance()``: an open instance."""

    async def relay(self, job: Job, *, timeout: float, with_retries: bool) -> Any: ...  # noqa: ASYNC109


CURRENT: contextvars.ContextVar[Relayer] = contextvars.ContextVar("trioban_instance")
"""The innermost open trioban instance of this task, set by ``trioban.open()``."""

_EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})


class WorkerNotFound(TriobanError):
    """Raised when a job names a worker that no imported module defines."""


def _worker_name(target: type[Any] | JobFunction) -> str:
    """``module.qualname``; for code run as ``python -m pkg.app``, ``pkg.app``'s name rather
    than ``__main__``, which other nodes (importing ``pkg.app``) could not resolve."""
    module = target.__module__
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name:
            module = spec.name
    return check_name(f"{module}.{target.__qualname__}")


@final
class Worker:
    """A registered worker: what ``@worker`` returns.

    ``new(args, **opts)`` builds an unsaved job; ``await relay(args, timeout=...)`` inserts one
    with the innermost open instance and awaits its result.
    """

    def __init__(
        self,
        target: type[Any] | JobFunction,
        *,
        queue: str,
        max_attempts: int,
        priority: int,
        tags: Sequence[str],
        backoff: Backoff,
        timeout: float | None,
        args: type[Any] | None = None,
        result: type[Any] | None = None,
        strict_args: bool = True,
        recorded: bool | int = False,
        encrypted: Encrypted | None = None,
        unique: Unique | None = None,
        cron: str | None = None,
        flavor: str = "trio",
    ) -> None:
        self.target = target
        self.name = _worker_name(target)
        self.queue = check_queue(queue)
        self.max_attempts = check_int(max_attempts, "max_attempts", 1, MAX_ATTEMPTS)
        self.priority = check_int(priority, "priority", 0, MAX_PRIORITY)
        self.tags = check_tags(tags)
        if not callable(backoff):
            raise TypeError(
                f"expected backoff to be a callable attempt -> seconds, got {backoff!r}"
            )
        self.backoff = backoff
        self.timeout = None if timeout is None else check_seconds(timeout, "timeout")
        self.args_type = _structured.check_class(args, "args")
        self.result_type = _structured.check_class(result, "result")
        self.strict_args = check_flag(strict_args, "strict_args")
        self.recorded_limit = _check_recorded(recorded)
        if encrypted is not None and not isinstance(encrypted, Encrypted):
            raise TypeError(
                f"expected encrypted to be trioban.Encrypted(key=...), got {encrypted!r}"
            )
        self.encrypted = encrypted
        self.unique = _check_unique(unique)
        self.cron = None if cron is None else check_expression(cron, "cron")
        if flavor not in _aio.FLAVORS:
            raise ValueError(f"expected flavor to be 'trio' or 'asyncio', got {flavor!r}")
        if flavor == "asyncio":
            _aio.check_available()
        self.flavor = flavor
        self.__doc__ = target.__doc__
        self.__wrapped__ = target

    def __repr__(self) -> str:
        return f"<trioban.Worker {self.name} queue={self.queue!r}>"

    @property
    def recorded(self) -> bool:
        """Whether the worker's return value is stored with the job."""
        return self.recorded_limit is not None

    def _options(self) -> dict[str, Any]:
        """The options it was registered with, as validated (to compare registrations)."""
        return {
            "queue": self.queue,
            "max_attempts": self.max_attempts,
            "priority": self.priority,
            "tags": self.tags,
            "backoff": self.backoff,
            "timeout": self.timeout,
            "args": self.args_type,
            "result": self.result_type,
            "strict_args": self.strict_args,
            "recorded": self.recorded_limit,
            "encrypted": self.encrypted,
            "unique": self.unique,
            "cron": self.cron,
            "flavor": self.flavor,
        }

    def new(
        self,
        args: Any = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        scheduled_at: datetime | None = None,
        schedule_in: float | timedelta | None = None,
        tags: Sequence[str] | None = None,
        meta: Mapping[str, Any] | None = None,
        unique: Unique | bool | None = True,
    ) -> Job:
        """Build an unsaved job for this worker; invalid args or options raise at once.

        ``args`` is a JSON object, or for a worker with ``args=Cls`` a ``Cls`` instance or a
        dict shaped like one. ``unique=Unique(...)`` overrides the worker's constraint,
        ``unique=False`` drops it; ``True`` or ``None`` (like the other options) keeps it.
        ``meta`` can't hold the keys that tell trioban what a job is (``result``, ``relay``,
        ``workflow_id``, ``batch_id``, ``callback``, ``cron``, ``cron_expr``).
        """
        job_args, args_json = check_json_object(self._args_data(args), "args")
        job_meta = _EMPTY if meta is None else check_meta(meta)
        queue = self.queue if queue is None else check_queue(queue)
        if unique is True or unique is None:
            constraint = self.unique
        else:
            constraint = _check_unique(None if unique is False else unique)
        # One call of a key callable gives the key that seals the args and keys their hash.
        key = None if self.encrypted is None else self.encrypted.current_key(self.name)
        claim = None
        if constraint is not None:
            secret = None if key is None else unique_secret(key)
            claim = constraint.claim(
                worker=self.name, queue=queue, args=job_args, meta=job_meta, secret=secret
            )
        if self.encrypted is not None:
            sealed = self.encrypted.encrypt(args_json, self.name, key=key)
            job_args, args_json = check_json_object(sealed, "args")
        when = None
        if scheduled_at is not None or schedule_in is not None:
            when = _schedule(scheduled_at, schedule_in)
        job = Job(
            worker=self.name,
            args=job_args,
            queue=queue,
            priority=self.priority
            if priority is None
            else check_int(priority, "priority", 0, MAX_PRIORITY),
            max_attempts=self.max_attempts
            if max_attempts is None
            else check_int(max_attempts, "max_attempts", 1, MAX_ATTEMPTS),
            tags=self.tags if tags is None else check_tags(tags),
            meta=job_meta,
            scheduled_at=when,
            state=JobState.AVAILABLE if when is None else JobState.SCHEDULED,
            _args_json=(job_args, args_json),
            _unique=claim,
        )
        return job

    def _args_data(self, args: Any) -> Any:
        if self.args_type is None:
            return {} if args is None else args
        data = {} if args is None else args
        return _structured.unstructure(data, self.args_type, "args", forbid_extra=self.strict_args)

    def prepare(self, job: Job) -> Job:
        """``job`` as the worker sees it: args decrypted and structured.

        Raises ``DecryptionError`` (a wrong key, altered args) or ``ValueError`` (args that
        don't fit the worker's args class).
        """
        args = job.args
        if self.encrypted is not None:
            args = _codec.loads(self.encrypted.decrypt(args, self.name))
        if self.args_type is not None:
            try:
                args = _structured.structure(
                    args, self.args_type, "args", forbid_extra=self.strict_args
                )
            except ValueError as exc:
                if self.encrypted is None:
                    raise
                # The error is stored with the job, in plain text: the args' keys are secret too.
                raise ValueError(_structured.without_keys(str(exc))) from None
        return job if args is job.args else evolve(job, args=args)

    def dump_result(self, value: Any) -> Any:
        """A return value as JSON-ready data (unstructured for a worker with ``result=Cls``)."""
        if self.result_type is None:
            return value
        return _structured.unstructure(value, self.result_type, "result")

    def load_result(self, data: Any) -> Any:
        """A stored result as the caller sees it (a ``Cls`` instance with ``result=Cls``)."""
        if self.result_type is None:
            return data
        return _structured.structure(data, self.result_type, "result", forbid_extra=False)

    async def relay(
        self,
        args: Any = None,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 (the API contract takes a timeout)
        with_retries: bool = False,
        **opts: Any,
    ) -> Any:
        """Insert a job with the innermost open instance and await its result.

        A timeout raises ``RelayTimeout`` and stops only the waiting; the job goes on.
        """
        try:
            instance = CURRENT.get()
        except LookupError:
            raise TriobanError(
                f"{self.name}.relay() needs an open instance: call it inside "
                "`async with trioban.open(conf) as oban:` (or use oban.relay(job))"
            ) from None
        job = self.new(args, **opts)
        return await instance.relay(job, timeout=timeout, with_retries=with_retries)

    async def perform(self, job: Job) -> Any:
        """Run the worker's code for ``job`` (a fresh instance per job for class workers).

        A batch callback job runs the ``handle_*`` method it names instead of ``process``.
        """
        call: Callable[[Job], Awaitable[Any]]
        if isinstance(self.target, type):
            handler = job.meta.get("callback")
            named = handler if isinstance(handler, str) and handler.startswith("handle_") else None
            call = getattr(self.target(), named or "process")
        else:
            call = self.target
        if self.flavor == "asyncio":
            return await _aio.run(call, job)
        return await call(job)


def _check_recorded(value: object) -> int | None:
    if value is False:
        return None
    if value is True:
        return RECORDED_LIMIT
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TypeError(
            f"expected recorded to be True, False or a size limit in bytes > 0, got {value!r}"
        )
    return value


def _check_unique(value: object) -> Unique | None:
    if value is not None and not isinstance(value, Unique):
        raise TypeError(f"expected unique to be trioban.Unique(...) or None, got {value!r}")
    return value


def _schedule(
    scheduled_at: datetime | None, schedule_in: float | timedelta | None
) -> datetime | None:
    if scheduled_at is not None and schedule_in is not None:
        raise ValueError("pass either scheduled_at or schedule_in, not both")
    if scheduled_at is not None:
        return utc_datetime(scheduled_at, "scheduled_at")
    if schedule_in is None:
        return None
    if isinstance(schedule_in, timedelta):
        schedule_in = schedule_in.total_seconds()
    if isinstance(schedule_in, bool) or not isinstance(schedule_in, int | float):
        raise TypeError(f"expected schedule_in to be seconds or a timedelta, got {schedule_in!r}")
    if (isinstance(schedule_in, float) and not math.isfinite(schedule_in)) or schedule_in < 0:
        raise ValueError(f"expected schedule_in to be a finite number >= 0, got {schedule_in}")
    try:
        return datetime.now(UTC) + timedelta(seconds=schedule_in)
    except OverflowError:
        raise ValueError(
            f"expected schedule_in to fall before the year 10000, got {schedule_in} seconds"
        ) from None


def args_json(job: Job) -> str:
    """The JSON text of a job's args, cached by ``new()`` (unless the args have changed since,
    as in a copy made with ``attrs.evolve(job, args=...)``)."""
    cached = job._args_json
    if cached is not None and cached[0] is job.args:
        return cached[1]
    return _codec.dumps(job.args)
