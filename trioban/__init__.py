"""trioban: Trio-native, PostgreSQL-backed job orchestration."""

from __future__ import annotations

from ._errors import ConfigError as ConfigError
from ._errors import InternalError as InternalError
from ._errors import RelayCancelled as RelayCancelled
from ._errors import RelayDiscard as RelayDiscard
from ._errors import RelayError as RelayError
from ._errors import RelayTimeout as RelayTimeout
from ._errors import TriobanError as TriobanError
