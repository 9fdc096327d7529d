"""trioban: Trio-native, PostgreSQL-backed job orchestration.

Layers (imports go one way, downwards):
  pure       _errors telemetry _config _cron _job _backoff _codec _structured _crypto
             _unique _aio _worker _workflow _batch
  database   _sql _schema _pg _store
  services   _notifier _relay _executor _acker _producer _stager _heartbeat _leader
             _lifeline _pruner _settle
  instance   _instance (open(), Oban)
"""

from __future__ import annotations

from . import telemetry as telemetry
from ._batch import Batch as Batch
from ._config import Config as Config
from ._crypto import DecryptionError as DecryptionError
from ._crypto import Encrypted as Encrypted
from ._errors import ConfigError as ConfigError
from ._errors import InternalError as InternalError
from ._errors import NotRecorded as NotRecorded
from ._errors import RelayCancelled as RelayCancelled
from ._errors import RelayDiscard as RelayDiscard
from ._errors import RelayError as RelayError
from ._errors import RelayTimeout as RelayTimeout
from ._errors import TriobanError as TriobanError
from ._instance import Oban as Oban
from ._instance import current_instance as current_instance
from ._instance import open as open
from ._job import Cancel as Cancel
from ._job import Discard as Discard
from ._job import Job as Job
from ._job import JobState as JobState
from ._job import Snooze as Snooze
from ._notifier import LISTEN_BUFFER as LISTEN_BUFFER
from ._producer import QueueInfo as QueueInfo
from ._relay import Relay as Relay
from ._schema import SchemaError as SchemaError
from ._unique import Unique as Unique
from ._worker import Worker as Worker
from ._worker import worker as worker
from ._workflow import Workflow as Workflow

__all__ = [
    "LISTEN_BUFFER",
    "Batch",
    "Cancel",
    "Config",
    "ConfigError",
    "DecryptionError",
    "Discard",
    "Encrypted",
    "InternalError",
    "Job",
    "JobState",
    "NotRecorded",
    "Oban",
    "QueueInfo",
    "Relay",
    "RelayCancelled",
    "RelayDiscard",
    "RelayError",
    "RelayTimeout",
    "SchemaError",
    "Snooze",
    "TriobanError",
    "Unique",
    "Worker",
    "Workflow",
    "current_instance",
    "open",
    "telemetry",
    "worker",
]
