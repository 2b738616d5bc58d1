"""The GPU check's plumbing: its JSON record, written again after every finished item so that a run cut
short keeps what it did, and a runner of subprocess jobs with time budgets, dependencies and a few at
a time. Nothing here knows what the jobs are (scripts/gpu_check.py and its phase modules say that)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT = "RESULT "  # a job's last line starting with this carries its figures as JSON
HYDRA_HINT = "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Record:
    """The check's JSON file: ``{"phases": {phase: {"items": {name: {...}}, ...}}, ...}``, rewritten
    atomically (a temporary file renamed) after every change."""

    def __init__(self, path: Path, head: Mapping[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**head, "phases": {}}
        self.save()

    def phase(self, name: str) -> dict[str, Any]:
        return self.data["phases"].setdefault(name, {"status": "running", "started": now(), "items": {}})

    def item(self, phase: str, name: str, value: Mapping[str, Any]) -> None:
        self.phase(phase)["items"][name] = dict(value)
        self.save()

    def update(self, phase: str | None = None, **values: Any) -> None:
        (self.phase(phase) if phase else self.data).update(values)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


class CheckFailed(AssertionError):
    """A job exited 0 but what it left is not what the check expects (the message says what)."""


Argv = Sequence[str] | Callable[[], Sequence[str]]


@dataclass
class Job:
    """One subprocess of the check.

    Args:
        name: its key in the record.
        argv: the command, or a function that makes it when the job starts (after its dependencies).
        timeout_s: wall seconds before it is killed (its process group: DDP ranks and loader workers too).
        needs: names of jobs that must have passed first; if one did not, this one is skipped.
        check: reads what the job left (``log`` text) and returns details for the record, or raises
            :class:`CheckFailed`.
        env: variables added to the environment.
        min_start_s: not started when less than this is left before the deadline.
    """

    name: str
    argv: Argv
    timeout_s: float
    needs: Sequence[str] = ()
    check: Callable[[str], Mapping[str, Any]] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    min_start_s: float = 5.0


def result_of(log: str) -> dict[str, Any]:
    """The JSON of the log's last ``RESULT`` line (CheckFailed when there is none)."""
    lines = [ln for ln in log.splitlines() if ln.startswith(RESULT)]
    if not lines:
        raise CheckFailed("the job printed no RESULT line")
    return dict(json.loads(lines[-1][len(RESULT):]))


def error_text(log: str, limit: int = 1500) -> str:
    """What a failed job's log says about why: its last traceback, else its last lines."""
    log = log.replace(HYDRA_HINT, "")
    i = log.rfind("Traceback (most recent call last)")
    text = log[i:] if i >= 0 else "\n".join(log.strip().splitlines()[-15:])
    return text if len(text) <= limit else "..." + text[-limit:]


def headline(error: str) -> str:
    """The one line of an error text that names it: the exception's line, else the last line."""
    lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Exit|Interrupt|Failed)\b", ln)]
    return (named or lines or [""])[-1]


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    log_path: Path
    start: float


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the job's own process group: its children too
    except ProcessLookupError:
        pass
    proc.wait()


def run_jobs(jobs: Sequence[Job], logs: Path, deadline: float, parallel: int = 1,
             on_done: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``jobs``, at most ``parallel`` at a time, in list order as their dependencies allow, until
    ``deadline`` (a ``time.monotonic()`` value): then every job still running is killed and the rest
    are reported as not run. ``on_done(name, result)`` is called as each one ends.

    Returns ``{name: {"status": pass|fail|timeout|skipped|not run, "wall_s", "error", ...details}}``.
    """
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    waiting = list(jobs)
    running: list[_Running] = []

    def finish(name: str, result: dict[str, Any]) -> None:
        results[name] = result
        if on_done is not None:
            on_done(name, result)

    try:
        _loop(waiting, running, results, finish, logs, deadline, parallel)
    finally:  # an exception or a signal (SIGTERM: the check was stopped) takes the running jobs with it
        for r in running:
            _kill(r.proc)
    return results


def _loop(waiting: list[Job], running: list[_Running], results: dict[str, dict[str, Any]],
          finish: Callable[[str, dict[str, Any]], None], logs: Path, deadline: float, parallel: int) -> None:
    while waiting or running:
        for r in list(running):
            elapsed = time.monotonic() - r.start
            code = r.proc.poll()
            if code is None and elapsed < r.job.timeout_s and time.monotonic() < deadline:
                continue
            if code is None:
                _kill(r.proc)
            running.remove(r)
            log = r.log_path.read_text(errors="replace")
            res: dict[str, Any] = {"wall_s": round(elapsed, 1), "log": str(r.log_path)}
            if code is None:
                why = "its time budget" if elapsed >= r.job.timeout_s else "the phase's deadline"
                res.update(status="timeout", error=f"killed after {elapsed:.0f} s ({why})\n" + error_text(log))
            elif code != 0:
                res.update(status="fail", returncode=code, error=error_text(log))
            else:
                try:  # the job's own figures, under the runner's status and timing
                    res = {**dict(r.job.check(log) if r.job.check else {}), "status": "pass", **res}
                except CheckFailed as e:
                    res.update(status="fail", error=str(e))
                except Exception as e:  # noqa: BLE001 - a broken output is this job's failure, not the check's
                    res.update(status="fail", error=f"{type(e).__name__}: {e}")
            finish(r.job.name, res)
        for job in list(waiting):
            failed = [n for n in job.needs if n in results and results[n]["status"] != "pass"]
            if failed:
                waiting.remove(job)
                finish(job.name, {"status": "skipped", "error": f"needs {', '.join(failed)}, which did not pass"})
                continue
            if len(running) >= parallel or any(n not in results for n in job.needs):
                continue
            if deadline - time.monotonic() < job.min_start_s:
                waiting.remove(job)
                finish(job.name, {"status": "not run", "error": "out of time before it could start"})
                continue
            waiting.remove(job)
            log_path = logs / f"{job.name}.log"
            try:
                argv = list(job.argv() if callable(job.argv) else job.argv)
            except Exception as e:  # noqa: BLE001 - e.g. a file its dependency should have written
                finish(job.name, {"status": "fail", "error": f"could not make its command: {type(e).__name__}: {e}"})
                continue
            with open(log_path, "w") as out:
                out.write("$ " + " ".join(argv) + "\n")
                out.flush()
                # Its own process group (to kill it whole) in the check's session: whatever ends the
                # check's session (the device tool at its time limit) ends the jobs too.
                proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                        env={**os.environ, **job.env}, process_group=0)
            running.append(_Running(job, proc, log_path, time.monotonic()))
        if waiting and not running and all(any(n not in results for n in j.needs) for j in waiting):
            for job in waiting:  # their dependencies are not in this run
                finish(job.name, {"status": "skipped", "error": f"needs {', '.join(job.needs)}, not run here"})
            waiting.clear()
        time.sleep(0.1)
