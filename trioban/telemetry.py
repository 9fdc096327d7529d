"""Telemetry: synchronous event handlers for jobs and trioban's own services.

``attach(handler_id, events, handler)`` calls ``handler(event, measurements, metadata)`` for
each event named in ``events``. Handlers are plain functions (``attach`` rejects an
``async def`` one, which would never run) called inline on the event loop, so keep them quick
and non-blocking (hand slow work to a channel). A handler that raises (any exception, a
``SystemExit`` too) is logged and detached, so a broken handler never breaks job processing.

Events (measurements; metadata)::

  job.start        (queue_time: seconds from scheduled to started)        job
  job.stop         (duration, queue_time: seconds)                         job, state
  job.exception    (duration, queue_time: seconds)                         job, state, error
  producer.fetch   (duration, count)                                       queue, node
  acker.write      (duration, count)                                       -
  stager.stage     (count)                                                 -
  lifeline.rescue  (count)                                                 -
  pruner.prune     (count)                                                 -
  cron.enqueue     (count)                                                 minute
  leader.change    -                                                       peer, leader (bool)
  notifier.status  -                                                       status

``state`` is the job's new state (completed, retryable, discarded, cancelled, scheduled).
Each attempt that starts gets one ``job.stop`` or ``job.exception`` when it ends, except one
still running when the shutdown grace ends: it is left ``executing`` for the lifeline to
rescue, with no event. ``leader.change`` reports winning the lease, and giving it up or
losing it (``leader`` False).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from ._errors import stops_the_node

Handler = Callable[[str, Mapping[str, float], Mapping[str, Any]], None]

EVENTS: Final = frozenset(
    {
        "job.start",
        "job.stop",
        "job.exception",
        "producer.fetch",
        "acker.write",
        "stager.stage",
        "lifeline.rescue",
        "pruner.prune",
        "cron.enqueue",
        "leader.change",
        "notifier.status",
    }
)

log = logging.getLogger("trioban.telemetry")

_handlers: dict[str, dict[str, Handler]] = {}  # event -> handler id -> handler


def attach(handler_id: str, events: Iterable[str], handler: Handler) -> None:
    """Call ``handler(event, measurements, metadata)`` for each of ``events``."""
    if not isinstance(handler_id, str) or not handler_id:
        raise TypeError(f"expected handler_id to be a non-empty str, got {handler_id!r}")
    if not callable(handler):
        raise TypeError(f"expected handler to be callable, got {handler!r}")
    if _is_async(handler):
        raise TypeError(
            f"expected handler to be a plain function, got the async {handler!r}: handlers are "
            "called synchronously on the event loop, so a coroutine would never run; use a "
            "`def` handler (hand slow work to a channel with send_nowait)"
        )
    names = [events] if isinstance(events, str) else list(events)
    unknown = sorted(set(names) - EVENTS)
    if unknown or not names:
        problem = f"unknown telemetry events {unknown}" if unknown else "no events given"
        raise ValueError(f"{problem}; choose from {sorted(EVENTS)}")
    if any(handler_id in _handlers.get(name, {}) for name in EVENTS):
        raise ValueError(f"a telemetry handler {handler_id!r} is already attached; detach it first")
    for name in names:
        _handlers.setdefault(name, {})[handler_id] = handler


def _is_async(handler: object) -> bool:
    """Whether calling ``handler`` makes a coroutine (an async function, a partial of one, or
    an object with an async ``__call__``)."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 (its method is inspected, not called)
    )


def detach(handler_id: str) -> bool:
    """Remove a handler from every event; False if none was attached under that id."""
    found = False
    for handlers in _handlers.values():
        found = handlers.pop(handler_id, None) is not None or found
    return found


def emit(event: str, measurements: Mapping[str, float], metadata: Mapping[str, Any]) -> None:
    """Call the handlers of ``event`` (trioban's own code calls this)."""
    handlers = _handlers.get(event)
    if not handlers:
        return
    for handler_id, handler in list(handlers.items()):
        try:
            returned = handler(event, measurements, metadata)
        except BaseException as exc:  # a SystemExit too: a handler's failure, not the node's
            if stops_the_node(exc):
                raise
            log.exception("telemetry handler %r failed on %s; detaching it", handler_id, event)
            detach(handler_id)
            continue
        if inspect.iscoroutine(returned):  # async in disguise (attach can't see through all)
            returned.close()
            log.error("telemetry handler %r returned a coroutine; detaching it", handler_id)
            detach(handler_id)


def enabled(event: str) -> bool:
    """Whether any handler listens to ``event`` (skip building costly metadata if not)."""
    return bool(_handlers.get(event))


def attach_default_logger(level: int = logging.INFO, handler_id: str = "trioban.logger") -> None:
    """Log every job stop/exception and service event to the ``trioban.events`` logger."""
    events_log = logging.getLogger("trioban.events")

    def write(event: str, measurements: Mapping[str, float], metadata: Mapping[str, Any]) -> None:
        if not events_log.isEnabledFor(level):
            return
        job = metadata.get("job")
        where = f" job={job.id} worker={job.worker} queue={job.queue}" if job is not None else ""
        extra = " ".join(
            f"{key}={value}" for key, value in metadata.items() if key not in {"job", "error"}
        )
        figures = " ".join(f"{key}={value:.6g}" for key, value in measurements.items())
        events_log.log(level, "%s%s %s %s", event, where, figures, extra)

    attach(handler_id, EVENTS - {"job.start"}, write)
