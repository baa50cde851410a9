"""The review log: recording, filtering, export, location, and what it refuses to keep."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sqlite3
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from boneai.errors import BoneAIError
from boneai import store as store_module
from boneai.store import (
    AUDIT_COLUMNS,
    COLUMNS,
    ReviewStore,
    default_db_path,
    model_version,
    new_study_id,
    to_csv_bytes,
    view_label,
)

VIEWS = [view_label(1, b"pixels of view 1"), view_label(2, b"pixels of view 2")]
PATIENT_FILE = "Doe_Jane_MRN123.dcm"


def _add(store: ReviewStore, **overrides) -> int:
    values = dict(study_id="S-1", views=VIEWS, model_name="fracture", model_version="abc123",
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
    assert row["views"] == VIEWS
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


def test_file_names_and_paths_are_never_kept_only_view_numbers(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "log.sqlite")
    _add(store, views=["/home/dr/Patients/Doe Jane/img1.png", "C:/scans/img2.dcm", VIEWS[0]])
    assert store.query().iloc[0]["views"] == ["view 1", "view 2", VIEWS[0]]


def test_view_labels_are_a_number_and_a_content_hash() -> None:
    data = b"radiograph bytes"
    label = view_label(3, data)
    assert re.fullmatch(r"view 3 · sha256:[0-9a-f]{12}", label)
    assert label == view_label(3, __import__("hashlib").sha256(data).hexdigest()[:16])  # a digest works too
    with pytest.raises(BoneAIError, match="not a file name"):
        view_label(1, PATIENT_FILE)


def test_patient_file_names_never_reach_the_database_or_the_csv(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    store = ReviewStore(path)
    data = b"\x00DICM pixels of Jane's wrist"
    # What the page passes (a label made from the bytes), and a caller that passes names by mistake.
    _add(store, views=[view_label(1, data), PATIENT_FILE, f"/scans/{PATIENT_FILE}"])
    df = store.query()
    assert df.iloc[0]["views"] == [view_label(1, data), "view 2", "view 3"]
    exported = to_csv_bytes(df)
    for blob in (path.read_bytes(), exported):
        assert b"Doe_Jane" not in blob and b"MRN123" not in blob
    assert view_label(1, data).encode() in exported


def test_an_old_database_gets_the_new_columns_and_loses_its_file_names(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as con:  # the schema and a row as the previous version wrote them
        con.execute("CREATE TABLE reviews (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at TEXT NOT NULL, "
                    "study_id TEXT NOT NULL, views TEXT NOT NULL, task TEXT NOT NULL, model_name TEXT NOT NULL, "
                    "model_version TEXT NOT NULL, operating_point TEXT, threshold REAL, aggregation TEXT, "
                    "view_probabilities TEXT NOT NULL, study_probability REAL, boneage_months REAL, "
                    "model_decision TEXT, reviewer_decision TEXT NOT NULL, note TEXT NOT NULL DEFAULT '')")
        con.execute("INSERT INTO reviews (created_at, study_id, views, task, model_name, model_version, "
                    "view_probabilities, reviewer_decision) VALUES ('2025-01-01T00:00:00+00:00', 'S-old', ?, "
                    "'fracture', 'fracture', 'v', '[0.5]', 'agree')", (json.dumps([PATIENT_FILE]),))
    con.close()
    store = ReviewStore(path)
    old = store.query()
    assert old["views"].tolist() == [["view 1"]] and old["reviewer"].tolist() == [None]
    assert b"Doe_Jane" not in path.read_bytes() and b"MRN123" not in path.read_bytes()
    _add(store, reviewer="dr.who@example.org")
    assert store.query(reviewer="dr.who@example.org")["study_id"].tolist() == ["S-1"]
    ReviewStore(path)  # opening again migrates nothing twice
    assert store.count() == 2


def test_view_familiarities_round_trip_and_export(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "log.sqlite")
    _add(store, study_id="S-fam", view_familiarities=[0.123456, None])
    _add(store, study_id="S-none")  # a review saved without a scope check
    df = store.query()
    by_study = dict(zip(df["study_id"], df["view_familiarities"]))
    assert by_study == {"S-fam": [0.1235, None], "S-none": []}
    text = to_csv_bytes(df).decode()
    assert ",0.1235;," in text or ",0.1235;\r" in text


def test_a_version_1_database_gets_the_familiarity_column(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as con:  # the previous release's schema, already migrated to version 1
        con.executescript(store_module._SCHEMA.replace(",\n    view_familiarities TEXT", ""))
        con.execute("INSERT INTO reviews (created_at, study_id, views, task, model_name, model_version, "
                    "view_probabilities, reviewer_decision) VALUES ('2026-01-01T00:00:00+00:00', 'S-v1', "
                    "'[\"view 1\"]', 'fracture', 'fracture', 'v', '[0.5]', 'agree')")
        con.execute("PRAGMA user_version = 1")
    con.close()
    store = ReviewStore(path)
    _add(store, view_familiarities=[0.05, 0.06])
    assert dict(zip(store.query()["study_id"], store.query()["view_familiarities"])) == {"S-v1": [], "S-1": [0.05, 0.06]}


def test_reviews_record_who_reviewed_and_filter_by_reviewer(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "log.sqlite")
    _add(store, study_id="S-a", reviewer="alice@example.org")
    _add(store, study_id="S-b", reviewer="local")
    _add(store, study_id="S-c")
    assert store.query(reviewer="alice@example.org")["study_id"].tolist() == ["S-a"]
    assert store.query(reviewer="local")["study_id"].tolist() == ["S-b"]
    assert sorted(store.query()["reviewer"].fillna("-")) == ["-", "alice@example.org", "local"]
    with pytest.raises(BoneAIError, match="sign-in name"):
        _add(store, reviewer="x" * 300)


def test_saving_the_same_review_twice_stores_it_once(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "log.sqlite")
    key = "S-1|agree|looks fine|abc123"
    first = _add(store, review_key=key, reviewer="alice")
    assert _add(store, review_key=key, reviewer="alice") == first  # a double click or a rerun
    assert ReviewStore(tmp_path / "log.sqlite").count() == 1
    # Another decision, another reviewer, or no key at all: a new review each time.
    assert _add(store, review_key="S-1|disagree|looks fine|abc123", reviewer="alice") != first
    assert _add(store, review_key=key, reviewer="bob") != first
    _add(store)
    _add(store)
    assert store.count() == 5


def test_the_audit_log_appends_and_refuses_changes(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    store = ReviewStore(path)
    store.audit("alice@example.org", "sign-in")
    store.audit("alice@example.org", "export", "review_log.csv, 3 rows")
    log = ReviewStore(path).audit_log()
    assert list(log.columns) == AUDIT_COLUMNS
    assert log["action"].tolist() == ["export", "sign-in"]  # newest first
    assert log.iloc[0]["detail"] == "review_log.csv, 3 rows" and log.iloc[1]["detail"] == ""
    assert datetime.fromisoformat(log.iloc[0]["created_at"]).tzinfo is not None
    assert len(store.audit_log(limit=1)) == 1
    with sqlite3.connect(path) as con:  # even with direct SQL access, the lines stay
        for sql in ("UPDATE audit SET actor = 'mallory'", "DELETE FROM audit"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                con.execute(sql)
    con.close()
    assert store.audit_log()["actor"].tolist() == ["alice@example.org"] * 2
    for bad in (("", "sign-in"), ("alice", " ")):
        with pytest.raises(BoneAIError):
            store.audit(*bad)


def test_the_database_and_its_journal_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    folder = tmp_path / "db"
    folder.mkdir(mode=0o755)
    old_umask = os.umask(0o022)  # a usual umask: files would be world-readable
    try:
        path = folder / "log.sqlite"
        _add(ReviewStore(path))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # the folder is left alone
        con = sqlite3.connect(path)
        try:  # the rollback journal exists while a write is under way
            con.execute("BEGIN IMMEDIATE")
            con.execute("DELETE FROM reviews")
            journal = Path(f"{path}-journal")
            assert journal.is_file() and stat.S_IMODE(journal.stat().st_mode) == 0o600
            con.rollback()
        finally:
            con.close()
        # A database an older version created world-readable is tightened when opened.
        loose = folder / "loose.sqlite"
        sqlite3.connect(loose).close()
        os.chmod(loose, 0o644)
        ReviewStore(loose)
        assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


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
    assert rows[0]["views"] == ";".join(VIEWS)
    assert rows[0]["view_probabilities"] == "0.25;"
    assert rows[0]["note"].startswith("'=")  # a spreadsheet shows it as text, not a formula
    assert rows[0]["reviewer_decision"] == "agree"


def test_csv_export_escapes_formulas_in_every_text_column_and_keeps_numbers(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "log.sqlite")
    _add(store, model_name='=HYPERLINK("http://x")', note="@SUM(1)", operating_point="-cmd", reviewer="+alice",
         view_probabilities=[-1.25, 0.5], boneage_months=-2.0, threshold=-0.5)
    data = to_csv_bytes(store.query())
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    row = rows[0]
    assert row["model_name"] == "'=HYPERLINK(\"http://x\")"
    assert row["note"] == "'@SUM(1)"
    assert row["operating_point"] == "'-cmd" and row["reviewer"] == "'+alice"
    # Numbers stay numbers: negative values and lists of them are not quoted.
    assert float(row["boneage_months"]) == -2.0 and float(row["threshold"]) == -0.5
    assert row["view_probabilities"] == "-1.25;0.5"
    assert float(row["study_probability"]) == pytest.approx(0.7) and row["id"] == "1"
    # Tab and carriage return start formulas too; every text column is covered, whatever its name.
    df = store.query().assign(task="\t=1+1", model_version="\r=2", extra="  =cmd|' /C calc'!A0")
    flat = list(csv.DictReader(io.StringIO(to_csv_bytes(df).decode(), newline="")))[0]
    assert flat["task"] == "'\t=1+1" and flat["model_version"] == "'\r=2"
    assert flat["extra"].startswith("'")


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
