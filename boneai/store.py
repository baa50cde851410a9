"""The review log: what the model said about a study and what the reviewer decided, in SQLite.

One row per recorded review. The log holds only what is needed to audit the model: a study label,
the views' file names, the model name and version, the operating point, the probabilities and the
reviewer's decision with a free-text note. It never holds pixels or patient identifiers; the app
makes up the study label and warns that notes must not name the patient.

The database file is ``reviews.sqlite`` in the repository root unless ``BONEAI_REVIEW_DB`` names
another path. Each call opens and closes its own connection, so Streamlit sessions running in
different threads never share one.

Example:
    >>> from boneai.store import ReviewStore
    >>> store = ReviewStore(":memory:")
    >>> rid = store.add(study_id="S-1", views=["a.png"], model_name="fracture", model_version="abc",
    ...                 task="fracture", operating_point="balanced", threshold=0.4,
    ...                 view_probabilities=[0.7], study_probability=0.7, model_decision="fracture",
    ...                 reviewer_decision="agree")
    >>> store.query(reviewer_decision=["agree"])["study_id"].tolist()
    ['S-1']
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from boneai.errors import BoneAIError

__all__ = [
    "REVIEWER_DECISIONS",
    "COLUMNS",
    "ReviewStore",
    "default_db_path",
    "new_study_id",
    "model_version",
    "to_csv_bytes",
]

#: What a reviewer can record about the model's finding.
REVIEWER_DECISIONS = ("agree", "disagree", "uncertain")

#: Columns of the log, in display and export order.
COLUMNS = [
    "id", "created_at", "study_id", "views", "task", "model_name", "model_version", "operating_point",
    "threshold", "aggregation", "view_probabilities", "study_probability", "boneage_months",
    "model_decision", "reviewer_decision", "note",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at         TEXT NOT NULL,
    study_id           TEXT NOT NULL,
    views              TEXT NOT NULL,
    task               TEXT NOT NULL,
    model_name         TEXT NOT NULL,
    model_version      TEXT NOT NULL,
    operating_point    TEXT,
    threshold          REAL,
    aggregation        TEXT,
    view_probabilities TEXT NOT NULL,
    study_probability  REAL,
    boneage_months     REAL,
    model_decision     TEXT,
    reviewer_decision  TEXT NOT NULL CHECK (reviewer_decision IN ('agree', 'disagree', 'uncertain')),
    note               TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS reviews_created ON reviews (created_at);
CREATE INDEX IF NOT EXISTS reviews_study ON reviews (study_id);
"""

_MAX_NOTE = 2000
_MAX_LABEL = 120


def default_db_path() -> Path:
    """``BONEAI_REVIEW_DB`` if set, else ``reviews.sqlite`` in the repository root."""
    env = os.environ.get("BONEAI_REVIEW_DB")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "reviews.sqlite"


def new_study_id() -> str:
    """A study label with no link to the patient: date plus random hex, e.g. ``S-20250101-3fa2c1``."""
    return f"S-{datetime.now(timezone.utc):%Y%m%d}-{secrets.token_hex(3)}"


def model_version(card: dict[str, Any]) -> str:
    """The card's ``version`` if it has one, else the first 12 hex digits of the weights' SHA-256.

    The hash identifies the exact weights a decision was made with, even if a folder is renamed.
    """
    if card.get("version"):
        return str(card["version"])
    directory = card.get("dir")
    weights = Path(directory) / card.get("weights_file", "model.safetensors") if directory else None
    if weights is None or not weights.is_file():
        return "unknown"
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


