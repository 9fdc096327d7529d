"""trioban: Trio-native, PostgreSQL-backed job orchestration.

Layers (imports go one way, downwards; `nox -s lint` checks them with import-linter, whose
contract in pyproject.toml lists every module):
  entry      _commands testing _demo _pytest_plugin
  instance   _open (open()) > _instance (Oban) > _queue_methods _workflow_methods
             > _queues _checks
  services   _heartbeat _stager _producer > _acker _inserter _settle _inline > _executor _relay
             _notifier _leader _lifeline _pruner
  database   _store _schema > _bulk > _pg (_pool > _driver) > _sql
  acks       _ack
  pure       _batch _workflow _registry > _worker > _config > _config_rules > _cron _crypto
             _structured _aio _backoff _validate
             > _unique _notice > _job > _codec _errors telemetry _embedded _devserver
             _scratch
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
from ._job import Cancel as Cancel
from ._job import Discard as Discard
from ._job import Job as Job
from ._job import JobState as JobState
from ._job import Snooze as Snooze
from ._notifier import LISTEN_BUFFER as LISTEN_BUFFER
from ._open import open as open
from ._pg import DatabaseUnavailable as DatabaseUnavailable
from ._pg import PoolTimeout as PoolTimeout
from ._producer import QueueInfo as QueueInfo
from ._registry import worker as worker
from ._relay import Relay as Relay
from ._schema import SchemaError as SchemaError
from ._unique import Unique as Unique
from ._worker import Worker as Worker
from ._workflow import Workflow as Workflow

__all__ = [
    "LISTEN_BUFFER",
    "Batch",
    "Cancel",
    "Config",
    "ConfigError",
    "DatabaseUnavailable",
    "DecryptionError",
    "Discard",
    "Encrypted",
    "InternalError",
    "Job",
    "JobState",
    "NotRecorded",
    "Oban",
    "PoolTimeout",
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
