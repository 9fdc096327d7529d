"""The exceptions trioban raises: one base class, structured attributes."""

from __future__ import annotations

import trio


class TriobanError(Exception):
    """Base class of every exception trioban raises on purpose."""


class ConfigError(TriobanError, ValueError):
    """Raised when a configuration value is missing, unknown or invalid.

    ``field`` names the offending setting.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InternalError(TriobanError):
    """Raised when one of trioban's own background tasks fails; the cause is chained."""


class RelayError(TriobanError):
    """Base class of the errors a relay raises while awaiting a job's result."""


class RelayTimeout(RelayError):
    """Raised when a relay's result did not arrive in time; the job itself goes on."""

    def __init__(self, message: str = "timed out waiting for the job's result") -> None:
        super().__init__(message)


class RelayDiscard(RelayError):
    """Raised when the relayed job was discarded or failed; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RelayCancelled(RelayError):
    """Raised when the relayed job was cancelled; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotRecorded(TriobanError, LookupError):
    """Raised by ``fetch_recorded`` for a job without a recorded result."""


def sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested groups of one (else the group itself)."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def stops_the_node(exc: BaseException) -> bool:
    """Whether ``exc``, raised by user code (a job, a telemetry handler), passes through to
    the node: its own cancellation or Ctrl-C, alone or in a group. Anything else (a
    SystemExit from an argparse error, an asyncio.CancelledError of the code's own, a
    library's BaseException subclass) is that code's failure, not the node's."""
    stops = (trio.Cancelled, KeyboardInterrupt)
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(stops) is not None
    return isinstance(exc, stops)
