"""Configuration (interim minimal version; replaced by the full loader)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from types import MappingProxyType

import attrs

from ._errors import ConfigError


def _default_node() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _frozen(queues: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(queues))


@attrs.frozen(kw_only=True)
class Config:
    """Settings of a trioban instance."""

    dsn: str | None = None
    queues: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen)
    prefix: str = "public"
    node: str = attrs.field(factory=_default_node)
    name: str = "oban"
    install: bool = True
    pool_size: int = 10
    shutdown_grace: float = 15.0
    stage_interval: float = 1.0
    fetch_debounce: float = 0.0
    heartbeat_interval: float = 5.0
    rescue_after: float = 60.0


def parse_queues(text: str, field: str) -> dict[str, int]:
    queues: dict[str, int] = {}
    for item in text.split(","):
        name, _, limit = item.strip().partition(":")
        if not name or not limit.isdigit():
            raise ConfigError(field, f"expected 'name:limit' items, got {item!r}")
        queues[name] = int(limit)
    return queues
