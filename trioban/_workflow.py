"""Workflows: jobs with dependencies on each other, run as a DAG across the cluster.

A workflow is built in memory, checked (unique names, known deps, no cycles) and inserted
in one statement. Jobs with deps wait ``suspended``; when a job of the workflow finishes, the
node that acked it releases the dependents whose deps are all done, or cancels those whose
deps failed (unless they ignore that), transitively. The release is an ``UPDATE ... WHERE
state = 'suspended'``, so of two nodes finishing the last two deps at once, exactly one
releases the dependent.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any, Final, final

import attrs

from ._job import Job, JobState, evolve
from ._validate import check_flag, check_own_keys

WORKFLOW_ID: Final = "workflow_id"
NAME: Final = "name"
DEPS: Final = "deps"
IGNORE_CANCELLED: Final = "ignore_cancelled"
IGNORE_DISCARDED: Final = "ignore_discarded"
OPTIONS: Final = "workflow_options"
STEP_KEYS: Final = (NAME, DEPS, IGNORE_CANCELLED, IGNORE_DISCARDED, OPTIONS)
"""The meta keys a step gets from its workflow (beside ``WORKFLOW_ID``, which new() refuses)."""
"""Meta of each step: the workflow-wide options set (appended steps inherit them)."""


@attrs.frozen
class _Step:
    name: str
    job: Job
    deps: tuple[str, ...]
    ignore_cancelled: bool
    ignore_discarded: bool


@final
class Workflow:
    """A DAG of jobs: ``Workflow().add("a", job).add("b", job, deps=["a"])``.

    ``ignore_cancelled``/``ignore_discarded`` (for the whole workflow, or per step) let a
    dependent run although a dep was cancelled or discarded; otherwise the dependent is
    cancelled, with the reason recorded, and so are its own dependents. Steps appended later
    (``oban.append_workflow``) inherit the workflow-wide options.

    A step can't be a unique job: a duplicate isn't inserted, and the run would then depend on
    another run's job. Build steps of a unique worker with ``new(..., unique=False)``.

    ``workflow_id`` (a fresh uuid by default) names one run: a workflow inserted under an id
    already in the database is refused.
    """

    def __init__(
        self,
        workflow_id: str | None = None,
        *,
        ignore_cancelled: bool = False,
        ignore_discarded: bool = False,
    ) -> None:
        if workflow_id is not None and (not isinstance(workflow_id, str) or not workflow_id):
            raise TypeError(f"expected workflow_id to be a non-empty str, got {workflow_id!r}")
        self.workflow_id = workflow_id or uuid.uuid4().hex
        self.ignore_cancelled = check_flag(ignore_cancelled, "ignore_cancelled")
        self.ignore_discarded = check_flag(ignore_discarded, "ignore_discarded")
        self._steps: dict[str, _Step] = {}
        self._existing: frozenset[str] = frozenset()  # names already inserted (appending)

    def __repr__(self) -> str:
        return f"<trioban.Workflow {self.workflow_id} steps={list(self._steps)}>"

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def names(self) -> list[str]:
        """The step names, in the order added."""
        return list(self._steps)

    def add(
        self,
        name: str,
        job: Job,
        *,
        deps: Iterable[str] = (),
        ignore_cancelled: bool | None = None,
        ignore_discarded: bool | None = None,
    ) -> Workflow:
        """Add a step named ``name`` running ``job`` after ``deps``; returns the workflow."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"expected a step name (a non-empty str), got {name!r}")
        if name in self._steps or name in self._existing:
            raise ValueError(f"workflow {self.workflow_id!r} already has a step named {name!r}")
        if not isinstance(job, Job) or job.saved:
            raise TypeError(f"expected an unsaved Job (from Worker.new) for step {name!r}")
        check_own_keys(job.meta, STEP_KEYS, f"step {name!r}", "the workflow")
        if job._unique is not None:
            # A duplicate wouldn't be inserted: this run's dependents would wait on, or be
            # released by, another run's job.
            raise ValueError(
                f"step {name!r} is a unique job ({job.worker}); a workflow step can't be "
                "unique: build it with new(..., unique=False)"
            )
        if isinstance(deps, str | Mapping) or not isinstance(deps, Iterable):
            raise TypeError(f"expected deps of {name!r} to be a list of step names, got {deps!r}")
        dep_names = tuple(deps)
        for dep in dep_names:
            if not isinstance(dep, str) or not dep:
                raise TypeError(f"expected deps of {name!r} to be step names, got {dep!r}")
        if len(set(dep_names)) != len(dep_names):
            raise ValueError(f"step {name!r} lists a dep twice: {list(dep_names)}")
        self._steps[name] = _Step(
            name,
            job,
            dep_names,
            self.ignore_cancelled
            if ignore_cancelled is None
            else check_flag(ignore_cancelled, "ignore_cancelled"),
            self.ignore_discarded
            if ignore_discarded is None
            else check_flag(ignore_discarded, "ignore_discarded"),
        )
        return self

    def build(self) -> list[Job]:
        """The jobs to insert, checked: every dep known, no cycle. Held jobs are suspended."""
        if not self._steps:
            raise ValueError(f"workflow {self.workflow_id} has no steps; add some with .add()")
        for step in self._steps.values():
            for dep in step.deps:
                if dep not in self._steps and dep not in self._existing:
                    raise ValueError(
                        f"step {step.name!r} depends on {dep!r}, which is not a step of "
                        f"workflow {self.workflow_id}; add it first or fix the name"
                    )
        _check_acyclic({name: step.deps for name, step in self._steps.items()})
        return [self._job(step) for step in self._steps.values()]

    def sinks(self) -> list[str]:
        """Steps no other step depends on: the workflow's final steps."""
        needed = {dep for step in self._steps.values() for dep in step.deps}
        return [name for name in self._steps if name not in needed]

    def _job(self, step: _Step) -> Job:
        meta: dict[str, Any] = {
            **step.job.meta,
            WORKFLOW_ID: self.workflow_id,
            NAME: step.name,
            DEPS: list(step.deps),
        }
        if step.ignore_cancelled:
            meta[IGNORE_CANCELLED] = True
        if step.ignore_discarded:
            meta[IGNORE_DISCARDED] = True
        options = self._options()
        if options:
            meta[OPTIONS] = options
        state = JobState.SUSPENDED if step.deps else step.job.state
        return evolve(step.job, meta=meta, state=state)

    def _options(self) -> dict[str, bool]:
        """The workflow-wide options that differ from the defaults."""
        options = {IGNORE_CANCELLED: self.ignore_cancelled, IGNORE_DISCARDED: self.ignore_discarded}
        return {name: value for name, value in options.items() if value}

    @classmethod
    def _appending(cls, workflow_id: str, existing: Collection[str], options: object) -> Workflow:
        """A workflow adding steps to ``workflow_id``, with the options it was inserted with
        (``options``: the ``workflow_options`` meta of its steps)."""
        known = options if isinstance(options, Mapping) else {}
        appended = cls(
            workflow_id,
            ignore_cancelled=known.get(IGNORE_CANCELLED) is True,
            ignore_discarded=known.get(IGNORE_DISCARDED) is True,
        )
        appended._existing = frozenset(existing)
        return appended


def _option(value: bool | None, default: bool, field: str) -> bool:
    return default if value is None else check_flag(value, field)


def _check_acyclic(graph: Mapping[str, tuple[str, ...]]) -> None:
    """Raise ``ValueError`` naming a cycle of ``graph`` (step -> deps), if there is one."""
    done: set[str] = set()
    for start in graph:
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(graph.get(start, ())))]
        path.append(start)
        on_path.add(start)
        while stack:
            node, deps = stack[-1]
            dep = next(deps, None)
            if dep is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif dep in on_path:
                cycle = [*path[path.index(dep) :], dep]
                raise ValueError("workflow has a cycle: " + " -> ".join(reversed(cycle)))
            elif dep not in done and dep in graph:
                stack.append((dep, iter(graph[dep])))
                path.append(dep)
                on_path.add(dep)
