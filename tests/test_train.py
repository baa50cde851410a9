"""Real (short) training runs: the loss goes down, a killed run resumes, DDP runs on two CPU processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._fixtures_train import REPO, fracture_folder

pytestmark = pytest.mark.slow

_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
_QUICK = ["--image-size", "96", "--batch-size", "8", "--augment", "basic", "--no-tta", "--val-fraction", "0.25"]


def _train(data: Path, out: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "boneai", "train", "--task", "fracture", "--data", str(data), "--out", str(out),
           *_QUICK, *extra]
    return subprocess.run(cmd, cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=timeout)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_short_training_lowers_validation_loss_and_writes_a_card(tmp_path):
    data = fracture_folder(tmp_path / "data", per_class=60)
    out = tmp_path / "run"
    proc = _train(data, out, "--epochs", "4", "--lr", "1e-3", "--scheduler", "cosine")
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = _metrics(out)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    assert min(h["val_loss"] for h in history[1:]) < history[0]["val_loss"]
    card = json.loads((out / "card.json").read_text())
    assert card["architecture"] == "efficientnet_lite0"
    assert card["training"]["command"].startswith("python -m boneai train")
    assert set(card["operating_points"]) == {"sensitive", "balanced"}
    assert card["operating_points"]["sensitive"]["sensitivity"] >= 0.9
    assert card["temperature"] > 0 and (out / "model.safetensors").is_file()
    assert (out / "val_predictions.csv").read_text().startswith("image,label,region,logit,probability")


def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    data = fracture_folder(tmp_path / "data", per_class=12)
    out = tmp_path / "run"
    epochs = 6  # enough that the run cannot finish between two looks, however fast the machine
    cmd = [sys.executable, "-m", "boneai", "train", "--task", "fracture", "--data", str(data), "--out", str(out),
           *_QUICK, "--epochs", str(epochs)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoint_last.pt").is_file() and (out / "metrics.jsonl").is_file() and len(_metrics(out)) >= 2:
            break
        time.sleep(0.05)
    # Freeze it at once, then kill it hard as a crash or power cut would: the checkpoint and the
    # metrics are written atomically, so any moment is a fair one.
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = [h["epoch"] for h in _metrics(out)]
    assert 1 in done_before and epochs not in done_before, done_before
    # The checkpoint holds plain data only: it loads without unpickling objects.
    import torch

    assert torch.load(out / "checkpoint_last.pt", weights_only=True)["config"]["lr"] == 1e-3
    # Other settings would mix two runs under one card: refused with a way out, the checkpoint kept.
    other = _train(data, out, "--epochs", str(epochs), "--lr", "3e-4")
    assert other.returncode != 0 and "other settings" in other.stderr and "--no-resume" in other.stderr
    assert "Traceback" not in other.stderr and (out / "checkpoint_last.pt").is_file()
    resumed = _train(data, out, "--epochs", str(epochs))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert '"event": "resumed"' in resumed.stdout
    done = [h["epoch"] for h in _metrics(out)]
    # Each epoch is trained once: no restart from epoch 1 after the kill.
    assert done.count(1) == 1 and done[-1] == epochs and sorted(set(done)) == list(range(epochs + 1))


def _checkpoint_state(**config):
    """A resume state shaped like train()'s, with the numpy scalars real metrics come back as."""
    import numpy as np
    import torch

    from boneai.train import TrainConfig

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max")
    plateau.step(np.float64(0.71))  # the plateau scheduler keeps the score it was given
    cfg = TrainConfig(data="data/x", epochs=3, **config)
    from dataclasses import asdict

    return cfg, {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": plateau.state_dict(),
                 "scheduler_kind": "ReduceLROnPlateau", "epoch": 1, "best": np.float64(0.71),
                 "history": [{"epoch": 1, "val_auc": np.float64(0.71), "seconds": np.float32(1.5)}],
                 "bad_epochs": 0, "train_seconds": 1.5, "torch_rng": torch.get_rng_state(), "commands": ["x"],
                 "config": asdict(cfg)}