class ReviewStore:
    """The review log in one SQLite file (``":memory:"`` keeps one in-memory database per store)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else str(default_db_path())
        self._memory: sqlite3.Connection | None = None
        if self.path == ":memory:":
            self._memory = sqlite3.connect(":memory:", check_same_thread=False)
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        if self._memory is not None:
            return self._memory
        # A short busy timeout: two reviewers saving at once wait for each other instead of failing.
        return sqlite3.connect(self.path, timeout=10)

    def _run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        con = self._connect()
        try:
            with con:
                rows = con.execute(sql, params).fetchall()
        finally:
            if self._memory is None:
                con.close()
        return rows

    def add(
        self,
        *,
        study_id: str,
        views: Iterable[str],
        model_name: str,
        model_version: str,
        task: str,
        view_probabilities: Iterable[float | None],
        reviewer_decision: str,
        operating_point: str | None = None,
        threshold: float | None = None,
        aggregation: str | None = None,
        study_probability: float | None = None,
        boneage_months: float | None = None,
        model_decision: str | None = None,
        note: str = "",
        created_at: datetime | None = None,
    ) -> int:
        """Record one review and return its id.

        Raises:
            BoneAIError: an unknown reviewer decision, an empty study label or no views.
        """
        if reviewer_decision not in REVIEWER_DECISIONS:
            raise BoneAIError(f"Reviewer decision must be one of {', '.join(REVIEWER_DECISIONS)}, "
                              f"not {reviewer_decision!r}.")
        study_id = (study_id or "").strip()
        if not study_id:
            raise BoneAIError("A review needs a study label.")
        if len(study_id) > _MAX_LABEL:
            raise BoneAIError(f"Study label is longer than {_MAX_LABEL} characters.")
        names = [Path(str(v)).name for v in views]  # a name only, never a path from someone's disk
        if not names:
            raise BoneAIError("A review needs at least one view.")
        note = (note or "").strip()
        if len(note) > _MAX_NOTE:
            raise BoneAIError(f"Note is longer than {_MAX_NOTE} characters; shorten it.")
        when = (created_at or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(timespec="seconds")
        probs = [None if p is None else round(float(p), 6) for p in view_probabilities]
        con = self._connect()
        try:
            with con:
                cur = con.execute(
                    "INSERT INTO reviews (created_at, study_id, views, task, model_name, model_version, "
                    "operating_point, threshold, aggregation, view_probabilities, study_probability, "
                    "boneage_months, model_decision, reviewer_decision, note) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (when, study_id, json.dumps(names), task, model_name, model_version, operating_point,
                     _opt_float(threshold), aggregation, json.dumps(probs), _opt_float(study_probability),
                     _opt_float(boneage_months), model_decision, reviewer_decision, note),
                )
                return int(cur.lastrowid)
        finally:
            if self._memory is None:
                con.close()

    def query(
        self,
        *,
        study_contains: str | None = None,
        model_name: str | Sequence[str] | None = None,
        task: str | None = None,
        reviewer_decision: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Reviews matching every given filter, newest first, with list columns decoded.

        ``since``/``until`` are inclusive bounds on the UTC timestamp; naive datetimes count as UTC.
        """
        where, params = [], []
        if study_contains:
            where.append("study_id LIKE ? ESCAPE '\\'")
            params.append("%" + _like_escape(study_contains) + "%")
        if model_name:
            names = [model_name] if isinstance(model_name, str) else list(model_name)
            where.append(f"model_name IN ({', '.join('?' * len(names))})")
            params.extend(names)
        if task:
            where.append("task = ?")
            params.append(task)
        if reviewer_decision is not None:
            decisions = list(reviewer_decision)
            if not decisions:
                return pd.DataFrame(columns=COLUMNS)
            where.append(f"reviewer_decision IN ({', '.join('?' * len(decisions))})")
            params.extend(decisions)
        if since is not None:
            where.append("created_at >= ?")
            params.append(_utc(since))
        if until is not None:
            where.append("created_at <= ?")
            params.append(_utc(until))
        sql = f"SELECT {', '.join(COLUMNS)} FROM reviews"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        df = pd.DataFrame(self._run(sql, params), columns=COLUMNS)
        for col in ("views", "view_probabilities"):
            df[col] = df[col].map(json.loads)
        return df

    def count(self) -> int:
        """Number of recorded reviews."""
        return int(self._run("SELECT COUNT(*) FROM reviews")[0][0])

    def model_names(self) -> list[str]:
        """Distinct model names in the log (for filter widgets)."""
        return [r[0] for r in self._run("SELECT DISTINCT model_name FROM reviews ORDER BY model_name")]


def to_csv_bytes(df: pd.DataFrame) -> bytes:
    """CSV export of a :meth:`ReviewStore.query` frame; list columns joined with ``;``."""
    out = df.copy()
    for col in ("views", "view_probabilities"):
        if col in out:
            out[col] = out[col].map(lambda v: ";".join("" if x is None else str(x) for x in v)
                                    if isinstance(v, (list, tuple)) else v)
    # Cells starting with = + - @ are formulas to a spreadsheet; a leading quote keeps them text.
    for col in ("study_id", "views", "note"):
        if col in out:
            out[col] = out[col].map(lambda s: "'" + s if isinstance(s, str) and s[:1] in ("=", "+", "-", "@") else s)
    return out.to_csv(index=False).encode("utf-8")


def _opt_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _utc(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
