"""The review log: recording, filtering, export, location, and what it refuses to keep."""

from __future__ import annotations

import csv
import io
import re
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from boneai.errors import BoneAIError
from boneai.store import COLUMNS, ReviewStore, default_db_path, model_version, new_study_id, to_csv_bytes


def _add(store: ReviewStore, **overrides) -> int:
    values = dict(study_id="S-1", views=["view1.png", "view2.png"], model_name="fracture", model_version="abc123",
                  task="fracture", operating_point="balanced", threshold=0.42, aggregation="mean",
                  view_probabilities=[0.8, 0.6], study_probability=0.7, model_decision="fracture suspected",
                  reviewer_decision="agree", note="")
    values.update(overrides)
    return store.add(**values)


def test_a_review_round_trips_with_every_field(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "log.sqlite")
    rid = _add(store, note="cortical step at the distal radius")
    df = ReviewStore(tmp_path / "log.sqlite").query()  # a second store object: it is on disk
    assert df["id"].tolist() == [rid]
    row = df.iloc[0]
    assert row["views"] == ["view1.png", "view2.png"]
    assert row["view_probabilities"] == [0.8, 0.6]
    assert row["study_probability"] == pytest.approx(0.7)
    assert row["threshold"] == pytest.approx(0.42)
    assert (row["model_name"], row["model_version"], row["operating_point"]) == ("fracture", "abc123", "balanced")
    assert row["reviewer_decision"] == "agree"
    assert row["note"] == "cortical step at the distal radius"
    assert datetime.fromisoformat(row["created_at"]).tzinfo is not None
    assert list(df.columns) == COLUMNS


def test_filters_combine(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "log.sqlite")
    now = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
    _add(store, study_id="S-wrist-1", reviewer_decision="agree", created_at=now - timedelta(days=10))
    _add(store, study_id="S-wrist-2", reviewer_decision="disagree", model_name="fracture-v2", created_at=now)
    _add(store, study_id="S-ankle-1", reviewer_decision="uncertain", created_at=now)
    assert store.count() == 3
    assert sorted(store.query(study_contains="wrist")["study_id"]) == ["S-wrist-1", "S-wrist-2"]
    assert store.query(model_name="fracture-v2")["study_id"].tolist() == ["S-wrist-2"]
    assert sorted(store.query(reviewer_decision=["agree", "uncertain"])["study_id"]) == ["S-ankle-1", "S-wrist-1"]
    assert store.query(reviewer_decision=[]).empty
    assert sorted(store.query(since=now - timedelta(days=1))["study_id"]) == ["S-ankle-1", "S-wrist-2"]
    assert store.query(until=now - timedelta(days=5))["study_id"].tolist() == ["S-wrist-1"]
    assert store.query(study_contains="wrist", reviewer_decision=["disagree"])["study_id"].tolist() == ["S-wrist-2"]
    # Newest first.
    assert store.query()["study_id"].tolist()[-1] == "S-wrist-1"
    assert store.model_names() == ["fracture", "fracture-v2"]


def test_like_wildcards_in_the_filter_are_literal(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "log.sqlite")
    _add(store, study_id="S_100%")
    _add(store, study_id="S-1000")
    assert store.query(study_contains="_100%")["study_id"].tolist() == ["S_100%"]


@pytest.mark.parametrize("bad", [dict(reviewer_decision="maybe"), dict(study_id="  "), dict(views=[]),
                                 dict(note="x" * 2001)])
def test_invalid_reviews_are_refused_with_a_message(tmp_path: Path, bad: dict) -> None:
    store = ReviewStore(tmp_path / "log.sqlite")
    with pytest.raises(BoneAIError):
        _add(store, **bad)
    assert store.count() == 0


def test_only_file_names_are_kept_never_paths(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "log.sqlite")
    _add(store, views=["/home/dr/Patients/Doe Jane/img1.png", "C:/scans/img2.dcm"])
    assert store.query().iloc[0]["views"] == ["img1.png", "img2.dcm"]


def test_schema_has_no_patient_columns(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    ReviewStore(path)
    with sqlite3.connect(path) as con:
        columns = [r[1] for r in con.execute("PRAGMA table_info(reviews)")]
    assert not [c for c in columns if re.search(r"patient|birth|mrn|accession|name$", c) and c != "model_name"]


def test_location_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BONEAI_REVIEW_DB", str(tmp_path / "elsewhere" / "reviews.db"))
    store = ReviewStore()
    _add(store)
    assert (tmp_path / "elsewhere" / "reviews.db").is_file()
    monkeypatch.delenv("BONEAI_REVIEW_DB")
    assert default_db_path().name == "reviews.sqlite"
    assert default_db_path().parent == Path(__file__).resolve().parents[1]


def test_csv_export_is_flat_and_formula_safe(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "log.sqlite")
    _add(store, note="=HYPERLINK(\"http://x\")", view_probabilities=[0.25, None])
    rows = list(csv.DictReader(io.StringIO(to_csv_bytes(store.query()).decode())))
    assert len(rows) == 1
    assert rows[0]["views"] == "view1.png;view2.png"
    assert rows[0]["view_probabilities"] == "0.25;"
    assert rows[0]["note"].startswith("'=")  # a spreadsheet shows it as text, not a formula
    assert rows[0]["reviewer_decision"] == "agree"


def test_study_ids_are_random_and_carry_no_identity() -> None:
    ids = {new_study_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"S-\d{8}-[0-9a-f]{6}", i) for i in ids)


def test_model_version_hashes_the_weights(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights-a")
    card = {"dir": str(tmp_path)}
    first = model_version(card)
    assert re.fullmatch(r"[0-9a-f]{12}", first)
    (tmp_path / "model.safetensors").write_bytes(b"weights-b")
    assert model_version(card) != first
    assert model_version({"dir": str(tmp_path), "version": "1.2"}) == "1.2"
    assert model_version({"dir": str(tmp_path / "missing")}) == "unknown"
