"""Background training jobs: start, follow, cancel. One job at a time per machine.

A job is ``python -m boneai train --config JOB/config.json`` run by a small supervisor process
(``python -m boneai.jobs supervise JOB_DIR LOCK_FILE LOCK_FD``) that is detached from whoever started
it. The supervisor writes the exit status and releases the machine-wide lock when training ends, so a
job outlives the web page, the Streamlit session and even the Streamlit server.

The lock is ``jobs/lock`` held with ``fcntl.flock`` by the supervisor for the job's lifetime: the
starter takes it (the file appears already locked, through a hard link) and hands the open file to
the supervisor. Whether the machine is busy is whether that lock is held, never what the file says,
so a lock file written a moment ago is never mistaken for a stale one, and a supervisor that dies,
even by SIGKILL, frees the lock with its last breath. Training dies with it (``PR_SET_PDEATHSIG`` on
Linux) and what is left of its process group is killed when the stale lock is next seen, so no
training runs unseen beside a second job. Everything about a job lives on disk::

    jobs/
      lock                 id of the running job, flock-ed by its supervisor (absent when the machine is free)
      <job id>/
        job.json           what was asked: task, arguments, command, output folder, pids, times
        config.json        a training job's options (``TrainConfig`` as JSON), read by ``train --config``
        stdout.log         one JSON line per epoch (from the train command), then {"event": "done"}
        stderr.log         progress bars, warnings, and ``error: ...`` on failure
        result.json        written at the end: state (succeeded/failed/cancelled), return code, time
        run/               the training output (card.json, model.safetensors, val_predictions.csv...)

``BONEAI_JOBS_DIR`` moves the ``jobs/`` folder. This module never imports Streamlit.

Example:
    >>> from boneai.jobs import JobRunner, TrainRequest
    >>> runner = JobRunner("/tmp/boneai-jobs")                                     # doctest: +SKIP
    >>> job = runner.start(TrainRequest(task="fracture", data="data/fracatlas", epochs=1, limit=40))  # doctest: +SKIP
    >>> runner.status(job.id).epochs_done                                          # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from boneai.config import TrainConfig, check_config, config_argv, config_to_dict
from boneai.errors import BoneAIError

__all__ = [
    "JobBusyError",
    "JobNotFoundError",
    "TrainRequest",
    "JobStatus",
    "JobRunner",
    "default_jobs_dir",
]

_REPO_ROOT = Path(__file__).resolve().parents[1]
_TERMINAL = ("succeeded", "failed", "cancelled")


class JobBusyError(BoneAIError):
    """Another training job holds this machine."""


class JobNotFoundError(BoneAIError):
    """No job with that id in the jobs folder."""


def default_jobs_dir() -> Path:
    """``BONEAI_JOBS_DIR`` if set, else ``jobs/`` in the repository root."""
    env = os.environ.get("BONEAI_JOBS_DIR")
    return Path(env) if env else _REPO_ROOT / "jobs"


@dataclass
class TrainRequest(TrainConfig):
    """A training job: the options of ``python -m boneai train``, each defined once on
    :class:`~boneai.config.TrainConfig` (this class adds none); the job chooses ``out`` itself."""

    def config(self, out: str | Path) -> TrainConfig:
        """The run's configuration with output folder ``out``, checked as the train command checks it,
        so that the form says at once what is wrong instead of a job failing a moment later.

        The parent (``init_from``) and teacher (``distill_from``) go through
        :func:`boneai.train.check_related_models`, the very function the command runs: task,
        architecture, ensemble member, teacher's weight, and that neither trained on this run's
        validation images (a model of other data is fine).

        Raises:
            BoneAIError: what is wrong, in the command's words.
        """
        try:
            check_config(self)
        except ValueError as exc:
            raise BoneAIError(f"Invalid training option: {exc}.") from None
        if not self.data or not Path(self.data).is_dir():
            raise BoneAIError(f"Data folder not found: {self.data or '(empty)'}.")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise BoneAIError("Epochs and batch size must be at least 1 and the learning rate positive.")
        if self.freeze_blocks < 0:
            raise BoneAIError("Frozen blocks cannot be negative.")
        config = TrainConfig(**{**config_to_dict(self), "out": str(out)})
        # Imported here, not at the top: boneai.train loads torch, and the supervisor process, which
        # imports this module, should stay small for the hours a job runs.
        from boneai.train import check_related_models

        try:
            check_related_models(config)
        except (ValueError, FileNotFoundError) as exc:
            raise BoneAIError(str(exc)) from None
        return config


@dataclass
class JobStatus:
    """A job as read from disk at one moment."""

    id: str
    state: str  # running | succeeded | failed | cancelled
    task: str
    command: list[str]
    run_dir: Path
    started_at: str
    finished_at: str | None = None
    returncode: int | None = None
    epochs_total: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    error: str | None = None  # the command's ``error: ...`` line, or why it stopped

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    @property
    def progress(self) -> float:
        """Fraction of epochs finished (0..1); 1 once the job succeeded, even after early stopping."""
        if self.state == "succeeded":
            return 1.0
        if not self.epochs_total:
            return 0.0
        return min(1.0, self.epochs_done / self.epochs_total)

    @property
    def last(self) -> dict[str, Any]:
        """The latest epoch record (empty before the first epoch ends)."""
        return self.history[-1] if self.history else {}

    @property
    def finished(self) -> bool:
        return self.state in _TERMINAL


class JobRunner:
    """Starts and follows jobs in one jobs folder (default ``jobs/`` in the repository)."""

    def __init__(self, jobs_dir: str | Path | None = None, python: str | None = None) -> None:
        self.root = Path(jobs_dir) if jobs_dir is not None else default_jobs_dir()
        self.python = python or sys.executable

    # -- lock ------------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.root / "lock"

    def _read_lock(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.lock_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def running_job_id(self) -> str | None:
        """The id of the job holding the machine, clearing a lock whose supervisor has died.

        Busy means the lock file is ``flock``-ed (by a supervisor, or a starter about to hand it
        over). An unlocked lock file is stale: its job's leftovers are killed and the file removed.
        """
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:  # shared: two pages asking at once do not take each other for the job
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                lock = _parse_lock(os.pread(fd, 4096, 0))
                return str(lock["id"]) if lock and lock.get("id") else None
            lock = _parse_lock(os.pread(fd, 4096, 0))
        finally:
            os.close(fd)
        if _legacy_holder_alive(lock):
            return str(lock["id"])
        self._clear_stale_lock()
        return None

    def _clear_stale_lock(self) -> bool:
        """Remove the lock file if nobody holds it, first ending what is left of its job; False if held."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            # Held by us now, so no supervisor has it; the path must still be this file, not a new one.
            if not _same_file(fd, self.lock_path):
                return True
            lock = _parse_lock(os.pread(fd, 4096, 0))
            if _legacy_holder_alive(lock):
                return False
            if lock and lock.get("id"):
                self._end_orphaned_training(str(lock["id"]))
            self.lock_path.unlink()
            return True
        finally:
            os.close(fd)

    def _end_orphaned_training(self, job_id: str) -> None:
        """Kill what is left of the process group of a job whose supervisor died."""
        meta = _read_json(self.root / job_id / "job.json") if "/" not in job_id else None
        if meta and meta.get("train_pid"):
            _kill_orphaned_group(int(meta["train_pid"]), str(meta.get("started_at") or ""))

    # -- start -----------------------------------------------------------------------------------
    def start(self, request: TrainRequest) -> JobStatus:
        """Start ``python -m boneai train --config JOB/config.json`` as a job.

        Raises:
            BoneAIError: the request is one the command would refuse (see :meth:`TrainRequest.config`).
            JobBusyError: another job runs.
        """
        config = config_to_dict(request.config(out="{run_dir}"))
        return self.start_command(["-m", "boneai", "train", "--config", "{job_dir}/config.json"], task=request.task,
                                  epochs_total=request.epochs, request=config, files={"config.json": config})

    def start_adapt(self, data: str | Path, parent: str = "fracture") -> JobStatus:
        """Start site adaptation, ``python -m boneai adapt --data DATA --from PARENT``, as a job (its
        model folder is the job's ``run/``; the Site validation page registers it like a training run).

        Raises:
            BoneAIError: no such data folder, or a parent that adaptation cannot take. JobBusyError:
                another job runs.
        """
        from boneai.site import check_parent

        if not Path(data).is_dir():
            raise BoneAIError(f"Data folder not found: {data}.")
        check_parent(parent)  # a localiser, a site model: said now, not when the job fails
        argv = ["-m", "boneai", "adapt", "--task", "fracture", "--data", str(data), "--from", str(parent),
                "--out", "{run_dir}", "--cache", "{job_dir}/features"]
        return self.start_command(argv, task="fracture", request={"kind": "adapt", "data": str(data), "from": parent})

    def start_command(self, argv: list[str], task: str = "fracture", epochs_total: int | None = None,
                      request: dict[str, Any] | None = None,
                      files: dict[str, dict[str, Any]] | None = None) -> JobStatus:
        """Start ``python ARGV`` as a job.

        ``{run_dir}`` in ARGV, and in the string values of ``files``, becomes the job's output folder;
        ``{job_dir}`` in ARGV the job's folder. ``files`` (name -> JSON object) are written into the job's
        folder before the command starts.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        job_id = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{os.urandom(2).hex()}"
        job_dir = self.root / job_id
        lock_fd = self._acquire_lock(job_id)
        proc: subprocess.Popen | None = None
        try:
            job_dir.mkdir()
            run_dir = job_dir / "run"
            command = [self.python] + [a.replace("{run_dir}", str(run_dir)).replace("{job_dir}", str(job_dir))
                                       for a in argv]
            for name, data in (files or {}).items():
                _write_json(job_dir / name, _with_run_dir(data, run_dir))
            meta = {"id": job_id, "task": task, "command": command, "run_dir": str(run_dir),
                    "epochs_total": epochs_total, "request": _with_run_dir(request or {}, run_dir),
                    "started_at": _now(), "supervisor_pid": None, "train_pid": None}
            _write_json(job_dir / "job.json", meta)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH", "")]))
            # A new session: the supervisor (and training under it) outlive the app's process and a
            # Ctrl-C in the terminal running Streamlit does not reach them. The supervisor inherits the
            # locked file (pass_fds) and holds the lock from here on.
            with open(job_dir / "supervisor.log", "wb") as sup_log:
                proc = subprocess.Popen([self.python, "-m", "boneai.jobs", "supervise", str(job_dir),
                                         str(self.lock_path), str(lock_fd)], cwd=str(_REPO_ROOT), env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sup_log,
                                        start_new_session=True, pass_fds=(lock_fd,))
            _CHILDREN[job_id] = proc
            meta["supervisor_pid"] = proc.pid
            _write_json(job_dir / "job.json", meta)
        except BaseException:
            if proc is None:
                _release_lock(lock_fd, self.lock_path)
            else:  # the supervisor runs and holds the lock; it releases it when the job ends
                os.close(lock_fd)
            raise
        os.close(lock_fd)  # the supervisor's copy keeps the lock; this process must not
        return self.status(job_id)

    def _acquire_lock(self, job_id: str, wait: float = 0.5) -> int:
        """Take the machine-wide lock for ``job_id``; returns the open, ``flock``-ed lock file.

        The file is written and locked under a temporary name, then hard-linked to ``lock``: it
        appears complete and already held, and the link fails if a lock file exists, so of two
        sessions pressing Start at once exactly one gets it. An existing file nobody holds is stale
        and removed first. ``wait`` seconds of retries cover another page probing the lock.

        Raises:
            JobBusyError: another job holds the lock.
        """
        tmp = self.root / f".lock-{os.getpid()}-{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file nobody else knows: never blocks
            os.write(fd, json.dumps({"id": job_id, "started_by": os.getpid()}).encode())
            deadline = time.monotonic() + wait
            while True:
                try:
                    os.link(tmp, self.lock_path)
                    return fd
                except FileExistsError:
                    pass
                if not self._clear_stale_lock() and time.monotonic() > deadline:
                    holder = self.running_job_id()
                    raise JobBusyError(
                        f"A training job{f' ({holder})' if holder else ''} is already running on this machine; "
                        "only one runs at a time. Wait for it to finish or cancel it, then start again.")
                time.sleep(0.02)
        except BaseException:
            os.close(fd)
            raise
        finally:
            tmp.unlink(missing_ok=True)

    # -- follow ----------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        d = self.root / job_id
        if not job_id or "/" in job_id or job_id.startswith(".") or not (d / "job.json").is_file():
            raise JobNotFoundError(f"No training job {job_id!r} in {self.root}.")
        return d

    def status(self, job_id: str) -> JobStatus:
        """Read a job's state, progress and epoch history from its folder."""
        _reap()
        d = self.job_dir(job_id)
        meta = json.loads((d / "job.json").read_text())
        result = _read_json(d / "result.json")
        history, done_event = _parse_stdout(d / "stdout.log")
        error = None
        if result is not None:
            state, rc, finished = result["state"], result.get("returncode"), result.get("finished_at")
            if state == "failed":
                error = result.get("error") or _error_line(d / "stderr.log") or f"training exited with status {rc}"
        else:
            rc, finished = None, None
            state = "running"
            if not _pid_alive(int(meta.get("supervisor_pid") or 0)):
                # The supervisor died without writing a result (machine reboot, kill -9).
                state, error = "failed", "the job stopped unexpectedly (its supervisor is gone)"
        return JobStatus(id=meta["id"], state=state, task=meta["task"], command=meta["command"],
                         run_dir=Path(meta["run_dir"]), started_at=meta["started_at"], finished_at=finished,
                         returncode=rc, epochs_total=meta.get("epochs_total"), history=history, error=error)

    def list_jobs(self) -> list[str]:
        """Job ids, newest first."""
        if not self.root.is_dir():
            return []
        return sorted((p.name for p in self.root.iterdir() if (p / "job.json").is_file()), reverse=True)

    def current(self) -> JobStatus | None:
        """The running job, else the newest one (what a page shows after a reload), else None."""
        running = self.running_job_id()
        if running:
            return self.status(running)
        ids = self.list_jobs()
        return self.status(ids[0]) if ids else None

    def command_text(self, job_id: str) -> str:
        """The job's command for display: a training job's ``train --config FILE`` spelled out as the
        equivalent flags (what its model card records), any other job's command as it ran."""
        d = self.job_dir(job_id)
        meta = json.loads((d / "job.json").read_text())
        config = _read_json(d / "config.json")
        if config is not None and meta["command"][1:4] == ["-m", "boneai", "train"]:
            try:
                return "python -m boneai " + shlex.join(["train", *config_argv(TrainConfig(**config))])
            except (TypeError, ValueError):  # a config.json from another version: show the command as run
                pass
        return " ".join(meta["command"][1:])

    def log_tail(self, job_id: str, lines: int = 30) -> str:
        """The last lines of the job's output (epoch records and progress/errors), for display."""
        d = self.job_dir(job_id)
        out = []
        for name in ("stdout.log", "stderr.log"):
            text = _tail_text(d / name)
            # Progress bars redraw with carriage returns; keep only each line's final state.
            out.extend(last for seg in text.split("\n") if (last := _final_state(seg)))
        return "\n".join(out[-lines:])

    # -- cancel ----------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> bool:
        """Ask a running job to stop; returns False when it had already finished."""
        d = self.job_dir(job_id)
        if (d / "result.json").is_file():
            return False
        meta = json.loads((d / "job.json").read_text())
        sup = int(meta.get("supervisor_pid") or 0)
        if _pid_alive(sup):
            os.kill(sup, signal.SIGTERM)  # the supervisor stops training, writes the result, frees the lock
            return True
        # No supervisor: stop training directly and clean up on its behalf.
        _terminate_group(int(meta.get("train_pid") or 0))
        _write_result(d, "cancelled", None, "cancelled (supervisor was gone)")
        if (self._read_lock() or {}).get("id") == job_id:
            self._clear_stale_lock()  # only if nobody holds it: never another job's lock
        return True

    def wait(self, job_id: str, timeout: float = 600.0, poll: float = 0.5) -> JobStatus:
        """Block until the job finishes (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(job_id)
            if st.finished or time.monotonic() > deadline:
                return st
            time.sleep(poll)


# -- supervisor (runs in its own process) ----------------------------------------------------------
def _supervise(job_dir: Path, lock_path: Path, lock_fd: int | None = None) -> int:
    """Run the job's command, record how it ended, release the lock (held on ``lock_fd``).

    Without ``lock_fd`` (started by hand) the supervisor takes the lock itself.
    """
    meta = json.loads((job_dir / "job.json").read_text())
    if lock_fd is None:
        try:
            lock_fd = JobRunner(lock_path.parent)._acquire_lock(meta["id"])
        except JobBusyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    cancelled = {"flag": False}
    with open(job_dir / "stdout.log", "ab") as out, open(job_dir / "stderr.log", "ab") as err:
        # Training does not inherit the lock (close_fds) and is killed when this process dies.
        proc = subprocess.Popen(meta["command"], cwd=str(_REPO_ROOT), stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent(os.getpid()))
        meta["train_pid"] = proc.pid
        _write_json(job_dir / "job.json", meta)

        def on_term(signum: int, frame: Any) -> None:
            cancelled["flag"] = True
            _terminate_group(proc.pid)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_term)
        rc = proc.wait()
        try:  # data workers a crashed leader left behind; none (ESRCH) after a clean exit
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if cancelled["flag"]:
        _write_result(job_dir, "cancelled", rc, None)
    elif rc == 0:
        _write_result(job_dir, "succeeded", rc, None)
    else:
        _write_result(job_dir, "failed", rc, _error_line(job_dir / "stderr.log"))
    _release_lock(lock_fd, lock_path)
    return 0


def _release_lock(fd: int, lock_path: Path) -> None:
    """Remove the lock file while still holding it (so nobody takes a file about to vanish), then let go."""
    try:
        if _same_file(fd, lock_path):
            lock_path.unlink()
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open on ``fd`` (not removed, not replaced)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _legacy_holder_alive(lock: dict[str, Any] | None) -> bool:
    """A lock file of the previous version (``{"id", "pid"}``, no flock) whose supervisor still runs:
    an upgrade while a job trains must not take that job for stale and kill it."""
    return bool(lock and lock.get("id") and "pid" in lock and _pid_alive(int(lock.get("pid") or 0)))


def _parse_lock(data: bytes) -> dict[str, Any] | None:
    try:
        lock = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return lock if isinstance(lock, dict) else None


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child SIGKILLed when ``parent_pid`` (the supervisor) dies (Linux).

    Without it, a supervisor killed with SIGKILL would leave training running unseen while the lock
    is free. ``prctl`` is looked up here, before the fork, so the child only calls it.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the stale-lock sweep ends the job instead
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl: no signal would ever come
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _kill_orphaned_group(pgid: int, started_at: str) -> None:
    """SIGKILL the processes of group ``pgid`` that started after the job did (Linux ``/proc``).

    Only processes younger than the job: after the group emptied, its number could name another.
    """
    try:
        # Boot time is whole seconds and start times are clock ticks: allow for the rounding.
        since = datetime.fromisoformat(started_at).timestamp() - 2.0 if started_at else 0.0
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        ticks = os.sysconf("SC_CLK_TCK")
        entries = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    except (OSError, ValueError, StopIteration):
        return
    for entry in entries:
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields[0] is the state (field 3 of stat); pgrp is field 5, start time (ticks) field 22.
        if int(fields[2]) == pgid and boot + int(fields[19]) / ticks >= since:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _terminate_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group of ``pid`` (training and its data workers), SIGKILL after ``grace`` s."""
    if pid <= 0 or not _pid_alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- helpers ---------------------------------------------------------------------------------------