def test_checkpoints_hold_plain_data_and_load_with_weights_only(tmp_path):
    import torch

    from boneai.train import _load_checkpoint, _save_checkpoint

    cfg, state = _checkpoint_state()
    path = tmp_path / "checkpoint_last.pt"
    _save_checkpoint(path, state)
    raw = torch.load(path, weights_only=True)  # no custom classes, no numpy objects
    assert type(raw["best"]) is float and type(raw["history"][0]["val_auc"]) is float
    loaded = _load_checkpoint(path, cfg)
    assert loaded["best"] == pytest.approx(0.71) and torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert not list(tmp_path.glob("*.tmp"))
    # A longer or shorter run, another time budget or device: the same run, resumed.
    longer = cfg.__class__(**{**loaded["config"], "epochs": 9, "max_minutes": 5.0, "device": "cpu"})
    assert _load_checkpoint(path, longer)["epoch"] == 1


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    from boneai.train import TrainConfig, _load_checkpoint, _save_checkpoint

    cfg, state = _checkpoint_state(lr=1e-3, model="resnet18")
    path = tmp_path / "checkpoint_last.pt"
    _save_checkpoint(path, state)
    for change, word in ((dict(lr=3e-4), "lr"), (dict(model="efficientnet_lite0"), "model"),
                         (dict(data="data/other"), "data"), (dict(seed=1), "seed")):
        other = TrainConfig(**{**state["config"], **change})
        with pytest.raises(ValueError, match=rf"other settings \({word} .*--no-resume"):
            _load_checkpoint(path, other)
    # The same folder named another way is the same data.
    same = TrainConfig(**{**state["config"], "data": str(Path("data/x").resolve())})
    assert _load_checkpoint(path, same)["epoch"] == 1


def test_a_checkpoint_with_objects_in_it_is_not_unpickled(tmp_path):
    import torch

    from boneai.train import TrainConfig, _load_checkpoint

    marker = tmp_path / "code-ran"

    class Planted:  # unpickling this would create the marker file: code from the checkpoint runs
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "checkpoint_last.pt"
    torch.save({"model": {}, "optimizer": {}, "epoch": 0, "config": {}, "x": Planted()}, path)
    with pytest.raises(ValueError, match="cannot be loaded as plain tensors.*--no-resume"):
        _load_checkpoint(path, TrainConfig())
    assert not marker.exists()
    path.write_bytes(path.read_bytes()[:100])  # truncated by a full disk: a message, not a traceback
    with pytest.raises(ValueError, match="cannot be loaded"):
        _load_checkpoint(path, TrainConfig())


def test_best_model_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import torch

    from boneai import train as train_module

    best = tmp_path / "best_model.pt"
    train_module._save_atomic({"w": torch.zeros(2)}, best)
    real_save = torch.save

    def dying_save(obj, f):  # the process is killed half-way through the write
        real_save(obj, f)
        Path(f).write_bytes(Path(f).read_bytes()[:50])
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_module._save_atomic({"w": torch.ones(2)}, best)
    assert torch.equal(torch.load(best, weights_only=True)["w"], torch.zeros(2))
    assert not list(tmp_path.glob("*.tmp"))


def test_distributed_training_with_two_gloo_processes(tmp_path):
    data = fracture_folder(tmp_path / "data", per_class=12)
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "boneai", "train", "--task", "fracture",
           "--data", str(data), "--out", str(out), *_QUICK, "--epochs", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = _metrics(out)
    assert [h["epoch"] for h in history] == [0, 1]  # written once, by rank 0 only
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["n_train"] == 18 and "auc" in card["validation"]


def _optimizer():
    import torch

    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)


