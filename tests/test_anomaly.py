"""Anomaly models: the shipped autoencoder's error maps and scores, the card, evaluate and predict CLI."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from boneai.anomaly import foreground_mask, image_score
from boneai.errors import ModelNotFoundError
from boneai.io import read_radiograph

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


def _load(name: str):
    from boneai.inference import load_model

    try:
        return load_model(name)
    except ModelNotFoundError as exc:
        pytest.skip(f"shipped model {name!r} not available: {exc}")


@pytest.fixture(scope="module")
def cae():
    return _load("anomaly_cae")


@pytest.fixture(scope="module")
def anomaly_default():
    return _load("anomaly")


def _read(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_radiograph(path)


def test_image_score_mean_and_top_fraction():
    err = np.zeros((10, 10), np.float32)
    err[0, :5] = 1.0  # 5 hot pixels
    mask = np.zeros((10, 10), np.float32)
    mask[:5] = 1.0  # 50 pixels, 5 of them hot
    assert image_score(err, mask, "mean") == pytest.approx(0.1)
    assert image_score(err, mask, "topk", top_fraction=0.1) == pytest.approx(1.0)
    # Errors outside the mask do not count.
    err[9, 9] = 100.0
    assert image_score(err, mask, "mean") == pytest.approx(0.1)


def test_shipped_cards_describe_the_models(cae, anomaly_default):
    for model in (cae, anomaly_default):
        card = model.card
        assert card["task"] == "anomaly"
        assert card["training"]["command"].startswith("python -m boneai train --task anomaly")
        assert set(card["operating_points"]) >= {"balanced"}
        assert 0.0 <= card["validation"]["auc"] <= 1.0 and card["validation"]["n"] > 100
        assert card["score"]["definition"]
    assert cae.card["architecture"] == "cae"
    assert "masked" in cae.card["training"]["loss"]


def test_error_map_is_zero_outside_the_hand_and_matches_the_input_square(cae):
    rg = _read(SAMPLES / "fracatlas" / "IMG0000597.jpg")
    inp = cae.input_image(rg)
    err = cae.error_map(rg)
    size = cae.card["input_size"]
    assert err.shape == inp.shape == (size, size)
    mask = foreground_mask(inp)
    assert float(err[mask == 0].max(initial=0.0)) == 0.0
    assert float(err[mask > 0].std()) > 0


def _hand_cases(shared_data: Path | None, n: int) -> tuple[list[Path], list[Path]]:
    """Normal and fractured hand radiographs from the validation split (never trained on)."""
    if shared_data is not None and (shared_data / "fracatlas" / "dataset.csv").is_file():
        from boneai.data import read_fracatlas, split_train_val

        _, val = split_train_val(read_fracatlas(shared_data / "fracatlas"), 0.2, seed=0)
        hands = val[val["region"] == "hand"]
        return ([Path(p) for p in hands[hands["label"] == 0]["path"][:n]],
                [Path(p) for p in hands[hands["label"] == 1]["path"][:n]])
    table = pd.read_csv(SAMPLES / "samples.csv")
    hands = table[(table["dataset"] == "fracatlas") & (table["region"] == "hand")]
    return ([SAMPLES / f for f in hands[hands["label"] == 0]["file"]],
            [SAMPLES / f for f in hands[hands["label"] == 1]["file"]])


def test_autoencoder_reconstructs_normal_hands_better_than_fractured(cae):
    """Over the validation hands (never trained on), normal ones have the smaller reconstruction error."""
    shared = REPO.parent / "shared" / "data"
    normals, fractured = _hand_cases(shared if shared.is_dir() else None, 1000)
    assert normals and fractured
    score = lambda paths: np.array([p.anomaly_score for p in cae.predict_many([_read(f) for f in paths])])  # noqa: E731
    s_norm, s_frac = score(normals), score(fractured)
    assert s_norm.mean() < s_frac.mean(), (s_norm.mean(), s_frac.mean())
    assert np.median(s_norm) < np.median(s_frac), (np.median(s_norm), np.median(s_frac))


def _mini_fracatlas(dest: Path) -> Path:
    """FracAtlas layout with the sample images of hands and legs (both classes of each)."""
    table = pd.read_csv(SAMPLES / "samples.csv")
    fr = table[(table["dataset"] == "fracatlas") & table["region"].isin(["hand", "leg"])
               & table["file"].str.startswith("fracatlas/")]
    rows = []
    for _, r in fr.iterrows():
        folder = "Fractured" if int(r["label"]) == 1 else "Non_fractured"
        (dest / "images" / folder).mkdir(parents=True, exist_ok=True)
        name = Path(r["file"]).name
        shutil.copy(SAMPLES / r["file"], dest / "images" / folder / name)
        rows.append({"image_id": name, "hand": int(r["region"] == "hand"), "leg": int(r["region"] == "leg"),
                     "hip": 0, "shoulder": 0, "mixed": 0, "hardware": 0, "multiscan": 0,
                     "fractured": int(r["label"]), "fracture_count": int(r["label"]),
                     "frontal": 1, "lateral": 0, "oblique": 0})
    pd.DataFrame(rows).to_csv(dest / "dataset.csv", index=False)
    return dest


def test_evaluate_anomaly_writes_n_and_auc_for_one_region(tmp_path, anomaly_default, capsys):
    from boneai.cli import main

    data = _mini_fracatlas(tmp_path / "atlas")
    meta = pd.read_csv(data / "dataset.csv")
    hands = meta[meta["hand"] == 1]
    assert len(hands) < len(meta) and 0 < hands["fractured"].sum() < len(hands)
    out = tmp_path / "report.json"
    assert main(["evaluate", "--task", "anomaly", "--data", str(data), "--region", "hand", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == len(hands) and report["n_positive"] == int(hands["fractured"].sum())
    assert 0.0 <= report["auc"] <= 1.0
    assert report["region"] == "hand" and report["model"] == anomaly_default.name
    assert report["threshold"] == pytest.approx(anomaly_default.threshold(None))


def test_predict_anomaly_writes_one_heatmap_png_per_file(tmp_path, anomaly_default, capsys):
    from PIL import Image

    from boneai.cli import main

    files = [SAMPLES / "fracatlas" / "IMG0000351.jpg", SAMPLES / "fracatlas" / "IMG0000597.jpg"]
    heat_dir = tmp_path / "maps"
    assert main(["predict", "--task", "anomaly", *map(str, files), "--heatmap-dir", str(heat_dir), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["ok"] for r in results] == [True, True]
    assert all(r["decision"] in ("normal", "abnormal") and r["anomaly_score"] > 0 for r in results)
    for f in files:
        png = heat_dir / f"{f.stem}_heatmap.png"
        with Image.open(png) as im, Image.open(f) as src:
            assert im.size == src.size and im.mode == "RGB"


def test_anomaly_heatmap_is_on_the_original_grid(cae):
    from boneai.explain import explain

    rg = _read(SAMPLES / "fracatlas" / "IMG0000351.jpg")
    heat = explain(cae, rg)
    assert heat.map.shape == rg.pixels.shape[:2]
    assert heat.method == "reconstruction_error"
    assert heat.map.max() == pytest.approx(1.0) and heat.map.std() > 0.01
    x, y = heat.peak
    assert heat.map[y, x] == heat.map.max()


def test_vae_kl_is_nonnegative_and_evaluation_is_deterministic():
    import torch

    from boneai.models import build_model

    torch.manual_seed(0)
    vae = build_model("vae")
    x = torch.rand(2, 1, 96, 96)
    vae.train()
    recon, kl = vae.loss_terms(x)
    assert recon.shape == x.shape and float(kl.detach()) >= 0.0
    assert 0.0 <= float(recon.min()) and float(recon.max()) <= 1.0
    vae.eval()
    with torch.no_grad():
        assert torch.equal(vae(x), vae(x))  # the posterior mean, no sampling
        vae.train()
        assert not torch.equal(vae(x), vae(x))  # sampling while training


def test_masked_loss_ignores_pixels_outside_the_hand():
    """Training on the mask only: an autoencoder step changes nothing when the mask is empty."""
    import torch

    from boneai.anomaly import _fit_autoencoder
    from boneai.config import TrainConfig
    from boneai.models import build_model

    torch.manual_seed(0)
    model = build_model("cae")
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    cfg = TrainConfig(task="anomaly", seed=0, lr=1e-2, batch_size=4, epochs=1)
    x, empty = torch.rand(4, 1, 96, 96), torch.zeros(4, 1, 96, 96)
    history = _fit_autoencoder(model, x, empty, cfg, "mse", 0.0, lambda r: None)
    assert history[0]["train_loss"] == 0.0
    weights = {k: v for k, v in model.state_dict().items() if k in before and "running" not in k}
    assert all(torch.equal(weights[k], before[k]) for k in weights)
