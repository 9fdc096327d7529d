"""The notifier: pub/sub on prefix-scoped channels, payload forms, reconnection."""

from __future__ import annotations

import base64
import gzip
import json
import logging

import pytest
import trio

import trioban
from trioban import Config

from .test_relay import _terminate_notifier


async def _raw_notify(oban: trioban.Oban, channel: str, payload: str) -> None:
    async with oban.transaction() as conn:
        await conn.execute("SELECT pg_notify(%s, %s)", [channel, payload])


async def test_notify_and_listen(dsn: str) -> None:
    with trio.fail_after(10):
        async with (
            trioban.open(Config(dsn=dsn)) as oban,
            oban.listen(["gossip", "other"]) as messages,
        ):
            await oban.notify("gossip", {"hello": 1})
            await oban.notify("other", [{"n": 1}, {"n": 2}])
            assert await messages.receive() == ("gossip", {"hello": 1})
            assert await messages.receive() == ("other", {"n": 1})
            assert await messages.receive() == ("other", {"n": 2})
            big = {"data": "y" * 20_000}  # compressible: sent compressed, arrives whole
            await oban.notify("gossip", big)
            assert await messages.receive() == ("gossip", big)


async def test_notifications_in_a_transaction_arrive_only_on_commit(dsn: str) -> None:
    with trio.fail_after(10):
        async with trioban.open(Config(dsn=dsn)) as oban, oban.listen(["gossip"]) as messages:
            with pytest.raises(RuntimeError):
                async with oban.transaction() as conn:
                    await oban.notify("gossip", {"n": "rolled back"}, conn=conn)
                    raise RuntimeError
            async with oban.transaction() as conn:
                await oban.notify("gossip", {"n": "committed"}, conn=conn)
                with trio.move_on_after(0.2):
                    early = await messages.receive()
                    pytest.fail(f"delivered before commit: {early}")
            assert await messages.receive() == ("gossip", {"n": "committed"})


async def test_every_payload_form_is_read_and_bad_ones_skipped(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"form": "any", "pad": "z" * 100}
    packed = base64.b64encode(gzip.compress(json.dumps(body).encode())).decode()
    with trio.fail_after(10):
        async with trioban.open(Config(dsn=dsn)) as oban, oban.listen(["gossip"]) as messages:
            channel = "public.oban_gossip"
            await _raw_notify(oban, channel, json.dumps(body))
            await _raw_notify(oban, channel, packed)
            await _raw_notify(oban, channel, "Z:" + packed)
            with caplog.at_level(logging.WARNING, logger="trioban.notifier"):
                await _raw_notify(oban, channel, "Z:not base64 at all!")
                await _raw_notify(oban, channel, "{broken")
                await _raw_notify(oban, channel, json.dumps({"after": "bad ones"}))
                for _ in range(3):
                    assert await messages.receive() == ("gossip", body)
                assert await messages.receive() == ("gossip", {"after": "bad ones"})
            assert caplog.text.count("skipping a message") == 2


async def test_bad_input_is_rejected_clearly(dsn: str) -> None:
    async with trioban.open(Config(dsn=dsn, queues={})) as oban:
        with pytest.raises(ValueError, match="8000"):
            await oban.notify("gossip", {"noise": __import__("os").urandom(6000).hex()})
        with pytest.raises(ValueError, match="channel name"):
            await oban.notify("Bad Channel", {})
        with pytest.raises(TypeError, match="dict"):
            await oban.notify("gossip", ["not a dict"])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="list of channel names"):
            oban.listen("gossip")
        with pytest.raises(ValueError, match="channel name"):
            async with oban.listen(["ok", "no;"]):
                pass


async def test_reconnects_and_keeps_its_listeners(dsn: str) -> None:
    with trio.fail_after(20):
        async with (
            trioban.open(Config(dsn=dsn, queues={}, node="reconnecting")) as oban,
            oban.listen(["gossip"]) as messages,
        ):
            assert oban.notifier_status() == "connected"
            assert await _terminate_notifier(oban) == 1
            # Until it is back, messages may be lost; once it is, they flow again.
            while True:
                await oban.notify("gossip", {"probe": True})
                with trio.move_on_after(0.2):
                    assert await messages.receive() == ("gossip", {"probe": True})
                    break
            assert oban.notifier_status() == "connected"
