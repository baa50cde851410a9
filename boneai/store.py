"""The review log: what the model said about a study and what the reviewer decided, in SQLite.

One row per recorded review. The log holds only what is needed to audit the model: a study label,
a label per view (its number and a content hash, ``view 1 · sha256:3f2a9c1b0d4e``, see
:func:`view_label`), the model name and version, the operating point, the probabilities, who reviewed
(a sign-in name, or ``local``) and the reviewer's decision with a free-text note. It never holds
pixels, file names or patient identifiers: upload names often carry a name or record number
(``Doe_Jane_MRN123.dcm``), so :meth:`ReviewStore.add` keeps a view label and reduces anything else it
is given to the view's number. The app makes up the study label and warns that notes must not name
the patient.

A second, append-only table records who did what (sign-in, export, model registration...):
:meth:`ReviewStore.audit` adds a line, and SQLite triggers refuse to change or delete one.

The database file is ``reviews.sqlite`` in the repository root unless ``BONEAI_REVIEW_DB`` names
another path. It is created readable and writable by its owner only (0600; SQLite gives its journal
the same mode), and an existing one is tightened to that when opened. Each call opens and closes its
own connection, so Streamlit sessions running in different threads never share one.

Example:
    >>> from boneai.store import ReviewStore, view_label
    >>> store = ReviewStore(":memory:")
    >>> rid = store.add(study_id="S-1", views=[view_label(1, b"pixels")], model_name="fracture", model_version="abc",
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
import re
import secrets
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from boneai.card import ModelCard
from boneai.errors import BoneAIError

__all__ = [
    "REVIEWER_DECISIONS",
    "COLUMNS",
    "AUDIT_ACTIONS",
    "AUDIT_COLUMNS",
    "VIEW_LABEL_RE",
    "ReviewStore",
    "default_db_path",
    "new_study_id",
    "model_version",
    "to_csv_bytes",
    "view_label",
    "safe_view_label",
]

#: What a reviewer can record about the model's finding.
REVIEWER_DECISIONS = ("agree", "disagree", "uncertain")

#: Columns of the log, in display and export order.
COLUMNS = [
    "id", "created_at", "study_id", "views", "task", "model_name", "model_version", "operating_point",
    "threshold", "aggregation", "view_probabilities", "study_probability", "boneage_months",
    "model_decision", "reviewer", "reviewer_decision", "note", "view_familiarities",
]

#: What the callers record in the audit table (``action``); documentation, not a closed list.
AUDIT_ACTIONS = ("sign-in", "export", "register-model", "set-default", "save-review", "show-anyway")

#: Columns of :meth:`ReviewStore.audit_log`.
AUDIT_COLUMNS = ["id", "created_at", "actor", "action", "detail"]

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
    note               TEXT NOT NULL DEFAULT '',
    reviewer           TEXT,
    review_key         TEXT,
    view_familiarities TEXT
);
CREATE INDEX IF NOT EXISTS reviews_created ON reviews (created_at);
CREATE INDEX IF NOT EXISTS reviews_study ON reviews (study_id);
CREATE TABLE IF NOT EXISTS audit (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT ''
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

#: Columns added after the first release: a database made by an older version gets them on opening.
_ADDED_COLUMNS = (("reviewer", "TEXT"), ("review_key", "TEXT"), ("view_familiarities", "TEXT"))

# After the migration (the index needs the column). NULL keys never collide: reviews saved without
# a key are all kept.
_INDEXES = """
CREATE INDEX IF NOT EXISTS reviews_reviewer ON reviews (reviewer);
CREATE UNIQUE INDEX IF NOT EXISTS reviews_key ON reviews (review_key);
"""

#: ``PRAGMA user_version`` once old rows' view file names have been replaced by view numbers (1) and
#: the per-view familiarity column exists (2).
_SCHEMA_VERSION = 2

#: A view as the log and the reports name it: number in the study and 12 hex digits of SHA-256.
VIEW_LABEL_RE = re.compile(r"view (\d{1,4}) · sha256:([0-9a-f]{12})")

_MAX_NOTE = 2000
_MAX_LABEL = 120
_MAX_ACTOR = 254  # the longest e-mail address
_MAX_ACTION = 40


def default_db_path() -> Path:
    """``BONEAI_REVIEW_DB`` if set, else ``reviews.sqlite`` in the repository root."""
    env = os.environ.get("BONEAI_REVIEW_DB")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "reviews.sqlite"


def new_study_id() -> str:
    """A study label with no link to the patient: date plus random hex, e.g. ``S-20250101-3fa2c1``."""
    return f"S-{datetime.now(timezone.utc):%Y%m%d}-{secrets.token_hex(3)}"


def view_label(index: int, data: bytes | str) -> str:
    """``view 1 · sha256:3f2a9c1b0d4e``: the view's 1-based place in the study and the first 12 hex
    digits of the SHA-256 of its bytes (``data``), or of a hex digest already computed from them.

    This, not the file name, is what the log and the reports keep: upload names often carry the
    patient's name or record number. The hash still tells the views apart and matches a file on disk
    to its review (hash it again).

    Raises:
        BoneAIError: ``data`` is text but not a hex digest of at least 12 digits.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        hexdigest = hashlib.sha256(data).hexdigest()
    else:
        hexdigest = str(data).strip().lower()
        if not re.fullmatch(r"[0-9a-f]{12,128}", hexdigest):
            raise BoneAIError("A view label needs the file's bytes or their SHA-256 hex digest, "
                              "not a file name.")
    return f"view {int(index)} · sha256:{hexdigest[:12]}"