def test_resume_with_more_epochs_re_anneals_from_the_current_rate_to_zero():
    import torch

    from boneai.train import restore_scheduler

    opt = _optimizer()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, epochs=9, steps_per_epoch=10, pct_start=0.15)
    for _ in range(60):
        opt.step()
        sched.step()
    state = {"config": {"epochs": 9}, "scheduler": sched.state_dict(), "scheduler_kind": "OneCycleLR"}
    lr_now = opt.param_groups[0]["lr"]
    opt2 = _optimizer()
    # As in train(): the new run builds its schedule, then loads the saved optimizer state.
    fresh = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=1e-3, epochs=11, steps_per_epoch=10, pct_start=0.15)
    opt2.load_state_dict(opt.state_dict())
    resumed = restore_scheduler(opt2, fresh, state, epochs=11, start_epoch=6, steps_per_epoch=10)
    assert isinstance(resumed, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_now)
    for _ in range(50):
        opt2.step()
        resumed.step()
    assert opt2.param_groups[0]["lr"] < 1e-8  # cooled down exactly at the new last epoch
    # Killed again and resumed with the same --epochs: the re-anneal continues, not a new one-cycle.
    state2 = {"config": {"epochs": 11}, "scheduler": resumed.state_dict(), "scheduler_kind": "CosineAnnealingLR"}
    opt3 = _optimizer()
    again = restore_scheduler(opt3, torch.optim.lr_scheduler.OneCycleLR(opt3, max_lr=1e-3, epochs=11, steps_per_epoch=10),
                              state2, epochs=11, start_epoch=11, steps_per_epoch=10)
    assert isinstance(again, torch.optim.lr_scheduler.CosineAnnealingLR) and again.last_epoch == resumed.last_epoch