_CHILDREN: dict[str, subprocess.Popen] = {}


def _reap() -> None:
    """Collect exited supervisors started by this process so they do not linger as zombies."""
    for job_id, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[job_id]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    for proc in _CHILDREN.values():  # our own children: poll() also reaps them
        if proc.pid == pid:
            return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie answers kill(0); on Linux /proc tells the difference.
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return True


def _with_run_dir(data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``data`` with ``{run_dir}`` in its string values replaced by the job's output folder."""
    return {k: v.replace("{run_dir}", str(run_dir)) if isinstance(v, str) else v for k, v in data.items()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)  # readers never see half a file


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_result(job_dir: Path, state: str, rc: int | None, error: str | None) -> None:
    _write_json(job_dir / "result.json", {"state": state, "returncode": rc, "error": error, "finished_at": _now()})


def _parse_stdout(path: Path) -> tuple[list[dict[str, Any]], bool]:
    history, done = [], False
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return history, done
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if "train_loss" in rec and int(rec.get("epoch", 0)) >= 1:  # epoch 0 is the untrained baseline
            history.append(rec)
        elif rec.get("event") == "done":
            done = True
    return history, done


def _tail_text(path: Path, max_bytes: int = 64_000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _final_state(line: str) -> str:
    """A terminal line as last drawn: progress bars redraw with carriage returns and may blank it at the end."""
    parts = [p.strip() for p in line.split("\r")]
    return next((p for p in reversed(parts) if p), "")


def _error_line(stderr_path: Path) -> str | None:
    lines = [_final_state(seg) for seg in _tail_text(stderr_path).split("\n")]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    tail = [ln for ln in lines if ln]
    return tail[-1] if tail else None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) in (3, 4) and args[0] == "supervise":
        return _supervise(Path(args[1]), Path(args[2]), int(args[3]) if len(args) == 4 else None)
    print("usage: python -m boneai.jobs supervise JOB_DIR LOCK_FILE [LOCK_FD]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
