"""Config: validation naming the field, did-you-mean, environment and TOML loaders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import pytest

from trioban import Config, ConfigError
from trioban._config import parse_queues


def test_defaults() -> None:
    conf = Config()
    assert conf.dsn is None
    assert dict(conf.queues) == {}
    assert (conf.prefix, conf.install, conf.pool_size) == ("public", True, 10)
    assert conf.shutdown_grace == 15.0
    assert conf.node.endswith(f"-{os.getpid()}")


@pytest.mark.parametrize(
    ("settings", "field", "words"),
    [
        ({"dsn": ""}, "dsn", "non-empty str"),
        ({"queues": {"math": -1}}, "queues", "queues['math'] to be an int between 1"),
        ({"queues": {"math": True}}, "queues", "queues['math']"),
        ({"queues": {"bad name": 1}}, "queues", "without spaces"),
        ({"queues": ["default"]}, "queues", "mapping"),
        ({"prefix": "Public"}, "prefix", "lowercase"),
        ({"node": ""}, "node", "non-empty"),
        ({"install": "yes"}, "install", "True or False"),
        ({"pool_size": 0}, "pool_size", "between 1 and 1000"),
        ({"shutdown_grace": -1}, "shutdown_grace", ">= 0"),
        ({"stage_interval": 0}, "stage_interval", ">= 0.01"),
        ({"stage_interval": float("nan")}, "stage_interval", "finite"),
        ({"stage_interval": "1"}, "stage_interval", "number of seconds"),
        ({"rescue_after": 9.0}, "rescue_after", "at least twice heartbeat_interval"),
        ({"prune_max_age": 0}, "prune_max_age", "> 0"),
        ({"prune_limit": 0}, "prune_limit", "between 1 and 1000000"),
    ],
)
def test_bad_values_name_the_field(settings: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config(**settings)
    assert raised.value.field == field
    assert words in str(raised.value)


def test_unknown_settings_suggest_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'queues'") as raised:
        Config(queus={"a": 1})  # type: ignore[call-arg]
    assert raised.value.field == "queus"
    with pytest.raises(ConfigError, match=r"unknown setting 'zzz'$"):
        Config.build(zzz=1)
    with pytest.raises(ConfigError, match="did you mean 'prefix'"):
        Config().evolve(prefx="x")


@pytest.mark.parametrize(
    "prefix", ["public; drop table x", 'a"b', "UPPER", "x" * 64, "", "1a", "a-b", "app\n"]
)
def test_hostile_prefixes_are_rejected(prefix: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config(prefix=prefix)
    assert raised.value.field == "prefix"


def test_config_is_immutable_and_evolves() -> None:
    conf = Config(queues={"a": 1})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        conf.prefix = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        conf.queues["b"] = 2  # type: ignore[index]
    assert conf.evolve(prefix="other").prefix == "other"
    with pytest.raises(ConfigError):
        conf.evolve(pool_size=-1)


def test_from_env() -> None:
    env = {
        "TRIOBAN_DSN": "postgresql:///app",
        "TRIOBAN_QUEUES": "default:10, math:5",
        "TRIOBAN_PREFIX": "app",
        "TRIOBAN_INSTALL": "no",
        "TRIOBAN_POOL_SIZE": "4",
        "TRIOBAN_SHUTDOWN_GRACE": "2.5",
        "OTHER": "ignored",
    }
    conf = Config.from_env(env)
    assert conf.dsn == "postgresql:///app"
    assert dict(conf.queues) == {"default": 10, "math": 5}
    assert (conf.prefix, conf.install, conf.pool_size, conf.shutdown_grace) == (
        "app", False, 4, 2.5
    )  # fmt: skip
    # Explicit keywords win; None means "not set".
    assert Config.from_env(env, env_prefix="TRIOBAN_", pool_size=7, dsn=None).pool_size == 7
    assert Config.from_env(env, dsn=None).dsn == "postgresql:///app"
    assert Config.from_env({"TRIOBAN_PRUNE_MAX_AGE": "none"}).prune_max_age is None
    assert Config.from_env({"TRIOBAN_PRUNE_MAX_AGE": "60"}).prune_max_age == 60.0
    # An override of None keeps jobs forever, as Config(prune_max_age=None) does.
    forever = Config.from_env({"TRIOBAN_PRUNE_MAX_AGE": "60"}, prune_max_age=None)
    assert forever.prune_max_age is None
    assert Config.from_env({"TRIOBAN_NODE": "n1"}, node=None).node == "n1"  # None: not set


@pytest.mark.parametrize(
    ("env", "field", "words"),
    [
        ({"TRIOBAN_QUEUS": "a:1"}, "TRIOBAN_QUEUS", "did you mean TRIOBAN_QUEUES"),
        ({"TRIOBAN_QUEUES": "default"}, "TRIOBAN_QUEUES", "'name:limit'"),
        ({"TRIOBAN_QUEUES": "a:x"}, "TRIOBAN_QUEUES", "'a:x'"),
        ({"TRIOBAN_INSTALL": "maybe"}, "TRIOBAN_INSTALL", "yes/no"),
        ({"TRIOBAN_POOL_SIZE": "ten"}, "TRIOBAN_POOL_SIZE", "a number"),
        # Digits str.isdigit() accepts but int() refuses: a ConfigError, not a bare ValueError.
        ({"TRIOBAN_QUEUES": "default:²"}, "TRIOBAN_QUEUES", "'default:²'"),
        ({"TRIOBAN_QUEUES": "a:" + "1" * 5000}, "TRIOBAN_QUEUES", "'name:limit'"),
        ({"TRIOBAN_POOL_SIZE": "²"}, "TRIOBAN_POOL_SIZE", "a number"),
        ({"TRIOBAN_QUEUES": "a:\u0663"}, "TRIOBAN_QUEUES", "'name:limit'"),  # Arabic-Indic 3
        ({"TRIOBAN_QUEUES": "a:1, a:2"}, "TRIOBAN_QUEUES", "'a' twice"),
        # A template's unset variable: not "keep forever".
        ({"TRIOBAN_PRUNE_MAX_AGE": ""}, "TRIOBAN_PRUNE_MAX_AGE", "a number"),
        ({"TRIOBAN_CRONTAB": "[" * 100_000}, "TRIOBAN_CRONTAB", "JSON list"),  # too deep
    ],
)
def test_from_env_errors(env: dict[str, str], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env(env)
    assert raised.value.field == field
    assert words in str(raised.value)


def test_from_toml(tmp_path: Path) -> None:
    own = tmp_path / "trioban.toml"
    own.write_text('[trioban]\ndsn = "postgresql:///x"\nqueues = {default = 3}\n')
    assert dict(Config.from_toml(own).queues) == {"default": 3}
    assert Config.from_toml(own, dsn="postgresql:///y").dsn == "postgresql:///y"
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.trioban]\nprefix = "app"\nshutdown_grace = 1\n')
    assert Config.from_toml(pyproject).prefix == "app"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[trioban]\nqueus = {a = 1}\n", "did you mean 'queues'"),
        ("[trioban\n", "not valid TOML"),
        ("[other]\n", "no [trioban]"),
        ("[trioban]\npool_size = 0\n", "between 1 and 1000"),
        ("[trioban]\ncrontab = " + "[" * 100_000, "too deeply"),
    ],
)
def test_from_toml_errors(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "conf.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        Config.from_toml(path)


def test_from_toml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Config.from_toml(tmp_path / "nope.toml")


def test_parse_queues() -> None:
    assert parse_queues("a:1,b:20", "queues") == {"a": 1, "b": 20}
    with pytest.raises(ConfigError, match="'b'"):
        parse_queues("a:1,b", "queues")


def test_a_prefix_leaves_room_for_channel_names() -> None:
    from trioban._config_rules import MAX_PREFIX
    from trioban._sql import channel

    assert Config(prefix="p" * MAX_PREFIX).prefix == "p" * MAX_PREFIX
    with pytest.raises(ConfigError, match="63-byte names") as raised:
        Config(prefix="p" * (MAX_PREFIX + 1))
    assert raised.value.field == "prefix"
    for internal in ("insert", "relay", "signal", "leader"):
        assert len(channel("p" * MAX_PREFIX, internal)) <= 63


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("rescue_after", 1e12, "at most 315360000 seconds"),
        ("prune_max_age", 1e12, "use None to keep jobs forever"),
        ("heartbeat_interval", 1e12, "at most 315360000 seconds"),
        ("stage_interval", 1e12, "at most 315360000 seconds"),
        ("shutdown_grace", 1e12, "at most 315360000 seconds"),
        ("stage_interval", 0.001, ">= 0.01"),
        ("heartbeat_interval", 0.0, ">= 0.01"),
    ],
)
def test_intervals_are_bounded(setting: str, value: float, message: str) -> None:
    settings: dict[str, Any] = {setting: value}
    with pytest.raises(ConfigError, match=message) as raised:
        Config(**settings)
    assert raised.value.field == setting
    assert Config(rescue_after=315_360_000, prune_max_age=315_360_000).rescue_after == 315_360_000


def test_from_env_prefix_overrides_the_schema_like_any_setting() -> None:
    env = {"TRIOBAN_QUEUES": "mail:5", "TRIOBAN_DSN": "postgresql:///app"}
    # prefix= is the schema (as in from_toml); it no longer renames the variables read.
    conf = Config.from_env(env, prefix="billing")
    assert (conf.prefix, dict(conf.queues), conf.dsn) == (
        "billing",
        {"mail": 5},
        "postgresql:///app",
    )
    own = Config.from_env({"APP_QUEUES": "a:1", "APP_PREFIX": "app"}, env_prefix="APP_")
    assert (own.prefix, dict(own.queues)) == ("app", {"a": 1})
    with pytest.raises(ConfigError, match="did you mean APP_QUEUES"):
        Config.from_env({"APP_QUEUS": "a:1"}, env_prefix="APP_")


@pytest.mark.parametrize("field", ["node", "name", "dsn"])
@pytest.mark.parametrize(("bad", "words"), [("a\x00b", "NUL"), ("a\ud800b", "lone surrogate")])
def test_free_text_settings_refuse_what_postgresql_cannot_take(
    field: str, bad: str, words: str
) -> None:
    # A NUL in node broke the connection string at open(); in name, leader election failed
    # forever (no lifeline, pruner or cron on that node).
    settings: dict[str, Any] = {field: bad}
    with pytest.raises(ConfigError, match=words) as raised:
        Config(**settings)
    assert raised.value.field == field


@pytest.mark.parametrize("prefix", ["pg_jobs", "pg_catalog", "pg_temp", "pg_"])
def test_prefixes_postgresql_reserves_are_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match="reserves schema names starting with 'pg_'") as raised:
        Config(prefix=prefix)
    assert raised.value.field == "prefix"
    assert Config(prefix="jobs_pg_x").prefix == "jobs_pg_x"


def test_a_queue_name_error_states_the_whole_rule() -> None:
    from trioban._validate import check_queue

    rule = "1 to 127 printable chars without spaces"
    with pytest.raises(ConfigError, match=f"{rule}, got a name of 200 chars") as raised:
        Config(queues={"x" * 200: 1})
    assert raised.value.field == "queues"
    assert len(str(raised.value)) < 200  # not the whole name
    with pytest.raises(ConfigError, match=f"{rule}, got 'a b'"):
        Config(queues={"a b": 1})
    with pytest.raises(ValueError, match=f"queue to be a name of {rule}, got a name of 128 chars"):
        check_queue("q" * 128)
    assert Config(queues={"q" * 127: 1}).queues == {"q" * 127: 1}


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://app:s3cret@host/db", "postgresql://app:***@host/db"),
        ("postgres://app:s%40cret@h1,h2:5433/db", "postgres://app:***@h1,h2:5433/db"),
        (
            "postgresql://app@host/db?password=s3cret&sslmode=require",
            "postgresql://app@host/db?password=***&sslmode=require",
        ),
        ("host=h password=s3cret dbname=db", "host=h password=*** dbname=db"),
        ("host=h password = 's3 cret\\'' dbname=db", "host=h password = *** dbname=db"),
        ("host=h sslpassword=s3cret", "host=h sslpassword=***"),
        ("postgresql://h/db?pass%77ord=s3cret", "password=*** dbname=db host=h"),  # re-written
        ("postgresql://app@host/db", "postgresql://app@host/db"),
    ],
)
def test_repr_masks_the_dsn_password(dsn: str, shown: str) -> None:
    conf = Config(dsn=dsn)
    assert f"dsn={shown!r}," in repr(conf)
    assert "s3" not in repr(conf)
    assert conf.dsn == dsn  # the real value, to connect with


@pytest.mark.parametrize(
    "dsn", ["not a dsn", "postgresql://app:s3/cret@host/db", "postgresql://app@host:5x/db"]
)
def test_a_dsn_libpq_cannot_read_is_refused_without_showing_it(dsn: str) -> None:
    with pytest.raises(ConfigError, match="connection string") as raised:
        Config(dsn=dsn)
    assert raised.value.field == "dsn"
    assert "s3" not in str(raised.value)
    assert "not a" not in str(raised.value)


@pytest.mark.parametrize("value", ['"none"', '"None"', "false"])
def test_toml_can_keep_jobs_forever(tmp_path: Path, value: str) -> None:
    path = tmp_path / "conf.toml"
    path.write_text(f"[trioban]\nprune_max_age = {value}\n")
    assert Config.from_toml(path).prune_max_age is None
    assert Config.from_toml(path, prune_max_age=60).prune_max_age == 60.0
    path.write_text("[trioban]\nprune_max_age = true\n")
    with pytest.raises(ConfigError, match="'none' or false in TOML"):
        Config.from_toml(path)


@pytest.mark.parametrize(
    "variable", ["TRIOBAN_DATA_DIR", "TRIOBAN_PG_BIN", "TRIOBAN_TEST_DSN", "TRIOBAN_HEAVY"]
)
def test_from_env_skips_the_variables_trioban_reads_elsewhere(variable: str) -> None:
    env = {"TRIOBAN_DSN": "postgresql:///app", "TRIOBAN_QUEUES": "default:5", variable: "x"}
    assert Config.from_env(env) == Config(dsn="postgresql:///app", queues={"default": 5})
    # A typo of a setting is still an error.
    with pytest.raises(ConfigError, match="did you mean TRIOBAN_TESTING"):
        Config.from_env({**env, "TRIOBAN_TESTNG": "inline"})


def test_evolving_the_time_zone_moves_the_entries_without_their_own() -> None:
    crontab = [
        ("0 9 * * *", "app.workers.report", {"args": {"a": 1}, "queue": "reports"}),
        ("0 3 * * *", "app.workers.cleanup", {"timezone": "UTC"}),
    ]
    direct = Config(crontab=crontab, timezone="Europe/Paris")
    evolved = Config(crontab=crontab).evolve(timezone="Europe/Paris")
    assert [entry.timezone for entry in evolved.crontab] == ["Europe/Paris", "UTC"]
    assert evolved == direct
    assert evolved.crontab[0].args == {"a": 1}
    assert evolved.crontab[0].options == {"queue": "reports"}
    # Other changes keep the entries as they are; evolving back gives the original.
    assert direct.evolve(pool_size=3).crontab == direct.crontab
    assert evolved.evolve(timezone="UTC") == Config(crontab=crontab)
    # An explicit zone, even the config's own, stays when the config's zone changes.
    pinned = Config(crontab=[("0 9 * * *", "app.w", {"timezone": "UTC"})])
    assert pinned.evolve(timezone="Asia/Tokyo").crontab[0].timezone == "UTC"


def test_from_toml_of_a_file_not_in_utf8(tmp_path: Path) -> None:
    path = tmp_path / "conf.toml"
    path.write_bytes(b'[trioban]\nnode = "caf\xe9"\n')  # Latin-1
    with pytest.raises(ConfigError, match="not UTF-8") as raised:
        Config.from_toml(path)
    assert raised.value.field == "path"