def safe_view_label(index: int, label: Any) -> str:
    """``label`` if it is a :func:`view_label`, else ``view N`` alone: a file name or path never passes."""
    text = str(label).strip()
    return text if VIEW_LABEL_RE.fullmatch(text) else f"view {int(index)}"


def model_version(card: ModelCard | Mapping[str, Any]) -> str:
    """The card's ``version`` if it has one, else the first 12 hex digits of the weights' SHA-256.

    ``card`` is a :class:`~boneai.card.ModelCard` read from its folder, or a listing's card dict
    (with ``dir``). The hash identifies the exact weights a decision was made with, even if a folder
    is renamed.
    """
    card = ModelCard.coerce(card)
    if card.version:
        return str(card.version)
    weights = card.directory / card.weights_file if card.directory is not None else None
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
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)  # the folder's own mode is left alone
            _make_private(Path(self.path))
        con = self._connect()
        try:
            with con:
                con.executescript(_SCHEMA)
            _migrate(con)
        finally:
            if self._memory is None:
                con.close()

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
        reviewer: str | None = None,
        review_key: str | None = None,
        view_familiarities: Iterable[float | None] | None = None,
    ) -> int:
        """Record one review and return its id.

        ``views`` are :func:`view_label` strings; anything else (a file name, a path) is stored as the
        view's number alone, so no name from someone's disk reaches the log. ``reviewer`` is who
        reviewed: a sign-in name or e-mail, or ``"local"`` in single-user mode.

        ``review_key`` makes saving idempotent: a second call with the same key and reviewer (a
        double click, a Streamlit rerun) stores nothing and returns the first call's id. The page
        builds it from the study label, decision, note and model version; it is stored hashed.

        ``view_familiarities``: each view's familiarity (:mod:`boneai.scope`; None for a view out of
        scope or without a score), so the log can tell when a source's images drift from the training
        images.

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
        names = [safe_view_label(i, v) for i, v in enumerate(views, 1)]
        if not names:
            raise BoneAIError("A review needs at least one view.")
        note = (note or "").strip()
        if len(note) > _MAX_NOTE:
            raise BoneAIError(f"Note is longer than {_MAX_NOTE} characters; shorten it.")
        when = (created_at or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(timespec="seconds")
        probs = [None if p is None else round(float(p), 6) for p in view_probabilities]
        fams = None if view_familiarities is None else json.dumps(
            [None if f is None else round(float(f), 4) for f in view_familiarities])
        who = _check_actor(reviewer, "Reviewer") if (reviewer or "").strip() else None  # blank: not signed in
        # Scoped by reviewer: two reviewers recording the same decision on a study are two reviews.
        key = (hashlib.sha256(f"{who or ''}\x00{review_key}".encode()).hexdigest()
               if review_key is not None else None)
        con = self._connect()
        try:
            with con:
                cur = con.execute(
                    "INSERT INTO reviews (created_at, study_id, views, task, model_name, model_version, "
                    "operating_point, threshold, aggregation, view_probabilities, study_probability, "
                    "boneage_months, model_decision, reviewer_decision, note, reviewer, review_key, "
                    "view_familiarities) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (review_key) DO NOTHING",
                    (when, study_id, json.dumps(names), task, model_name, model_version, operating_point,
                     _opt_float(threshold), aggregation, json.dumps(probs), _opt_float(study_probability),
                     _opt_float(boneage_months), model_decision, reviewer_decision, note, who, key, fams),
                )
                if cur.rowcount == 0:  # saved before under this key: the first save stands
                    return int(con.execute("SELECT id FROM reviews WHERE review_key = ?", (key,)).fetchone()[0])
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
        reviewer: str | None = None,
    ) -> pd.DataFrame:
        """Reviews matching every given filter, newest first, with list columns decoded.

        ``since``/``until`` are inclusive bounds on the UTC timestamp; naive datetimes count as UTC.
        ``reviewer`` keeps one reviewer's reviews (exact match).
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
        if reviewer is not None:
            where.append("reviewer = ?")
            params.append(reviewer.strip())
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
        # NULL (saved without a scope check, or before the column existed): no scores.
        df["view_familiarities"] = df["view_familiarities"].map(lambda v: json.loads(v) if isinstance(v, str) else [])
        return df

    def count(self) -> int:
        """Number of recorded reviews."""
        return int(self._run("SELECT COUNT(*) FROM reviews")[0][0])

    def model_names(self) -> list[str]:
        """Distinct model names in the log (for filter widgets)."""
        return [r[0] for r in self._run("SELECT DISTINCT model_name FROM reviews ORDER BY model_name")]

    def audit(self, actor: str, action: str, detail: str = "") -> None:
        """Append one line to the audit table: who (``actor``) did what (``action``, e.g. one of
        :data:`AUDIT_ACTIONS`), with an optional ``detail`` (a model name, a review id; never a patient
        identifier). Lines cannot be changed or deleted afterwards: triggers refuse it.

        Raises:
            BoneAIError: an empty actor or action, or one that is too long.
        """
        who = _check_actor(actor, "Actor")
        what = (action or "").strip()
        if not what or len(what) > _MAX_ACTION:
            raise BoneAIError(f"An audit line needs an action of 1 to {_MAX_ACTION} characters.")
        detail = (detail or "").strip()
        if len(detail) > _MAX_NOTE:
            raise BoneAIError(f"Audit detail is longer than {_MAX_NOTE} characters.")
        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._run("INSERT INTO audit (created_at, actor, action, detail) VALUES (?, ?, ?, ?)",
                  (when, who, what, detail))

    def audit_log(self, limit: int = 500) -> pd.DataFrame:
        """The latest ``limit`` audit lines, newest first (columns :data:`AUDIT_COLUMNS`)."""
        rows = self._run(f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit ORDER BY id DESC LIMIT ?",
                         (max(0, int(limit)),))
        return pd.DataFrame(rows, columns=AUDIT_COLUMNS)


