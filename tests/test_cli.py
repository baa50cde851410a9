"""The command line as hospital scripts use it: evaluate JSON reports and predict on good and bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._fixtures_train import REPO, fracture_folder

_ENV = {**os.environ, "PYTHONPATH": str(REPO)}
SAMPLES = REPO / "samples" / "fracatlas"


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "boneai", *args], cwd=REPO, env=_ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("layout", ["fracatlas", "folder"])
def test_evaluate_writes_the_documented_json_keys(tmp_path, layout):
    data = fracture_folder(tmp_path / "data", per_class=8, layout=layout)
    # One unreadable file must be reported, not crash the run.
    (data / ("images/Fractured" if layout == "fracatlas" else "fractured") / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "report.json"
    proc = _cli("evaluate", "--task", "fracture", "--data", str(data), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    for key in ("n", "auc", "auc_ci95", "ap", "sensitivity", "specificity", "threshold"):
        assert key in report, key
    assert report["n"] == 16
    assert 0.0 <= report["auc"] <= 1.0 and report["auc_ci95"][0] <= report["auc"] <= report["auc_ci95"][1]
    # Named by its path inside the folder, as validate-site and adapt name theirs (exports repeat file names).
    assert [s["file"] for s in report["skipped"]] == [
        "images/Fractured/broken.jpg" if layout == "fracatlas" else "fractured/broken.jpg"]
    assert set(report["operating_points"]) == {"sensitive", "balanced"}
    if layout == "fracatlas":
        assert {r["region"] for r in report["per_region"]} == {"hand", "leg"}
    else:
        assert "per_region" not in report


def test_predict_json_on_good_and_bad_files(tmp_path):
    good = sorted(SAMPLES.glob("*.jpg"))[:2]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("Patient: DOE^JOHN, not an image")
    proc = _cli("predict", *map(str, good), str(empty), str(text), "--json")
    assert proc.returncode == 1  # some files failed
    assert "Traceback" not in proc.stderr + proc.stdout
    rows = json.loads(proc.stdout)
    assert [r["file"] for r in rows] == [g.name for g in good] + ["empty.png", "notes.txt"]
    for r in rows[:2]:
        assert r["ok"] and 0.0 <= r["probability"] <= 1.0 and r["decision"] in ("fracture", "no fracture")
        assert r["error"] is None
    assert not rows[2]["ok"] and "empty" in rows[2]["error"].lower()
    assert not rows[3]["ok"] and "not an image" in rows[3]["error"].lower()
    assert "DOE" not in proc.stdout  # nothing from inside a file leaks into the output


def test_predict_reads_a_folder_with_dicom_files_under_any_name(tmp_path, dicom_bytes):
    """An export folder: DICOM named IM00001 in patient subfolders, a JPEG, a hidden file; and an empty folder."""
    import numpy as np
    from PIL import Image

    jpg = sorted(SAMPLES.glob("*.jpg"))[0]
    with Image.open(jpg) as img:
        dicom = dicom_bytes(np.asarray(img.convert("L")))
    export = tmp_path / "export"
    for patient in ("PAT1", "PAT2"):
        (export / patient).mkdir(parents=True)
        (export / patient / "IM00001").write_bytes(dicom)  # the same name in both subfolders
    (export / jpg.name).write_bytes(jpg.read_bytes())
    (export / "PAT1" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "nothing").mkdir()
    proc = _cli("predict", str(export), str(tmp_path / "nothing"), "--json")
    rows = json.loads(proc.stdout)
    assert [r["file"] for r in rows] == [jpg.name, "PAT1/IM00001", "PAT2/IM00001", "nothing"]
    assert all(r["ok"] and r["decision"] in ("fracture", "no fracture") for r in rows[:3]), rows
    assert rows[1]["probability"] == rows[2]["probability"]
    assert not rows[3]["ok"] and rows[3]["error"] == "no image or DICOM files in this folder"
    assert proc.returncode == 1


def test_predict_lines_and_operating_points():
    good = str(sorted(SAMPLES.glob("*.jpg"))[0])
    sens = _cli("predict", good, "--operating-point", "sensitive")
    bal = _cli("predict", good, "--operating-point", "balanced")
    assert sens.returncode == 0 and bal.returncode == 0
    assert "(threshold" in sens.stdout and "sensitive" in sens.stdout and "balanced" in bal.stdout
    from boneai.inference import default_model_name

    card = json.loads((REPO / "weights" / default_model_name("fracture") / "card.json").read_text())
    t_sens = card["operating_points"]["sensitive"]["threshold"]
    assert f"threshold {t_sens:.3f}" in sens.stdout
    bad = _cli("predict", good, "--operating-point", "aggressive")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_without_model_the_commands_use_the_tasks_default_not_the_model_named_like_the_task(tmp_path):
    """``weights/fracture`` is a model and ``fracture`` a task: ``--task fracture`` alone means the
    default of ``defaults.json``, as in the app."""
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("fracture", "fracture_fast"):
        (weights / name).symlink_to(REPO / "weights" / name, target_is_directory=True)
    (weights / "defaults.json").write_text(json.dumps({"fracture": "fracture_fast"}))
    fast = json.loads((REPO / "weights" / "fracture_fast" / "card.json").read_text())
    good = str(sorted(SAMPLES.glob("*.jpg"))[0])
    proc = subprocess.run([sys.executable, "-m", "boneai", "predict", "--task", "fracture", good, "--json"], cwd=REPO,
                          env={**_ENV, "BONEAI_WEIGHTS_DIR": str(weights)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout)[0]
    assert row["threshold"] == pytest.approx(fast["operating_points"]["balanced"]["threshold"], abs=1e-6)
    data = fracture_folder(tmp_path / "data", per_class=4, layout="folder")
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "boneai", "evaluate", "--task", "fracture", "--data", str(data),
                           "--out", str(out)], cwd=REPO, env={**_ENV, "BONEAI_WEIGHTS_DIR": str(weights)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["model"] == "fracture_fast"


def test_unknown_model_is_a_one_line_error(tmp_path):
    proc = _cli("evaluate", "--data", str(tmp_path), "--model", "nope", "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not found" in proc.stderr


def test_adapt_help_names_every_candidate_the_code_compares():
    """The parser names the candidates without importing torch; it must not fall behind the code's list."""
    from boneai.cli import build_parser
    from boneai.site import METHODS

    adapt = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "adapt")[1]
    methods_help = next(a.help for a in adapt._actions if a.dest == "methods")
    named = [m.strip(" ,") for m in methods_help.split("):", 1)[1].split(",")]
    assert named == list(METHODS)
