"""The notifier: pub/sub on prefix-scoped channels, payload forms, reconnection."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import logging
import random
from collections.abc import Mapping
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from psycopg import sql

import trioban
from trioban import Config, _pg, telemetry
from trioban._notifier import Notifier, check_channel

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
                await _raw_notify(oban, channel, "[" * 3000)  # nested past the recursion limit
                deep = gzip.compress(("[" * 100_000 + "]" * 100_000).encode())
                await _raw_notify(oban, channel, "Z:" + base64.b64encode(deep).decode())
                await _raw_notify(oban, channel, json.dumps({"after": "bad ones"}))
                for _ in range(3):
                    assert await messages.receive() == ("gossip", body)
                assert await messages.receive() == ("gossip", {"after": "bad ones"})
            assert caplog.text.count("skipping a message") == 4


@pytest.mark.parametrize("name", ["gossip\n", "gossip\n\n", "\ngossip", "gossip x", ""])
def test_channel_names_are_whole_identifiers(name: str) -> None:
    """A trailing newline is refused too (``$`` matched before it)."""
    with pytest.raises(ValueError, match="channel name"):
        check_channel(name)
    assert check_channel("gossip_2") == "gossip_2"


async def test_bad_input_is_rejected_clearly(dsn: str) -> None:
    async with trioban.open(Config(dsn=dsn, queues={})) as oban:
        with pytest.raises(ValueError, match="8000"):
            await oban.notify("gossip", {"noise": __import__("os").urandom(6000).hex()})
        with pytest.raises(ValueError, match="channel name"):
            await oban.notify("Bad Channel", {})
        with pytest.raises(TypeError, match="dict"):
            await oban.notify("gossip", ["not a dict"])  # type: ignore[list-item]
        # Checked as args are: a listener would get another key, or nothing could be sent.
        with pytest.raises(TypeError, match="keys of the notifier payload to be str"):
            await oban.notify("gossip", {1: 2})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match=r"notifier payload .* lone surrogate"):
            await oban.notify("gossip", {"a": "\ud800"})
        with pytest.raises(ValueError, match="notifier payload to be JSON-serialisable"):
            await oban.notify("gossip", {"a": float("nan")})
        with pytest.raises(TypeError, match="list of channel names"):
            oban.listen("gossip")
        with pytest.raises(ValueError, match="channel name"):
            async with oban.listen(["ok", "no;"]):
                pass


async def test_non_ascii_payloads_that_fit_compressed_are_sent(dsn: str) -> None:
    """3-byte CJK text is 8,111 bytes as JSON and about 4,700 compressed: it is sent (before,
    characters were compared, it went plain and notify() refused it)."""
    rng = random.Random(1)
    text = "".join(chr(0x4E00 + rng.randrange(128)) for _ in range(2700))
    with trio.fail_after(10):
        async with (
            trioban.open(Config(dsn=dsn, queues={})) as oban,
            oban.listen(["gossip"]) as messages,
        ):
            await oban.notify("gossip", {"text": text})
            assert await messages.receive() == ("gossip", {"text": text})


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


async def test_a_channel_subscribed_during_a_listen_round_trip_is_listened_on(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the reader awaits a LISTEN there is no read to interrupt: a channel subscribed
    then is still listened on (before, its ``listen()`` waited forever)."""
    notifier = Notifier(dsn, "public", "racing")
    send, receive = trio.open_memory_channel[Any](10)
    execute = _pg.Connection.execute

    async def listen_alpha_then_subscribe_beta(
        conn: _pg.Connection, query: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if "oban_alpha" in repr(query) and not notifier._handlers.get("public.oban_beta"):
            notifier.subscribe("beta", send.send_nowait)  # with LISTEN alpha under way
        return await execute(conn, query, *args, **kwargs)

    monkeypatch.setattr(_pg.Connection, "execute", listen_alpha_then_subscribe_beta)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run)
            notifier.subscribe("alpha", send.send_nowait)
            await notifier.wait_listening(["alpha", "beta"])
            sender = await _pg.connect(dsn)
            try:
                await execute(sender, "SELECT pg_notify('public.oban_beta', '{\"n\": 1}')")
            finally:
                await sender.close()
            assert await receive.receive() == {"n": 1}
            nursery.cancel_scope.cancel()