def to_csv_bytes(df: pd.DataFrame) -> bytes:
    """CSV export of a :meth:`ReviewStore.query` frame; list columns joined with ``;``.

    Every text cell that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``,
    ``@``, a tab or a carriage return; OWASP "CSV injection") gets a leading single quote, in every
    column: a model name or a reviewer's name comes from outside as much as a note does. Numbers
    stay numbers, and so do ``;``-joined lists of numbers (``-1.25;0.5``).
    """
    out = df.copy()
    for col in ("views", "view_probabilities", "view_familiarities"):
        if col in out:
            out[col] = out[col].map(lambda v: ";".join("" if x is None else str(x) for x in v)
                                    if isinstance(v, (list, tuple)) else v)
    for col in out.columns:
        if not pd.api.types.is_numeric_dtype(out[col]):
            out[col] = out[col].map(_csv_cell)
    # CRLF rows (RFC 4180): the csv writer quotes a field holding any line-terminator character, so a
    # carriage return inside a note cannot split its row as it would with bare "\n" rows.
    return out.to_csv(index=False, lineterminator="\r\n").encode("utf-8")


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_LIST = re.compile(rf"{_NUMBER}(?:;(?:{_NUMBER})?)*")


def _csv_cell(value: Any) -> Any:
    """``value`` with a leading ``'`` when it is text a spreadsheet would take for a formula."""
    if not isinstance(value, str) or _NUMBER_LIST.fullmatch(value):
        return value
    # Leading spaces are skipped too: some spreadsheets trim them before looking for a formula.
    return "'" + value if value.lstrip(" ")[:1] in _FORMULA_START else value