def test_fine_tuning_starts_from_the_parent_weights_and_refuses_another_split(tmp_path):
    data = fracture_folder(tmp_path / "data", per_class=16)
    parent, child = tmp_path / "parent", tmp_path / "child"
    proc = _train(data, parent, "--epochs", "2", "--lr", "1e-3", "--image-size", "64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    parent_best = min(h["val_loss"] for h in _metrics(parent)[1:])

    proc = _train(data, child, "--epochs", "1", "--lr", "1e-4", "--image-size", "64", "--init-from", str(parent))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Epoch 0 of the child is the parent's best model on the same split (float16 round trip aside).
    history = _metrics(child)
    assert abs(history[0]["val_loss"] - parent_best) < 0.01
    # The parent is the first candidate: fine-tuning never ends worse than where it started.
    assert history[1]["best"] == round(max(history[0]["val_auc"], history[1]["val_auc"]), 5)
    card = json.loads((child / "card.json").read_text())
    assert card["initial_weights"].startswith("fine-tuned from")
    init = card["training"]["init_from"]
    assert init["path"] == str(parent) and init["commands"][0].startswith("python -m boneai train")
    assert "auc" in init["validation"]

    assert init["leak_check"] == "validated on this run's validation images"

    # Another validation split would put the parent's training images into this run's validation.
    proc = _train(data, tmp_path / "bad", "--epochs", "1", "--init-from", str(parent), "--seed", "3")
    assert proc.returncode != 0
    assert "another data split" in proc.stderr and "were among its training images" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fine_tuning_a_parent_trained_on_other_data(tmp_path):
    """A hospital adapts a model to its own radiographs: the parent never saw them, so it may start the run."""
    other = fracture_folder(tmp_path / "other", per_class=12, layout="fracatlas")  # another data set's layout
    site = fracture_folder(tmp_path / "site", per_class=12)
    parent, child = tmp_path / "parent", tmp_path / "child"
    proc = _train(other, parent, "--epochs", "1", "--image-size", "64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _train(site, child, "--epochs", "1", "--image-size", "64", "--lr", "1e-4", "--init-from", str(parent))
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((child / "card.json").read_text())
    assert card["initial_weights"] == f"fine-tuned from {parent}"
    init = card["training"]["init_from"]
    assert init["path"] == str(parent) and init["leak_check"].startswith("trained on other data")


def test_time_budget_stops_training_and_a_compressed_copy_run_is_revalidated_on_the_originals(tmp_path):
    """The GPU workflow in small: train on a compact copy under a time budget, validate again on the originals."""
    from boneai.train import card_split_key, validation_split_key

    original = fracture_folder(tmp_path / "orig", per_class=14, layout="fracatlas")
    copy = tmp_path / "copy"
    proc = subprocess.run([sys.executable, "bench/transfer_copy.py", str(original), str(copy), "--quality", "60"],
                          cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sum(f.stat().st_size for f in copy.rglob("*.jpg")) < sum(f.stat().st_size for f in original.rglob("*.jpg"))

    out = tmp_path / "run"
    proc = _train(copy, out, "--epochs", "5", "--image-size", "64", "--max-minutes", "0.0001")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"event": "time_budget"' in proc.stdout
    assert [h["epoch"] for h in _metrics(out)] == [0, 1]  # the first epoch always runs; the budget stops the rest
    before = json.loads((out / "card.json").read_text())
    logits_before = (out / "val_predictions.csv").read_text()

    cmd = [sys.executable, "-m", "boneai", "revalidate", str(out), "--data", str(original)]
    proc = subprocess.run(cmd, cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((out / "card.json").read_text())
    assert card["revalidation"]["data"] == str(original)
    assert card["revalidation"]["previous"]["validation"]["auc"] == before["validation"]["auc"]
    assert card["revalidation"]["command"].startswith("python -m boneai revalidate")
    assert set(card["operating_points"]) == {"sensitive", "balanced"}
    assert (out / "val_predictions.csv").read_text() != logits_before  # other pixels, other logits
    assert card["training"]["config"]["data"] == str(copy)  # the training record is left as it was
    # Fine-tuning and ensembles now match this run with runs made on the original files.
    assert card_split_key(card) == validation_split_key({**card["training"]["config"], "data": str(original)})

    # A folder that does not reproduce the split is refused, and the card is left alone.
    (original / "images" / "Fractured" / "IMG1000000.jpg").unlink()
    proc = subprocess.run(cmd, cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "validation split" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((out / "card.json").read_text()) == card


def test_distillation_from_an_ensemble_starts_from_one_member_and_mixes_the_teachers_outputs(tmp_path):
    """A student starts from one ensemble member and learns towards the whole ensemble's probabilities."""
    import pandas as pd

    from boneai.train import TrainConfig, _read_task_data, teacher_targets

    data = fracture_folder(tmp_path / "data", per_class=16)
    members = [tmp_path / "a", tmp_path / "b"]
    for run, lr in zip(members, ("1e-3", "3e-3")):
        proc = _train(data, run, "--epochs", "1", "--lr", lr, "--image-size", "64")
        assert proc.returncode == 0, proc.stderr[-2000:]
    ens = tmp_path / "ens"
    proc = subprocess.run([sys.executable, "-m", "boneai", "ensemble", "--task", "fracture", "--out", str(ens),
                           *map(str, members)], cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

    student = tmp_path / "student"
    proc = _train(data, student, "--epochs", "1", "--lr", "1e-4", "--image-size", "64", "--init-from", str(ens),
                  "--init-member", "1", "--distill-from", str(ens), "--distill-weight", "0.7")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Epoch 0 is member 1 (run b) itself on the same validation images.
    assert abs(_metrics(student)[0]["val_loss"] - _metrics(members[1])[-1]["val_loss"]) < 0.01
    card = json.loads((student / "card.json").read_text())
    assert card["training"]["init_from"]["member"] == 1
    assert card["training"]["init_from"]["commands"][0].startswith("python -m boneai train")
    distil = card["training"]["distillation"]
    assert distil["teacher"] == str(ens) and distil["weight"] == 0.7 and 0 <= distil["teacher_train_auc"] <= 1

    # One teacher probability per training image, and the targets are the stated mixture.
    cached = pd.read_csv(student / "teacher_outputs.csv")
    cfg = TrainConfig(**{k: v for k, v in card["training"]["config"].items() if k in TrainConfig.__dataclass_fields__})
    train_df, _, _, _ = _read_task_data(cfg)
    assert len(cached) == len(train_df) and cached["teacher_probability"].between(0, 1).all()
    mixed, _ = teacher_targets(cfg, train_df, "label", student)
    labels = train_df["label"].to_numpy()
    assert abs(mixed - (0.3 * labels + 0.7 * cached["teacher_probability"].to_numpy())).max() < 1e-6
    assert 0 < mixed.min() and mixed.max() < 1  # soft targets, not labels

    # An ensemble parent needs a member; a teacher from another split is refused (it trained on these images).
    proc = _train(data, tmp_path / "bad1", "--epochs", "1", "--image-size", "64", "--init-from", str(ens))
    assert proc.returncode != 0 and "--init-member" in proc.stderr and "Traceback" not in proc.stderr
    proc = _train(data, tmp_path / "bad2", "--epochs", "1", "--image-size", "64", "--distill-from", str(ens),
                  "--seed", "3")
    assert proc.returncode != 0 and "another data split" in proc.stderr and "Traceback" not in proc.stderr
