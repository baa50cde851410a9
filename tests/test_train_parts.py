"""The parts of training, each on its own and fast: options defined once (parser, config file, job),
the optimiser and scheduler factories, one epoch, checkpoint save and restore, distributed setup, and
the parent and teacher checks (a model of other data is welcome; one that saw the validation images is not)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from boneai import config as config_module
from boneai.cli import build_parser, main
from boneai.config import TrainConfig, config_argv, config_from_args, config_to_dict
from boneai.errors import BoneAIError
from tests._fixtures_train import REPO, fracture_folder

SHIPPED = REPO / "weights" / "fracture_fast"  # an efficientnet_lite0 trained on FracAtlas

# The train flags and defaults as the hand-written parser had them before the options moved onto
# TrainConfig; README commands and the `training.command` of every card use these spellings.
OLD_FLAGS = {
    "--task": "fracture", "--data": None, "--model": None, "--out": None, "--epochs": 30, "--image-size": None,
    "--batch-size": 32, "--lr": 1e-3, "--weight-decay": 1e-4, "--optimizer": "adamw", "--scheduler": "onecycle",
    "--loss": None, "--augment": "strong", "--no-crop": False, "--clahe": False, "--weighted-sampler": False,
    "--val-fraction": 0.2, "--seed": 0, "--patience": 10, "--max-minutes": None, "--limit": None, "--workers": 0,
    "--device": "auto", "--no-resume": False, "--no-tta": False, "--fp32": False, "--from-scratch": False,
    "--freeze-blocks": 0, "--init-from": None, "--init-member": None, "--distill-from": None,
    "--distill-weight": 0.5, "--region": None,
}


def _train_args(*argv: str) -> TrainConfig:
    return config_from_args(TrainConfig, build_parser().parse_args(["train", *argv]))


# -- options defined once ----------------------------------------------------------------------------
def test_the_generated_parser_keeps_every_flag_and_default():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags == set(OLD_FLAGS) | {"--config"}
    cfg = _train_args("--data", "d", "--out", "o")
    assert cfg == TrainConfig(data="d", out="o") and cfg.model == "efficientnet_lite0"
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.optimizer, cfg.scheduler, cfg.augment, cfg.distill_weight) == (
        30, 32, 1e-3, "adamw", "onecycle", "strong", 0.5)
    # Switches set the opposite of the field's default; the task chooses the default architecture.
    cfg = _train_args("--task", "boneage", "--data", "d", "--out", "o", "--no-crop", "--clahe", "--no-resume",
                      "--no-tta", "--fp32", "--from-scratch", "--weighted-sampler")
    assert (cfg.crop, cfg.clahe, cfg.resume, cfg.tta, cfg.fp16_weights, cfg.pretrained, cfg.weighted_sampler) == (
        False, True, False, False, False, False, True)
    assert cfg.model == "boneage_lite0" and _train_args("--task", "anomaly", "--data", "d", "--out", "o").model == "cae"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--optimizer", "lion"])
    help_text = " ".join(train.format_help().split())
    assert "--init-from MODEL_DIR" in help_text and "never trained on this run's validation images" in help_text


def test_config_argv_is_the_inverse_of_the_parser():
    cfgs = [TrainConfig(data="d e", out="o"),
            TrainConfig(task="boneage", data="d", out="o", epochs=3, lr=3e-4, image_size=320, crop=False, tta=False,
                        fp16_weights=False, pretrained=False, init_from="w/x", init_member=1, distill_weight=0.7,
                        max_minutes=1.5, loss="smooth_l1", region="hand")]
    for cfg in cfgs:
        assert _train_args(*config_argv(cfg)) == cfg
    assert config_argv(cfgs[0]) == ["--data", "d e", "--model", "efficientnet_lite0", "--out", "o"]


def test_config_file_with_flags_that_override_it(tmp_path):
    path = tmp_path / "config.json"
    written = config_to_dict(TrainConfig(data="d", out="o", epochs=4, clahe=True, init_from="w/p"))
    assert "command" not in written
    path.write_text(json.dumps(written))
    assert _train_args("--config", str(path)) == TrainConfig(data="d", out="o", epochs=4, clahe=True, init_from="w/p")
    # A flag given on the command line overrides the file; the rest of the file stands.
    cfg = _train_args("--config", str(path), "--epochs", "9", "--out", "o2")
    assert (cfg.epochs, cfg.out, cfg.clahe, cfg.init_from) == (9, "o2", True, "w/p")
    # A card's training.config (with its recorded command) reads back as it is; ints widen to floats.
    path.write_text(json.dumps({**written, "command": "python -m boneai train ...", "lr": 1}))
    assert _train_args("--config", str(path)).lr == 1.0


@pytest.mark.parametrize("content, message", [
    ({"data": "d", "out": "o", "optimiser": "sgd"}, "unknown option optimiser"),
    ({"data": "d", "out": "o", "augment": "extreme"}, "augment 'extreme' is not one of none, basic, strong"),
    ({"data": "d", "out": "o", "epochs": "3"}, "epochs must be int"),
    ({"data": "d", "out": "o", "crop": 0}, "crop must be bool"),
    ({"data": "d"}, "required: --out"),
    ("[1, 2]", "expected a JSON object"),
    ("{oops", "not valid JSON"),
])
def test_a_bad_config_file_is_a_one_line_error(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1


def test_required_options_come_from_flags_or_the_file(capsys):
    assert main(["train", "--data", "d"]) == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_the_parser_is_built_without_torch():
    import subprocess
    import sys

    code = "import sys; from boneai.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


def test_factory_names_match_the_options():
    from boneai.losses import LOSSES
    from boneai.train import OPTIMIZERS, SCHEDULERS

    assert tuple(OPTIMIZERS) == config_module.OPTIMIZERS and tuple(SCHEDULERS) == config_module.SCHEDULERS
    assert set(config_module.LOSSES) == set(LOSSES) | {"masked_mse"}  # masked_mse: the anomaly trainer's


# -- optimiser and scheduler factories -------------------------------------------------------------
def _params():
    return [nn.Parameter(torch.zeros(3))]


def test_optimizer_factory_builds_each_with_its_settings():
    from boneai.train import create_optimizer

    sgd = create_optimizer("sgd", _params(), lr=0.1, weight_decay=1e-4)
    group = sgd.param_groups[0]
    assert type(sgd) is torch.optim.SGD and (group["lr"], group["momentum"], group["nesterov"],
                                             group["weight_decay"]) == (0.1, 0.9, True, 1e-4)
    assert type(create_optimizer("adam", _params(), 1e-3, 0.0)) is torch.optim.Adam
    adamw = create_optimizer("adamw", _params(), 1e-3, 0.05)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; use adam, adamw, sgd"):
        create_optimizer("lion", _params(), 1e-3, 0.0)


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_scheduler_factory_one_cycle_and_cosine_step_per_batch():
    from boneai.train import create_optimizer, create_scheduler

    opt = create_optimizer("adamw", _params(), 1e-3, 0.0)
    sched, per_step = create_scheduler("onecycle", opt, lr=1e-3, epochs=4, steps_per_epoch=25, higher_better=True)
    assert per_step and isinstance(sched, torch.optim.lr_scheduler.OneCycleLR)
    lrs = _lrs(sched, opt, 99)
    assert int(np.argmax(lrs)) + 1 == 14 and max(lrs) == pytest.approx(1e-3)  # the peak at 15 % of 100 steps
    assert lrs[-1] < 1e-6
    opt = create_optimizer("adamw", _params(), 1e-3, 0.0)
    sched, per_step = create_scheduler("cosine", opt, lr=1e-3, epochs=2, steps_per_epoch=10, higher_better=True)
    assert per_step and _lrs(sched, opt, 20)[-1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("higher_better, scores", [(True, [0.7, 0.6, 0.6, 0.6]), (False, [5.0, 6.0, 6.0, 6.0])])
def test_scheduler_factory_plateau_follows_the_score_and_none_is_none(higher_better, scores):
    from boneai.train import _step_after_epoch, create_optimizer, create_scheduler

    opt = create_optimizer("sgd", _params(), 0.1, 0.0)
    sched, per_step = create_scheduler("plateau", opt, lr=0.1, epochs=5, steps_per_epoch=3, higher_better=higher_better)
    assert not per_step
    for score in scores[:3]:
        _step_after_epoch(sched, score)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # two epochs without progress: patience 2
    _step_after_epoch(sched, scores[3])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03)  # the third: x0.3
    assert create_scheduler("none", opt, lr=0.1, epochs=1, steps_per_epoch=1, higher_better=True) == (None, False)
    with pytest.raises(ValueError, match="unknown scheduler 'step'"):
        create_scheduler("step", opt, lr=0.1, epochs=1, steps_per_epoch=1, higher_better=True)


# -- one epoch -------------------------------------------------------------------------------------
def _tiny_task(n: int = 24):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).float()
    data = TensorDataset(x, y, torch.zeros(n))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    return model, data, x, y


def test_one_epoch_returns_the_mean_loss_per_image_and_steps_the_schedule_per_batch():
    from boneai.train import create_optimizer, create_scheduler, train_one_epoch

    torch.manual_seed(0)
    model, data, x, y = _tiny_task(22)
    criterion = nn.BCEWithLogitsLoss()
    loader = DataLoader(data, batch_size=8)  # 8 + 8 + 6: batches weighted by their size
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    with torch.no_grad():
        expected = float(criterion(model(x).reshape(-1), y))
    frozen = create_optimizer("sgd", model.parameters(), lr=0.0, weight_decay=0.0)
    model.eval()
    loss = train_one_epoch(model, "fracture", loader, frozen, criterion, torch.device("cpu"), scaler)
    assert model.training  # the epoch trains in training mode
    assert loss == pytest.approx(expected, rel=1e-5)  # lr 0: the weights stay, so this is the exact mean
    opt = create_optimizer("adamw", model.parameters(), lr=0.05, weight_decay=0.0)
    sched, _ = create_scheduler("cosine", opt, lr=0.05, epochs=10, steps_per_epoch=len(loader), higher_better=True)
    losses = [train_one_epoch(model, "fracture", loader, opt, criterion, torch.device("cpu"), scaler, sched)
              for _ in range(5)]
    assert sched.last_epoch == 5 * len(loader)
    assert losses[-1] < 0.6 * losses[0]


# -- checkpoint save and restore ------------------------------------------------------------------
def test_checkpoint_round_trip_restores_weights_optimiser_schedule_loop_and_random_state(tmp_path):
    from boneai.train import LoopState, create_optimizer, create_scheduler, restore_checkpoint, save_checkpoint

    cfg = TrainConfig(data="data/x", out=str(tmp_path), epochs=5, scheduler="plateau", command="first")
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = create_optimizer("adamw", model.parameters(), 1e-3, 1e-4)
    sched, _ = create_scheduler("plateau", opt, lr=1e-3, epochs=5, steps_per_epoch=2, higher_better=True)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step(np.float64(0.8))
    loop = LoopState(best=np.float64(0.8), start_epoch=0, history=[{"epoch": 1, "val_auc": np.float64(0.8)}],
                     bad_epochs=1, train_seconds=2.5, commands=["first"])
    path = tmp_path / "checkpoint_last.pt"
    save_checkpoint(path, model, opt, sched, 1, loop, cfg)
    after_save = torch.rand(3)

    torch.manual_seed(123)
    fresh = nn.Linear(3, 1)
    fresh_opt = create_optimizer("adamw", fresh.parameters(), 1e-3, 1e-4)
    fresh_sched, _ = create_scheduler("plateau", fresh_opt, lr=1e-3, epochs=5, steps_per_epoch=2, higher_better=True)
    resumed = TrainConfig(**{**config_to_dict(cfg), "epochs": 8, "command": "second"})
    sched2, loop2 = restore_checkpoint(path, resumed, fresh, fresh_opt, fresh_sched, steps_per_epoch=2)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert sched2 is fresh_sched and sched2.best == pytest.approx(0.8) and sched2.num_bad_epochs == 0
    assert (loop2.start_epoch, loop2.best, loop2.bad_epochs, loop2.train_seconds) == (2, pytest.approx(0.8), 1, 2.5)
    assert loop2.history == [{"epoch": 1, "val_auc": pytest.approx(0.8)}]
    assert loop2.commands == ["first", "second"]
    assert torch.equal(torch.rand(3), after_save)  # the random stream goes on where the saved run left it
    with pytest.raises(ValueError, match="other settings"):
        restore_checkpoint(path, TrainConfig(**{**config_to_dict(cfg), "seed": 1}), fresh, fresh_opt, fresh_sched, 2)


# -- distributed setup -----------------------------------------------------------------------------
def test_single_process_setup_and_the_refused_combination(monkeypatch):
    import torch.distributed as dist

    from boneai.train import setup_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = setup_distributed(TrainConfig(device="cpu"))
    assert (ctx.rank, ctx.world, ctx.enabled, ctx.is_main, ctx.device.type) == (0, 1, False, True, "cpu")
    ctx.barrier()
    ctx.close()  # no process group: nothing to wait for or destroy
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--weighted-sampler cannot be combined"):
        setup_distributed(TrainConfig(device="cpu", weighted_sampler=True))
    assert not dist.is_initialized()  # refused before joining a group that would wait for the other rank


def test_train_loader_shares_the_images_between_ranks_and_balances_classes():
    from boneai.train import DistributedContext, _train_loader

    data = TensorDataset(torch.arange(20).float(), torch.zeros(20), torch.zeros(20))
    labels = np.array([1] * 4 + [0] * 16)
    cfg = TrainConfig(batch_size=5, seed=0)
    seen = []
    for rank in (0, 1):
        loader = _train_loader(data, labels, cfg, DistributedContext(torch.device("cpu"), rank=rank, world=2))
        seen.append(sorted(int(v) for x, _, _ in loader for v in x))
    assert len(seen[0]) == len(seen[1]) == 10 and sorted(seen[0] + seen[1]) == list(range(20))
    weighted = _train_loader(data, labels, TrainConfig(batch_size=5, seed=0, weighted_sampler=True),
                             DistributedContext(torch.device("cpu")))
    drawn = np.concatenate([labels[x.long().numpy()] for _ in range(50) for x, _, _ in weighted])
    assert abs(drawn.mean() - 0.5) < 0.05  # 4 positives of 20 drawn half the time
    plain = _train_loader(data, labels, cfg, DistributedContext(torch.device("cpu")))
    assert sorted(int(v) for x, _, _ in plain for v in x) == list(range(20))


# -- parent and teacher: the one check, from the command and from the form ----------------------------
def _split(data: Path, **settings):
    from boneai.train import _read_task_data

    train_df, val_df, _, _ = _read_task_data(TrainConfig(data=str(data), **settings))
    rel = lambda df: [str(Path(p).relative_to(data)) for p in df["path"]]  # noqa: E731
    return rel(train_df), rel(val_df)


def _fake_model(dest: Path, val_images: list[str], config: dict | None, with_predictions: bool = True) -> Path:
    """A model folder as training leaves it, without weights: card (its recorded split) and validation list."""
    card = json.loads((SHIPPED / "card.json").read_text())
    card["training"]["config"] = config
    dest.mkdir(parents=True)
    (dest / "card.json").write_text(json.dumps(card))
    if with_predictions:
        (dest / "val_predictions.csv").write_text("image,label\n" + "".join(f"{i},0\n" for i in val_images))
    return dest


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return fracture_folder(tmp_path_factory.mktemp("site") / "data", per_class=10)


def test_a_parent_of_other_data_is_accepted_and_one_that_saw_validation_images_is_refused(site, tmp_path):
    from boneai.train import check_related_models

    cfg = TrainConfig(data=str(site), out="o", init_from=str(SHIPPED))
    # The shipped model never saw this folder: fine-tuning it on a hospital's own images is allowed.
    assert check_related_models(cfg) == {"init_from": "trained on other data: none of its validation images is "
                                                      "in this data folder"}
    train, val = _split(site)
    same = _fake_model(tmp_path / "same", val, {"data": str(site), "val_fraction": 0.2, "seed": 0, "limit": None})
    assert "this run's validation images" in check_related_models(
        TrainConfig(data=str(site), out="o", init_from=str(same)))["init_from"]
    # Trained on this folder with another seed: some of this run's validation images were its training images.
    other_train, other_val = _split(site, seed=3)
    assert set(other_train) & set(val)
    leaky = _fake_model(tmp_path / "leaky", other_val, {"data": str(site), "val_fraction": 0.2, "seed": 3})
    with pytest.raises(ValueError, match=r"another data split of this data .* validation images \(e\.g\. .*\) were "
                                         r"among its training images"):
        check_related_models(TrainConfig(data=str(site), out="o", init_from=str(leaky)))
    # The same model as a teacher is refused for the same reason.
    with pytest.raises(ValueError, match="--distill-from .* another data split"):
        check_related_models(TrainConfig(data=str(site), out="o", distill_from=str(leaky)))


def test_another_split_whose_training_images_avoid_this_validation_split_is_accepted(site, tmp_path):
    """The leak is decided image by image: a parent of another split of this data (here a --limit run)
    passes exactly when none of its training images is among this run's validation images."""
    from boneai.train import check_related_models

    _, val = _split(site)
    outcomes = {}
    for seed in range(12):
        their_train, their_val = _split(site, seed=seed, limit=8)
        parent = _fake_model(tmp_path / f"limit{seed}", their_val,
                             {"data": str(site), "val_fraction": 0.2, "seed": seed, "limit": 8})
        cfg = TrainConfig(data=str(site), out="o", init_from=str(parent))
        if set(their_train) & set(val):
            with pytest.raises(ValueError, match="were among its training images"):
                check_related_models(cfg)
            outcomes[seed] = "refused"
        else:
            assert check_related_models(cfg)["init_from"].startswith("trained on another split of this data")
            outcomes[seed] = "accepted"
    assert set(outcomes.values()) == {"refused", "accepted"}  # both cases occur among these seeds


