"""Background jobs: one at a time, progress from the JSON lines, cancel, failure, state on disk."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from boneai.errors import BoneAIError
from boneai.jobs import JobBusyError, JobNotFoundError, JobRunner, TrainRequest

REPO = Path(__file__).resolve().parents[1]
ENSEMBLE = REPO / "weights" / "fracture_ensemble"  # the shipped two-model fracture ensemble

sys.path.insert(0, str(Path(__file__).parent))
from _fixtures_train import fracture_folder  # noqa: E402


def _epoch_script(epochs: int, sleep_after: float = 60.0, rc: int = 0, stderr: str = "") -> list[str]:
    """A stand-in for the train command: prints epoch records like it, then sleeps and exits."""
    lines = [json.dumps({"epoch": 0, "val_loss": 0.9, "val_auc": 0.5})]
    lines += [json.dumps({"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_auc": 0.5 + e / 10})
              for e in range(1, epochs + 1)]
    code = (f"import sys, time\nfor l in {lines!r}: print(l, flush=True)\n"
            f"sys.stderr.write({stderr!r}); sys.stderr.flush()\ntime.sleep({sleep_after})\nsys.exit({rc})")
    return ["-c", code]


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def test_train_request_is_the_config_the_command_reads(tmp_path: Path) -> None:
    req = TrainRequest(task="fracture", data=str(tmp_path), model="resnet18", epochs=3, image_size=192,
                       batch_size=8, lr=3e-4, loss="focal", limit=40)
    config = req.config(out="OUT")
    assert (config.out, config.epochs, config.image_size, config.batch_size, config.lr, config.loss, config.limit) == (
        "OUT", 3, 192, 8, 3e-4, "focal", 40)
    # The train command reads it back from config.json exactly (no flags rebuilt by hand on the way).
    from boneai.cli import build_parser
    from boneai.config import TrainConfig, config_from_args, config_to_dict

    path = tmp_path / "config.json"
    path.write_text(json.dumps(config_to_dict(config)))
    assert config_from_args(TrainConfig, build_parser().parse_args(["train", "--config", str(path)])) == config


def test_fine_tuning_options_reach_the_command_and_a_wrong_parent_is_refused(tmp_path: Path) -> None:
    shipped = REPO / "weights" / "fracture_fast"
    data = fracture_folder(tmp_path / "data", per_class=4)
    # The shipped parent never saw this folder's images: accepted (fine-tuning on a site's own images).
    config = TrainRequest(task="fracture", data=str(data), model="efficientnet_lite0", augment="basic", clahe=True,
                          freeze_blocks=2, init_from=str(shipped)).config("OUT")
    assert (config.augment, config.clahe, config.freeze_blocks, config.init_from) == ("basic", True, 2, str(shipped))
    with pytest.raises(BoneAIError, match="choose that architecture"):
        TrainRequest(task="fracture", data=str(data), model="resnet18", init_from=str(shipped)).config("OUT")
    with pytest.raises(BoneAIError, match="bone-age|boneage"):
        TrainRequest(task="boneage", data=str(data), init_from=str(shipped)).config("OUT")
    with pytest.raises(BoneAIError, match="no card.json"):
        TrainRequest(task="fracture", data=str(data), init_from=str(tmp_path)).config("OUT")
    with pytest.raises(BoneAIError, match="is an ensemble"):
        TrainRequest(task="fracture", data=str(data), init_from=str(ENSEMBLE)).config("OUT")
    with pytest.raises(BoneAIError, match="is an ensemble"):
        TrainRequest(task="fracture", data=str(data), init_from=str(ENSEMBLE), init_member=7).config("OUT")
    with pytest.raises(BoneAIError, match="not an ensemble"):
        TrainRequest(task="fracture", data=str(data), init_from=str(shipped), init_member=0).config("OUT")
    with pytest.raises(BoneAIError, match="apply to the fracture and bone-age tasks"):
        TrainRequest(task="anomaly", data=str(data), init_from=str(shipped)).config("OUT")


def test_distillation_from_an_ensemble_member_reaches_the_command(tmp_path: Path) -> None:
    """A fast student: one member of the shipped ensemble as the start, the whole ensemble as teacher."""
    data = fracture_folder(tmp_path / "data", per_class=4)
    config = TrainRequest(task="fracture", data=str(data), model="efficientnet_lite0", image_size=320,
                          init_from=str(ENSEMBLE), init_member=1, distill_from=str(ENSEMBLE),
                          distill_weight=0.7).config("OUT")
    assert (config.init_from, config.init_member, config.distill_from, config.distill_weight) == (
        str(ENSEMBLE), 1, str(ENSEMBLE), 0.7)
    with pytest.raises(BoneAIError, match="is a fracture model"):
        TrainRequest(task="boneage", data=str(data), distill_from=str(ENSEMBLE)).config("OUT")
    with pytest.raises(BoneAIError, match="between 0 and 1"):
        TrainRequest(task="fracture", data=str(data), distill_from=str(ENSEMBLE), distill_weight=1.5).config("OUT")
    with pytest.raises(BoneAIError, match="no card.json"):
        TrainRequest(task="fracture", data=str(data), distill_from=str(tmp_path)).config("OUT")


@pytest.mark.parametrize("bad", [dict(data="/no/such/folder"), dict(task="segmentation"), dict(epochs=0),
                                 dict(augment="extreme"), dict(optimizer="lion"), dict(freeze_blocks=-1)])
def test_bad_requests_are_refused_before_anything_starts(tmp_path: Path, bad: dict) -> None:
    runner = JobRunner(tmp_path / "jobs")
    with pytest.raises(BoneAIError):
        runner.start(TrainRequest(**{"data": str(tmp_path), **bad}))
    assert runner.list_jobs() == [] and runner.running_job_id() is None


def test_one_job_at_a_time_progress_and_cancel(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path / "jobs")
    job = runner.start_command(_epoch_script(2), epochs_total=5)
    try:
        assert job.state == "running"
        with pytest.raises(JobBusyError, match="already running"):
            runner.start_command(_epoch_script(1))
        # A fresh runner (a page reload, another session) finds the same job from disk.
        other = JobRunner(tmp_path / "jobs")
        assert other.running_job_id() == job.id
        _wait_for(lambda: other.status(job.id).epochs_done == 2)
        st = other.status(job.id)
        assert st.state == "running" and st.epochs_total == 5
        assert st.progress == pytest.approx(0.4)
        assert st.last["val_auc"] == pytest.approx(0.7)
        assert [h["epoch"] for h in st.history] == [1, 2]  # the epoch-0 baseline is not an epoch done
        assert '"epoch": 2' in other.log_tail(job.id)
        assert other.cancel(job.id) is True
        _wait_for(lambda: runner.status(job.id).finished)
        assert runner.status(job.id).state == "cancelled"
        assert runner.running_job_id() is None
        assert not runner.lock_path.exists()
        assert runner.cancel(job.id) is False  # already over
    finally:
        if not runner.status(job.id).finished:
            runner.cancel(job.id)
    # The machine is free again.
    second = runner.start_command(_epoch_script(1, sleep_after=0), epochs_total=1)
    assert runner.wait(second.id, timeout=60).state == "succeeded"
    assert runner.status(second.id).progress == 1.0


def test_a_failing_job_reports_the_commands_error(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path / "jobs")
    job = runner.start_command(_epoch_script(1, sleep_after=0, rc=2, stderr="epoch 1/3: 10%\rerror: Data folder has no images.\n"))
    st = runner.wait(job.id, timeout=60)
    assert st.state == "failed" and st.returncode == 2
    assert st.error == "Data folder has no images."
    assert runner.running_job_id() is None


def test_a_stale_lock_from_a_dead_process_is_cleared(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path / "jobs")
    runner.root.mkdir(parents=True)
    dead = os.fork()
    if dead == 0:  # child: exit at once
        os._exit(0)
    os.waitpid(dead, 0)
    runner.lock_path.write_text(json.dumps({"id": "old", "pid": dead}))
    assert runner.running_job_id() is None
    assert not runner.lock_path.exists()


def test_two_sessions_starting_at_once_get_one_lock(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path / "jobs")
    runner.root.mkdir(parents=True)
    for stale in (False, True, False, True):  # a free machine, and one with a stale lock file left by a crash
        if stale:
            runner.lock_path.write_text("")
        gate = threading.Barrier(6)
        won, busy = [], []

        def attempt(i: int) -> None:
            gate.wait()
            try:
                won.append(JobRunner(runner.root)._acquire_lock(f"job-{i}"))  # the open, locked file
            except JobBusyError:
                busy.append(i)

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(busy) == 5, (won, busy)
        assert json.loads(runner.lock_path.read_text())["id"].startswith("job-")
        assert runner.running_job_id() is not None  # held: nobody takes it for stale
        os.close(won[0])  # the holder goes (a supervisor exiting): the lock is free again
        assert runner.running_job_id() is None and not runner.lock_path.exists()


def test_a_fresh_empty_lock_file_is_not_stale_while_it_is_held(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path / "jobs")
    runner.root.mkdir(parents=True)
    runner.lock_path.write_text("")  # just created, not yet written: what a starter has for an instant
    fd = os.open(runner.lock_path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        runner.running_job_id()
        assert runner.lock_path.exists()
        with pytest.raises(JobBusyError, match="already running"):
            runner.start_command(_epoch_script(1, sleep_after=0))
        assert runner.lock_path.read_text() == "" and runner.list_jobs() == []
    finally:
        os.close(fd)
    assert runner.running_job_id() is None and not runner.lock_path.exists()


def test_a_killed_supervisor_takes_its_training_down_and_frees_the_machine(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path / "jobs")
    pids = tmp_path / "pids"
    # A stand-in for training that also has a helper process in its group (like data-loader workers).
    code = ("import os, subprocess, sys, time\n"
            "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pids)!r} + '.tmp', 'w').write(f'{{os.getpid()}} {{helper.pid}}')\n"
            f"os.replace({str(pids)!r} + '.tmp', {str(pids)!r})\n"
            "time.sleep(60)\n")
    job = runner.start_command(["-c", code], epochs_total=1)
    try:
        _wait_for(pids.is_file)
        train_pid, helper_pid = map(int, pids.read_text().split())
        meta = json.loads((runner.root / job.id / "job.json").read_text())
        assert meta["train_pid"] == train_pid and os.getpgid(helper_pid) == train_pid
        assert runner.running_job_id() == job.id
        os.kill(meta["supervisor_pid"], signal.SIGKILL)
        from boneai.jobs import _pid_alive

        # Training dies with its supervisor, at once (parent-death signal), not after 60 s.
        _wait_for(lambda: not _pid_alive(train_pid), timeout=10)
        assert runner.status(job.id).state == "failed"
        # The lock went with the supervisor; the next look at it ends the rest of the group.
        assert runner.running_job_id() is None
        _wait_for(lambda: not _pid_alive(helper_pid), timeout=10)
        second = runner.start_command(_epoch_script(1, sleep_after=0), epochs_total=1)
        assert runner.wait(second.id, timeout=60).state == "succeeded"
    finally:
        for pid in (pids.read_text().split() if pids.is_file() else []):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_unknown_job_ids_are_refused(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path / "jobs")
    for bad in ("nope", "../etc", ""):
        with pytest.raises(JobNotFoundError):
            runner.status(bad)
    assert runner.current() is None


@pytest.mark.slow
def test_a_real_training_job_runs_to_completion_and_registers(tmp_path: Path) -> None:
    data = fracture_folder(tmp_path / "data", per_class=12)
    runner = JobRunner(tmp_path / "jobs")
    job = runner.start(TrainRequest(task="fracture", data=str(data), epochs=1, batch_size=8, image_size=128,
                                    limit=24))
    st = runner.wait(job.id, timeout=600)
    assert st.state == "succeeded", runner.log_tail(job.id)
    assert st.epochs_done == 1 and 0.0 <= st.last["val_auc"] <= 1.0 and st.last["train_loss"] > 0
    for name in ("card.json", "model.safetensors", "val_predictions.csv", "metrics.jsonl"):
        assert (st.run_dir / name).is_file(), name
    # The job ran `train --config config.json`; the card records the equivalent flags and the whole config.
    training = json.loads((st.run_dir / "card.json").read_text())["training"]
    assert training["command"] == runner.command_text(job.id)
    assert training["command"].startswith(f"python -m boneai train --data {data} --model efficientnet_lite0 --out ")
    assert training["config"]["limit"] == 24 and training["config"]["image_size"] == 128
    from boneai.inference import available_models, register_run

    dest = register_run(st.run_dir, "trial", weights_dir=tmp_path / "weights")
    assert [c["name"] for c in available_models("fracture", tmp_path / "weights")] == ["trial"]
    assert dest == tmp_path / "weights" / "trial"