def _check_actor(actor: str | None, what: str) -> str:
    """A reviewer's or actor's identity, stripped; refused when empty or too long."""
    text = (actor or "").strip()
    if not text or len(text) > _MAX_ACTOR:
        raise BoneAIError(f"{what} must be a sign-in name or e-mail of 1 to {_MAX_ACTOR} characters "
                          "(or 'local' without sign-in).")
    return text


def _make_private(path: Path) -> None:
    """Create the database file with mode 0600 before SQLite opens it, and tighten an existing one.

    SQLite creates its journal and WAL files with the database file's mode, so they follow. The
    file is created here with ``os.open`` rather than under a changed umask: the umask is
    process-wide and Streamlit sessions run in threads.
    """
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    for p in (path, Path(f"{path}-journal"), Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            pass
        except PermissionError:  # another account's file: leave it; SQLite says if it cannot write
            pass


def _migrate(con: sqlite3.Connection) -> None:
    """Bring a database made by an older version up to date, once, under a write lock.

    Adds the columns of :data:`_ADDED_COLUMNS` and the indexes, and replaces the file names older
    versions stored in ``views`` by view numbers (with ``secure_delete`` so the old text does not
    linger in free pages).
    """
    if con.execute("PRAGMA user_version").fetchone()[0] >= _SCHEMA_VERSION:
        return
    con.execute("PRAGMA secure_delete = ON")
    old_isolation = con.isolation_level
    con.isolation_level = None  # explicit transaction: DDL included, two processes cannot both migrate
    try:
        con.execute("BEGIN IMMEDIATE")
        try:
            if con.execute("PRAGMA user_version").fetchone()[0] < _SCHEMA_VERSION:
                columns = {r[1] for r in con.execute("PRAGMA table_info(reviews)")}
                for name, decl in _ADDED_COLUMNS:
                    if name not in columns:
                        con.execute(f"ALTER TABLE reviews ADD COLUMN {name} {decl}")
                for statement in filter(str.strip, _INDEXES.split(";")):
                    con.execute(statement)
                for rid, views in con.execute("SELECT id, views FROM reviews").fetchall():
                    labels = [safe_view_label(i, v) for i, v in enumerate(json.loads(views), 1)]
                    if json.dumps(labels) != views:
                        con.execute("UPDATE reviews SET views = ? WHERE id = ?", (json.dumps(labels), rid))
                con.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.isolation_level = old_isolation


def _opt_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _utc(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