def test_overlapping_data_without_a_rebuildable_split_and_a_parent_without_predictions(site, tmp_path):
    from boneai.train import check_related_models

    _, val = _split(site)
    # An ensemble-like card (no recorded split) validated on a superset of this run's validation images: fine.
    superset = _fake_model(tmp_path / "superset", val + ["elsewhere/x.jpg"], None)
    cleared = check_related_models(TrainConfig(data=str(site), out="o", init_from=str(superset)))
    assert "and more" in cleared["init_from"]
    # Validated on only part of them: the rest may have been its training images.
    partial = _fake_model(tmp_path / "partial", val[:-1], None)
    with pytest.raises(ValueError, match="overlapping data .* 1 of this run's validation images"):
        check_related_models(TrainConfig(data=str(site), out="o", init_from=str(partial)))
    # No val_predictions.csv: only the recorded split settings can clear it.
    config = {"data": str(site), "val_fraction": 0.2, "seed": 0, "limit": None}
    blind = _fake_model(tmp_path / "blind", [], config, with_predictions=False)
    assert "recorded settings" in check_related_models(TrainConfig(data=str(site), out="o", init_from=str(blind)))[
        "init_from"]
    blind_other = _fake_model(tmp_path / "blind_other", [], {**config, "data": "/elsewhere"}, with_predictions=False)
    with pytest.raises(ValueError, match="no val_predictions.csv"):
        check_related_models(TrainConfig(data=str(site), out="o", init_from=str(blind_other)))