async def test_open_fails_when_the_first_notifier_connection_drops(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notifier connection dropped before its first LISTENs fails ``open()``, as an
    unreachable server does, instead of leaving it waiting forever."""
    connect = _pg.connect

    async def dropped_by_the_server(conninfo: str, *, autocommit: bool = True) -> _pg.Connection:
        conn = await connect(conninfo, autocommit=autocommit)
        if "trioban-notifier" in conninfo:
            with contextlib.suppress(psycopg.OperationalError):
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return conn

    monkeypatch.setattr(_pg, "connect", dropped_by_the_server)
    with trio.fail_after(10), pytest.raises(trioban.TriobanError, match="OperationalError"):
        async with trioban.open(Config(dsn=dsn, queues={})):
            pytest.fail("open() entered without a listening notifier")


async def test_a_server_that_keeps_dropping_the_connection_is_not_hammered(dsn: str) -> None:
    """Each connection is dropped 0.1 s after it goes idle: the notifier backs off (0.05 s,
    doubling) instead of reconnecting at once every time (about 20 times in 2.5 s)."""
    notifier = Notifier(_pg.with_options(dsn, idle_session_timeout="100"), "public", "dropped")
    connections = 0

    def count(event: str, measurements: Mapping[str, float], metadata: Mapping[str, Any]) -> None:
        nonlocal connections
        connections += metadata["status"] == "connected"

    telemetry.attach("count-connections", ["notifier.status"], count)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(notifier.run)
                await trio.sleep(2.5)
                nursery.cancel_scope.cancel()
    finally:
        telemetry.detach("count-connections")
    assert 3 <= connections <= 10


async def test_every_channel_fits_under_the_longest_prefix(dsn: str) -> None:
    from trioban._config_rules import MAX_PREFIX

    from .workers import echo

    prefix = "p" * MAX_PREFIX
    with trio.fail_after(30):
        conf = Config(dsn=dsn, prefix=prefix, queues={"default": 2})
        async with trioban.open(conf) as oban:
            # Inserts, relays, pauses (signals) and leadership all notify on internal channels.
            assert await oban.relay(echo.new({"value": 7}), timeout=10) is not None
            await oban.pause_queue("default")
            room = 63 - len(f"{prefix}.oban_")
            async with oban.listen(["c" * room]) as messages:
                await oban.notify("c" * room, {"ok": 1})
                assert (await messages.receive())[1] == {"ok": 1}
            # One more char would be truncated by LISTEN: refused, saying the room left.
            with pytest.raises(ValueError, match=f"at most {room} chars"):
                await oban.notify("c" * (room + 1), {})
            with pytest.raises(ValueError, match=f"at most {room} chars"):
                async with oban.listen(["c" * (room + 1)]):
                    pass


async def test_listeners_end_when_the_instance_closes(dsn: str) -> None:
    """A listener in a nursery outside the instance sees its ``async for`` end as the instance
    closes (before, it waited forever and its nursery never exited); a closed instance
    refuses ``listen()`` instead of waiting forever."""
    got: list[Any] = []
    first = trio.Event()

    async def listener(oban: trioban.Oban, *, task_status: trio.TaskStatus[None]) -> None:
        async with oban.listen(["gossip"]) as messages:
            task_status.started()
            async for _, payload in messages:
                got.append(payload)
                first.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, trioban.open(Config(dsn=dsn)) as oban:
            await nursery.start(listener, oban)
            await oban.notify("gossip", {"n": 1})
            await first.wait()
        assert got == [{"n": 1}]
        with pytest.raises(trioban.TriobanError, match="closed"):
            async with oban.listen(["gossip"]):
                pytest.fail("listen() entered on a closed instance")


async def test_a_channel_named_twice_delivers_each_message_once(dsn: str) -> None:
    with trio.fail_after(10):
        async with trioban.open(Config(dsn=dsn)) as oban, oban.listen(["dup", "dup"]) as messages:
            await oban.notify("dup", [{"n": 1}, {"n": 2}])
            assert await messages.receive() == ("dup", {"n": 1})
            assert await messages.receive() == ("dup", {"n": 2})


async def test_identical_payloads_in_one_transaction_merge(dsn: str) -> None:
    """As documented: PostgreSQL delivers identical payloads on one channel in one transaction
    once; separate ``notify`` calls are separate transactions, so each arrives."""
    with trio.fail_after(10):
        async with trioban.open(Config(dsn=dsn)) as oban, oban.listen(["dup"]) as messages:
            await oban.notify("dup", [{"n": 1}, {"n": 1}, {"n": 2}])
            await oban.notify("dup", {"n": 2})
            await oban.notify("dup", {"end": True})
            got = [(await messages.receive())[1] for _ in range(3)]
            assert got == [{"n": 1}, {"n": 2}, {"n": 2}]
            assert await messages.receive() == ("dup", {"end": True})


async def test_a_consumer_that_closed_its_channel_is_dropped_quietly(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10), caplog.at_level(logging.WARNING, logger="trioban.notifier"):
        async with (
            trioban.open(Config(dsn=dsn)) as oban,
            oban.listen(["cl"]) as witness,
            oban.listen(["cl"]) as closed,
        ):
            await closed.aclose()
            await oban.notify("cl", [{"n": 1}, {"n": 2}])
            # Each message reaches every subscriber before the witness can read it.
            assert await witness.receive() == ("cl", {"n": 1})
            assert await witness.receive() == ("cl", {"n": 2})
    assert not caplog.records


async def test_listen_waits_for_the_listen_after_a_pending_unlisten(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``listen(["x"])`` entered while the reader is about to UNLISTEN x (a closed block left
    x listened on; another channel started a round) waits for x's next LISTEN, so a message
    sent in the block arrives (before, it entered at once and the message was lost)."""
    notifier = Notifier(dsn, "public", "unlistening")
    execute = _pg.Connection.execute
    unlisten_pending, release, unlistened = trio.Event(), trio.Event(), trio.Event()
    entered, notified = trio.Event(), trio.Event()

    async def gated(conn: _pg.Connection, query: Any, *args: Any, **kwargs: Any) -> Any:
        text = query.as_string(conn) if isinstance(query, sql.Composable) else ""
        if text == 'UNLISTEN "public.oban_x"':
            unlisten_pending.set()
            await release.wait()
            result = await execute(conn, query, *args, **kwargs)
            unlistened.set()
            return result
        if text == 'LISTEN "public.oban_x"' and unlistened.is_set() and entered.is_set():
            await notified.wait()  # the block was entered before this LISTEN: show the loss
        return await execute(conn, query, *args, **kwargs)

    async def notify_x() -> None:
        sender = await _pg.connect(dsn)
        try:
            await execute(sender, "SELECT pg_notify('public.oban_x', '{\"n\": 1}')")
        finally:
            await sender.close()

    got: list[Any] = []
    done = trio.Event()

    async def listen_x() -> None:
        async with notifier.listen(["x"]) as messages:
            entered.set()
            await unlistened.wait()  # the reader's UNLISTEN x is behind us
            await notify_x()
            notified.set()
            with trio.move_on_after(2):
                got.append(await messages.receive())
        done.set()

    monkeypatch.setattr(_pg.Connection, "execute", gated)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run)
            async with notifier.listen(["x"]):
                pass  # x stays listened on until the reader's next round
            notifier.subscribe("y", lambda payload: None)  # that round: LISTEN y, UNLISTEN x
            await unlisten_pending.wait()
            nursery.start_soon(listen_x)
            await trio.testing.wait_all_tasks_blocked()  # it subscribed x, and maybe entered
            release.set()
            await done.wait()
            nursery.cancel_scope.cancel()
    assert got == [("x", {"n": 1})]