def test_the_form_gets_the_same_answers_before_a_job_starts(site, tmp_path):
    from boneai.jobs import JobRunner, TrainRequest

    ok = TrainRequest(data=str(site), model="efficientnet_lite0", epochs=2, init_from=str(SHIPPED)).config("OUT")
    assert type(ok) is TrainConfig and ok.out == "OUT" and ok.init_from == str(SHIPPED)
    _, their_val = _split(site)
    leaky = _fake_model(tmp_path / "leaky", their_val, {"data": str(site), "val_fraction": 0.2, "seed": 0})
    runner = JobRunner(tmp_path / "jobs")
    with pytest.raises(BoneAIError, match="were among its training images"):
        runner.start(TrainRequest(data=str(site), seed=3, init_from=str(leaky)))
    assert runner.list_jobs() == [] and runner.running_job_id() is None


def test_a_job_writes_its_config_and_runs_train_with_it(site, tmp_path):
    from boneai.jobs import JobRunner, TrainRequest

    runner = JobRunner(tmp_path / "jobs")
    job = runner.start(TrainRequest(data=str(site), epochs=2, limit=12, clahe=True))
    job_dir = runner.job_dir(job.id)
    deadline = time.monotonic() + 60
    while not json.loads((job_dir / "job.json").read_text()).get("train_pid") and time.monotonic() < deadline:
        time.sleep(0.1)  # the supervisor has started training (and handles a cancel)
    runner.cancel(job.id)  # what it was started with is all this test needs (the slow job test trains)
    st = runner.wait(job.id, timeout=60)
    assert st.state == "cancelled"
    assert st.command[1:] == ["-m", "boneai", "train", "--config", str(job_dir / "config.json")]
    written = json.loads((job_dir / "config.json").read_text())
    assert written["out"] == str(st.run_dir) and written["clahe"] is True and written["epochs"] == 2
    args = build_parser().parse_args(["train", "--config", str(job_dir / "config.json")])
    assert config_from_args(TrainConfig, args) == TrainConfig(data=str(site), out=str(st.run_dir), epochs=2,
                                                              limit=12, clahe=True)
    # Shown (and recorded in the card) as the equivalent flags, not as a path to a file.
    assert runner.command_text(job.id) == (f"python -m boneai train --data {site} --model efficientnet_lite0 --out "
                                           f"{st.run_dir} --epochs 2 --clahe --limit 12")


def test_the_anomaly_trainer_takes_the_config_and_refuses_what_it_cannot_use(tmp_path):
    from boneai.anomaly import train_autoencoder

    with pytest.raises(ValueError, match="apply to the fracture and bone-age tasks"):
        train_autoencoder(TrainConfig(task="anomaly", data="d", out=str(tmp_path), init_from=str(SHIPPED)))
    with pytest.raises(ValueError, match="'efficientnet_lite0' is a fracture model; anomaly models"):
        train_autoencoder(TrainConfig(task="anomaly", model="efficientnet_lite0", data="d", out=str(tmp_path)))
