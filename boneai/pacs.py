"""The hospital archive over DICOMweb: find studies (QIDO-RS), fetch their radiographs (WADO-RS), store
results (STOW-RS), and the batch that analyses studies and writes the results back.

The HTTP side is ``dicomweb-client``; the DICOM objects written back are made by
:mod:`boneai.dicom_results` (highdicom). Every fetched image goes through :func:`boneai.io.read_radiograph`
like an upload: the same size checks before decoding, the same decoders, the same whitelist. What we
keep of a study is its Study, Series and SOP Instance UIDs (results must point back at them) and the
whitelisted technical fields. The source headers (patient module included) are held in memory only
while the results are written, because a result object must carry the patient and study of the images
it describes; they are never stored, logged or printed by us.

Example:
    >>> from boneai.pacs import ArchiveClient, ArchiveSettings
    >>> client = ArchiveClient(ArchiveSettings(url="http://127.0.0.1:8042/dicom-web"))  # doctest: +SKIP
    >>> [s.study_uid for s in client.search_studies(since="20260101")]                 # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io as _io
import os
import re
import tempfile
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from boneai.errors import BoneAIError
from boneai.io import Radiograph, read_radiograph

__all__ = ["ArchiveError", "ArchiveSettings", "ArchiveClient", "ArchiveStudy", "ArchiveView", "StudyStatus",
           "ProcessResult", "process_study", "process_archive", "record_review", "study_lock", "check_uid",
           "settings_from", "add_pacs_arguments", "pacs_command"]

#: Modalities of the radiographs we analyse (computed and digital radiography).
DEFAULT_MODALITIES = ("CR", "DX")
#: WADO-RS transfer syntax: "*" asks for the images as stored (JPEG Lossless, JPEG 2000, ... are
#: decoded by boneai.io); a UID asks the archive to transcode.
DEFAULT_TRANSFER_SYNTAX = "*"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^[0-9]{8}$")
#: Studies per QIDO-RS request.
_PAGE = 200


class ArchiveError(BoneAIError):
    """The archive cannot be reached, refused a request, or answered something we cannot use."""


def check_uid(uid: str, what: str = "Study Instance UID") -> str:
    """``uid`` if it is a DICOM UID (digits and dots, at most 64 characters); else an ArchiveError."""
    uid = str(uid or "").strip()
    if not _UID.match(uid) or len(uid) > 64:
        raise ArchiveError(f"{what} {uid!r} is not a DICOM UID (digits and dots, at most 64 characters).")
    return uid


@dataclass(frozen=True)
class ArchiveSettings:
    """Where the archive is and how to talk to it.

    Attributes:
        url: the DICOMweb root, e.g. ``https://pacs.example.org/dicom-web``.
        username, password: HTTP basic authentication (both, or neither).
        token: a bearer token (OAuth 2 access token), instead of basic authentication.
        modalities: study filter: studies with at least one series of these modalities.
        body_parts: optional filter on the image series' Body Part Examined (e.g. HAND, WRIST).
        transfer_syntax: what WADO-RS asks for (``*`` = as stored).
        timeout: seconds per HTTP request.
    """

    url: str
    username: str | None = None
    password: str | None = None
    token: str | None = None
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    body_parts: tuple[str, ...] = ()
    transfer_syntax: str = DEFAULT_TRANSFER_SYNTAX
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.url or ""):
            raise ArchiveError(f"Archive URL must start with http:// or https://: {self.url!r}.")
        if bool(self.username) != bool(self.password):
            raise ArchiveError("Archive basic authentication needs both a user name and a password.")
        if self.token and self.username:
            raise ArchiveError("Configure either basic authentication or a bearer token for the archive, not both.")

    def __repr__(self) -> str:  # never print secrets
        auth = "basic" if self.username else ("bearer" if self.token else "none")
        return f"ArchiveSettings(url={self.url!r}, auth={auth}, modalities={self.modalities})"


def _split(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).replace(";", ",").split(",")
    return tuple(str(v).strip().upper() for v in items if str(v).strip())


def settings_from(section: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> ArchiveSettings | None:
    """Archive settings from a ``[pacs]`` secrets section and ``BONEAI_PACS_*`` environment variables
    (the environment wins); None when no URL is configured.

    Keys: ``url``, ``username``, ``password``, ``token``, ``modalities`` (list or "CR,DX"),
    ``body_parts``, ``transfer_syntax``; variables ``BONEAI_PACS_URL``, ``BONEAI_PACS_USER``,
    ``BONEAI_PACS_PASSWORD``, ``BONEAI_PACS_TOKEN``, ``BONEAI_PACS_MODALITIES``, ``BONEAI_PACS_BODY_PARTS``,
    ``BONEAI_PACS_TRANSFER_SYNTAX``.
    """
    env = os.environ if environ is None else environ
    merged = {k: v for k, v in dict(section or {}).items() if v not in (None, "")}
    for key, var in (("url", "BONEAI_PACS_URL"), ("username", "BONEAI_PACS_USER"),
                     ("password", "BONEAI_PACS_PASSWORD"), ("token", "BONEAI_PACS_TOKEN"),
                     ("modalities", "BONEAI_PACS_MODALITIES"), ("body_parts", "BONEAI_PACS_BODY_PARTS"),
                     ("transfer_syntax", "BONEAI_PACS_TRANSFER_SYNTAX")):
        if env.get(var):
            merged[key] = env[var]
    if not merged.get("url"):
        return None
    return ArchiveSettings(url=str(merged["url"]).rstrip("/"), username=merged.get("username"),
                           password=merged.get("password"), token=merged.get("token"),
                           modalities=_split(merged.get("modalities")) or DEFAULT_MODALITIES,
                           body_parts=_split(merged.get("body_parts")),
                           transfer_syntax=str(merged.get("transfer_syntax") or DEFAULT_TRANSFER_SYNTAX))


@dataclass(frozen=True)
class ArchiveStudy:
    """One study as the archive's QIDO-RS describes it (technical fields only)."""

    study_uid: str
    date: str  # YYYYMMDD ("" when the archive has none)
    time: str
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    n_views: int  # instances in the image series of our modalities
    image_series: tuple[str, ...]
    ai_series: tuple[str, ...]  # our AI report series
    review_series: tuple[str, ...]  # our reviewer report series


@dataclass
class ArchiveView:
    """One radiograph fetched from the archive.

    ``header`` is the instance's data set without pixel data: held in memory while results are made
    (it carries the patient and study modules the results must repeat), never stored by us.
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    radiograph: Radiograph
    data: bytes = field(repr=False)
    header: Any = field(repr=False, default=None)


@dataclass(frozen=True)
class StudyStatus:
    """Our status of a study: ``new``, ``analysed`` (with the finding) or ``reviewed`` (with the decision)."""

    state: str
    finding: str | None = None
    probability: float | None = None
    boneage_months: float | None = None
    decision: str | None = None
    ai_sr_uid: str | None = None
    model: str | None = None
    #: The AI report says the study's views in scope, together, are unlike the model's training images.
    unfamiliar: bool | None = None


def _value(ds_json: Mapping[str, Any], tag: str) -> list[Any]:
    return list(ds_json.get(tag, {}).get("Value", []))


def _first(ds_json: Mapping[str, Any], tag: str, default: Any = "") -> Any:
    values = _value(ds_json, tag)
    return values[0] if values else default


def _part10(data: bytes) -> bytes:
    """``data`` as a DICOM file: a part that starts with the file meta (group 0002) but lacks the
    preamble and "DICM" gets them, so :func:`boneai.io.read_radiograph` knows it for DICOM."""
    if data[128:132] != b"DICM" and data[:2] == b"\x02\x00":
        return b"\x00" * 128 + b"DICM" + data
    return data


class ArchiveClient:
    """QIDO-RS, WADO-RS and STOW-RS on one archive (``dicomweb-client`` underneath)."""

    def __init__(self, settings: ArchiveSettings) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.settings = settings
        session = requests.Session()
        if settings.username:
            session.auth = (settings.username, settings.password or "")
        headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else None
        self._client = DICOMwebClient(settings.url, session=session, headers=headers, timeout=settings.timeout)

    # -- errors --------------------------------------------------------------------------------------
    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise ArchiveError(f"The archive at {self.settings.url} refused the credentials (HTTP {status}) "
                                   f"while trying to {what}; check the user name, password or token.") from exc
            raise ArchiveError(f"The archive at {self.settings.url} answered HTTP {status} while trying to "
                               f"{what}.") from exc
        except requests.RequestException as exc:
            raise ArchiveError(f"Cannot reach the archive at {self.settings.url} to {what} "
                               f"({type(exc).__name__}); check the URL and that the archive is running.") from exc

    # -- QIDO-RS ---------------------------------------------------------------------------------------
    def search_studies(self, since: str | None = None, limit: int | None = None) -> list[ArchiveStudy]:
        """Studies with a series of the configured modalities (and body parts), newest first.

        Args:
            since: only studies on or after this date (YYYYMMDD).
            limit: at most this many studies.
        """
        if since is not None and not _DATE.match(str(since)):
            raise ArchiveError(f"--since must be a date as YYYYMMDD, not {since!r}.")
        found: dict[str, dict[str, Any]] = {}
        for modality in self.settings.modalities:
            filters = {"ModalitiesInStudy": modality}
            if since:
                filters["StudyDate"] = f"{since}-"
            for row in self._all_pages(filters):
                found[str(_first(row, "0020000D"))] = row
        studies = [self._study(uid, row) for uid, row in found.items() if uid]
        studies = [s for s in studies if s.image_series]
        studies.sort(key=lambda s: (s.date, s.time, s.study_uid), reverse=True)
        return studies[:limit] if limit else studies

    def _all_pages(self, filters: dict[str, str]) -> Iterator[Mapping[str, Any]]:
        """Every matching study, page by page (dicomweb-client's ``get_remaining`` waits forever on
        Orthanc 1.10 once the results run out, so the pages are asked for here)."""
        offset = 0
        while True:
            rows = self._call("search for studies", self._client.search_for_studies, search_filters=filters,
                              fields=["StudyDate", "StudyTime", "ModalitiesInStudy"], limit=_PAGE, offset=offset)
            yield from rows
            if len(rows) < _PAGE:
                return
            offset += len(rows)

    def study(self, study_uid: str) -> ArchiveStudy:
        """One study by its UID.

        Raises:
            ArchiveError: the archive has no such study.
        """
        check_uid(study_uid)
        rows = self._call("look up a study", self._client.search_for_studies,
                          search_filters={"StudyInstanceUID": study_uid},
                          fields=["StudyDate", "StudyTime", "ModalitiesInStudy"])
        if not rows:
            raise ArchiveError(f"The archive has no study {study_uid}.")
        return self._study(study_uid, rows[0])

    def _study(self, study_uid: str, row: Mapping[str, Any]) -> ArchiveStudy:
        from boneai.dicom_results import AI_SR_SERIES_DESCRIPTION, REVIEW_SR_SERIES_DESCRIPTION

        series = self._call("list a study's series", self._client.search_for_series, study_instance_uid=study_uid,
                            fields=["Modality", "BodyPartExamined", "SeriesDescription",
                                    "NumberOfSeriesRelatedInstances"])
        images, ai, review, parts, views = [], [], [], [], 0
        for s in series:
            uid, modality = str(_first(s, "0020000E")), str(_first(s, "00080060")).upper()
            description = str(_first(s, "0008103E"))
            part = str(_first(s, "00180015")).upper()
            wanted_part = not self.settings.body_parts or part in self.settings.body_parts
            if modality in self.settings.modalities and wanted_part:
                images.append(uid)
                views += int(_first(s, "00201209", 0) or 0)
                if part and part not in parts:
                    parts.append(part)
            elif modality == "SR" and description == AI_SR_SERIES_DESCRIPTION:
                ai.append(uid)
            elif modality == "SR" and description == REVIEW_SR_SERIES_DESCRIPTION:
                review.append(uid)
        modalities = tuple(str(m).upper() for m in _value(row, "00080061"))
        return ArchiveStudy(study_uid=study_uid, date=str(_first(row, "00080020")), time=str(_first(row, "00080030")),
                            modalities=modalities, body_parts=tuple(parts), n_views=views, image_series=tuple(images),
                            ai_series=tuple(ai), review_series=tuple(review))

    # -- WADO-RS ---------------------------------------------------------------------------------------
    def _series_parts(self, study_uid: str, series_uid: str, transfer_syntax: str | None = None) -> list[bytes]:
        """The instances of one series as the archive sends them: the raw bytes of each part.

        dicomweb-client's ``retrieve_series`` parses every part with pydicom, which refuses a part
        without the 128-byte preamble (Orthanc sends instances stored by STOW-RS clients that way).
        The raw parts go to :func:`boneai.io.read_radiograph` instead, whose checks run before any
        decoding. The two helpers used are dicomweb-client's own (pinned in requirements.txt).
        """
        from dicomweb_client.web import _Transaction

        syntax = transfer_syntax or self.settings.transfer_syntax
        client = self._client
        url = client._get_series_url(_Transaction.RETRIEVE, study_uid, series_uid)
        accept = f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'

        def get() -> list[bytes]:
            response = client._http_get(url, headers={"Accept": accept})
            return list(client._decode_multipart_message(response, stream=False))

        return [_part10(part) for part in self._call("fetch images", get)]

    def fetch_views(self, study: ArchiveStudy | str, transfer_syntax: str | None = None
                    ) -> tuple[list[ArchiveView], list[str]]:
        """The study's radiographs, read by :func:`boneai.io.read_radiograph`, in series and instance order,
        and one message per instance that could not be read (the others still come).
        """
        import pydicom

        if isinstance(study, str):
            study = self.study(study)
        views, errors = [], []
        for series_uid in study.image_series:
            read = []
            for n, data in enumerate(self._series_parts(study.study_uid, series_uid, transfer_syntax)):
                name = f"instance {n + 1} of series {series_uid}"  # UIDs only: no identifier in messages
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # the Radiograph's own warnings list keeps them
                        # io first: its size and deflate checks run before anything else parses the bytes.
                        radiograph = read_radiograph(data, name=name)
                    header = pydicom.dcmread(_io.BytesIO(data), stop_before_pixels=True, force=True)
                    if "SOPInstanceUID" not in header or "SOPClassUID" not in header:
                        raise ArchiveError(f"Instance has no SOP Instance or Class UID: {name}.")
                except BoneAIError as exc:
                    errors.append(str(exc))
                    continue
                except Exception as exc:  # a header pydicom cannot parse after io read the image
                    errors.append(f"Instance header cannot be read ({type(exc).__name__}): {name}.")
                    continue
                order = (int(header.get("InstanceNumber", 0) or 0), str(header.SOPInstanceUID))
                read.append((order, radiograph, data, header))
            read.sort(key=lambda t: t[0])
            for _, radiograph, data, header in read:
                radiograph.name = f"view {len(views) + 1}"
                views.append(ArchiveView(study_uid=study.study_uid, series_uid=series_uid,
                                         sop_instance_uid=str(header.SOPInstanceUID),
                                         sop_class_uid=str(header.SOPClassUID),
                                         radiograph=radiograph, data=data, header=header))
        return views, errors

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[Any]:
        """All instances of one series as pydicom data sets, as stored (our SR series, mostly)."""
        import pydicom

        parts = self._series_parts(study_uid, series_uid, "*")
        return [pydicom.dcmread(_io.BytesIO(data), force=True) for data in parts]

    # -- STOW-RS ---------------------------------------------------------------------------------------
    def store(self, datasets: Sequence[Any]) -> None:
        """Store data sets in the archive; raises ArchiveError naming how many failed."""
        if not datasets:
            return
        for ds in datasets:  # written as DICOM files (PS3.10: preamble and "DICM"), as STOW-RS expects
            if getattr(ds, "preamble", None) is None:
                ds.preamble = b"\x00" * 128
        response = self._call("store results", self._client.store_instances, list(datasets))
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            raise ArchiveError(f"The archive refused {len(failed)} of {len(datasets)} objects we sent.")

    # -- our results -------------------------------------------------------------------------------------
    def ai_results(self, study: ArchiveStudy) -> list[Any]:
        """Our AI reports in the study, read back (:class:`boneai.dicom_results.AIResult`), newest last."""
        from boneai.dicom_results import read_ai_result

        out = []
        for series_uid in study.ai_series:
            for ds in self.retrieve_series(study.study_uid, series_uid):
                try:
                    when = str(ds.get("ContentDate", "")) + str(ds.get("ContentTime", ""))
                    out.append((when, read_ai_result(ds), ds))
                except ValueError:
                    continue  # somebody else's report under our series description: not ours to read
        out.sort(key=lambda t: t[0])
        return [(r, ds) for _, r, ds in out]

    def reviews(self, study: ArchiveStudy) -> list[Any]:
        """Our reviewer reports in the study (:class:`boneai.dicom_results.ReviewResult`), newest last."""
        from boneai.dicom_results import read_review

        out = []
        for series_uid in study.review_series:
            for ds in self.retrieve_series(study.study_uid, series_uid):
                try:
                    out.append((str(ds.get("ContentDate", "")) + str(ds.get("ContentTime", "")), read_review(ds)))
                except ValueError:
                    continue
        out.sort(key=lambda t: t[0])
        return [r for _, r in out]

    def status(self, study: ArchiveStudy, model_name: str | None = None, model_version: str | None = None
               ) -> StudyStatus:
        """new / analysed (finding) / reviewed (decision), for one model (any model when None)."""
        results = [r for r, _ in self.ai_results(study) if (model_name is None or r.model_name == model_name)
                   and (model_version is None or r.model_version == model_version)]
        if not results:
            return StudyStatus("new")
        ai = results[-1]
        reviews = [r for r in self.reviews(study) if r.ai_result_uid == ai.sop_instance_uid]
        common = dict(finding=ai.finding, probability=ai.probability, boneage_months=ai.boneage_months,
                      ai_sr_uid=ai.sop_instance_uid, model=ai.model_name, unfamiliar=ai.unfamiliar)
        if reviews:
            return StudyStatus("reviewed", decision=reviews[-1].decision, **common)
        return StudyStatus("analysed", **common)


# -- one process at a time per study -------------------------------------------------------------------
def default_lock_dir() -> Path:
    """``BONEAI_PACS_LOCK_DIR``, else a folder in the system's temporary directory. Processes on several
    machines need a shared folder here (NFS with working ``flock``)."""
    return Path(os.environ.get("BONEAI_PACS_LOCK_DIR") or Path(tempfile.gettempdir()) / "boneai-pacs-locks")


@contextlib.contextmanager
def study_lock(study_uid: str, lock_dir: str | Path | None = None) -> Iterator[None]:
    """Hold an exclusive lock on one study (``flock`` on ``<lock_dir>/<uid>.lock``); waits for a holder."""
    folder = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{check_uid(study_uid)}.lock"
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- the batch -----------------------------------------------------------------------------------------
@dataclass
class ProcessResult:
    """One line of ``pacs process --json``."""

    study_uid: str
    ok: bool
    probability: float | None = None
    decision: str | None = None
    sr_sop_uid: str | None = None
    error: str | None = None
    skipped: bool = False  # our report for this model version was there already
    boneage_months: float | None = None
    #: The study's views in scope, taken together, are unlike the model's training images
    #: (:func:`boneai.scope.set_familiarity`; fracture studies analysed now, else None).
    unfamiliar: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _result_image(predictor: Any, view: ArchiveView, prediction: Any, male: bool | None) -> Any:
    """The radiograph with the boxes (localiser) or the heatmap (classifier, bone age) drawn on it."""
    from boneai import explain as ex
    from boneai.preprocess import standardise

    gray = standardise(view.radiograph.pixels).image
    if "boxes" in prediction.extras:
        return ex.draw_boxes(gray, prediction.extras.get("boxes", []))
    return ex.overlay(gray, ex.explain(predictor, view.radiograph, male=male).map)


def _male_from_header(views: Sequence[ArchiveView]) -> bool | None:
    sex = {str(v.header.get("PatientSex", "")).upper() for v in views} - {""}
    return None if len(sex) != 1 else {"M": True, "F": False}.get(sex.pop())


def analyse_study(client: ArchiveClient, predictor: Any, study: ArchiveStudy, *, model_version: str,
                  operating_point: str | float | None = None, aggregation: str = "mean", captures: bool = True,
                  show_anyway: Collection[str] = ()) -> ProcessResult:
    """Fetch, check, predict and store the AI report (and secondary captures) of one study, unconditionally.

    ``show_anyway``: content digests (SHA-256 of the instance's bytes, hex, or a prefix of at least 16
    characters, as the Study review page names its views) of out-of-scope views a reviewer chose to show anyway; they count
    in the study and are marked in scope in the report, as on the page.
    """
    import highdicom as hd

    from boneai.dicom_results import ai_result_sr, result_capture
    from boneai.scope import check_views, study_familiarity, view_familiarities
    from boneai.study import study_result

    views, errors = client.fetch_views(study)
    if not views:
        reason = errors[0] if errors else "the study has no radiograph of the configured modalities"
        return ProcessResult(study.study_uid, ok=False, error=f"Nothing to analyse: {reason}")
    male = None
    if predictor.task == "boneage":
        male = _male_from_header(views)
        if male is None:
            return ProcessResult(study.study_uid, ok=False,
                                 error="Bone age needs the patient's sex (M or F) in the DICOM header.")
    predictions = predictor.predict_many([v.radiograph for v in views], operating_point=operating_point, male=male)
    # The scope model's feature model (the default localiser) gives its features with its predictions: no
    # second pass; another model's views cost one pass of that model's branch.
    scopes = check_views([v.radiograph for v in views], predictor=predictor, predictions=predictions)
    together = study_familiarity(scopes, predictor.task)
    shown = [k for k, v in enumerate(views) if _matches_digest(v.data, show_anyway)]
    counted = [k for k, s in enumerate(scopes) if s.in_scope or k in shown]
    result = study_result(predictions, counted, aggregation)
    sr = ai_result_sr(sources=[v.header for v in views], predictions=predictions,
                      in_scope=[k in counted for k in range(len(views))], result=result,
                      model_name=predictor.name, model_version=model_version,
                      series_uid=hd.UID(), sop_uid=hd.UID(),
                      familiarities=view_familiarities(scopes, predictor.task),  # the fracture model's only
                      unfamiliar=None if together is None else together.unfamiliar)
    objects = [sr]
    if captures:
        series_uid = hd.UID()
        for n, (view, pred) in enumerate(zip(views, predictions, strict=True), 1):
            if n - 1 not in counted:
                continue  # no finding, so nothing to show on it
            objects.append(result_capture(view.header, _result_image(predictor, view, pred, male),
                                          series_uid=series_uid, sop_uid=hd.UID(), instance_number=n))
    client.store(objects)
    return ProcessResult(study.study_uid, ok=True, probability=result.score, decision=result.finding,
                         sr_sop_uid=str(sr.SOPInstanceUID), boneage_months=result.boneage_months,
                         error="; ".join(errors) or None,
                         unfamiliar=None if together is None else together.unfamiliar)


def _matches_digest(data: bytes, digests: Collection[str]) -> bool:
    if not digests:
        return False
    full = hashlib.sha256(data).hexdigest()
    return any(len(d) >= 16 and full.startswith(d.lower()) for d in digests)  # a short prefix could match others


def process_study(client: ArchiveClient, predictor: Any, study_uid: str, *, model_version: str,
                  operating_point: str | float | None = None, aggregation: str = "mean", captures: bool = True,
                  lock_dir: str | Path | None = None, show_anyway: Collection[str] = ()) -> ProcessResult:
    """Analyse one study unless our report for this model and version is in the archive already.

    Holds :func:`study_lock` while it looks and while it writes, and looks again after taking the
    lock: of several processes reaching the same study, one analyses it and the others report its result.
    ``show_anyway`` is passed to :func:`analyse_study` when the study is analysed now.
    Errors become a failed :class:`ProcessResult`, never an exception.
    """
    try:
        check_uid(study_uid)
        with study_lock(study_uid, lock_dir):
            study = client.study(study_uid)
            done = [r for r, _ in client.ai_results(study)
                    if r.model_name == predictor.name and r.model_version == model_version]
            if done:
                r = done[-1]
                return ProcessResult(study_uid, ok=True, probability=r.probability, decision=r.finding,
                                     sr_sop_uid=r.sop_instance_uid, skipped=True, boneage_months=r.boneage_months)
            return analyse_study(client, predictor, study, model_version=model_version,
                                 operating_point=operating_point, aggregation=aggregation, captures=captures,
                                 show_anyway=show_anyway)
    except BoneAIError as exc:
        return ProcessResult(study_uid, ok=False, error=str(exc))
    except Exception as exc:  # one bad study must not stop the batch; no traceback for the user
        return ProcessResult(study_uid, ok=False, error=f"could not process this study ({type(exc).__name__}: {exc})")


def process_archive(client: ArchiveClient, predictor: Any, *, model_version: str, study_uids: Sequence[str] = (),
                    since: str | None = None, **options: Any) -> Iterator[ProcessResult]:
    """Process the given studies, or every study of the filter (``since`` a date) not analysed yet by this
    model version; yields one result per study as it finishes."""
    if study_uids:
        uids = list(dict.fromkeys(study_uids))
    else:
        uids = [s.study_uid for s in client.search_studies(since=since)]
    for uid in uids:
        yield process_study(client, predictor, uid, model_version=model_version, **options)


def record_review(client: ArchiveClient, study_uid: str, ai_sr_uid: str, *, reviewer: str, decision: str) -> str:
    """Store the reviewer's decision on our AI report ``ai_sr_uid`` as a reviewer SR; returns its SOP Instance UID."""
    import highdicom as hd

    from boneai.dicom_results import review_sr

    study = client.study(study_uid)
    match = [ds for r, ds in client.ai_results(study) if r.sop_instance_uid == ai_sr_uid]
    if not match:
        raise ArchiveError(f"The archive has no BoneAI report {ai_sr_uid} in study {study_uid}.")
    sr = review_sr(match[0], reviewer=reviewer, decision=decision, series_uid=hd.UID(), sop_uid=hd.UID())
    client.store([sr])
    return str(sr.SOPInstanceUID)


# -- command line: python -m boneai pacs process ... ------------------------------------------------------
def add_pacs_arguments(sub: Any) -> None:
    """The ``pacs`` subcommand of ``python -m boneai`` (see :func:`pacs_command`)."""
    pacs = sub.add_parser("pacs", help="analyse studies in a DICOM archive over DICOMweb and store the results there")
    commands = pacs.add_subparsers(dest="pacs_command", required=True)
    p = commands.add_parser(
        "process", help="analyse the given studies, or every study of the filter not yet analysed by this model "
        "version; store the AI report (SR) and secondary captures in the study",
        epilog="Authentication comes from the environment: BONEAI_PACS_USER and BONEAI_PACS_PASSWORD (basic) or "
               "BONEAI_PACS_TOKEN (bearer); never from the command line, where other users could read it.")
    p.add_argument("--url", default=None, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web "
                   "(default: BONEAI_PACS_URL)")
    p.add_argument("--study", action="append", default=[], metavar="UID", help="a Study Instance UID (repeatable)")
    p.add_argument("--since", default=None, metavar="YYYYMMDD", help="only studies on or after this date")
    p.add_argument("--model", default=None, help="model name in weights/ or a model folder (default: the fracture "
                   "task's default in weights/defaults.json, as in the app and predict)")
    p.add_argument("--operating-point", default=None, help="sensitive, balanced or a number (default: the card's)")
    p.add_argument("--aggregation", choices=["mean", "max"], default="mean", help="study probability from the views")
    p.add_argument("--no-captures", action="store_true", help="store the SR only, no secondary captures")
    p.add_argument("--lock-dir", default=None, help="per-study lock files (default: BONEAI_PACS_LOCK_DIR or "
                   "the temporary directory); share it between machines that process the same archive")
    p.add_argument("--json", action="store_true", help="print one JSON object per study (JSON Lines)")


def pacs_command(args: Any) -> int:
    """Run ``pacs process``: one line per study; 1 if any study failed, else 0."""
    import json

    from boneai.inference import default_model_name, load_model
    from boneai.store import model_version

    environ = dict(os.environ)
    if args.url:  # the command line wins over BONEAI_PACS_URL
        environ["BONEAI_PACS_URL"] = args.url
    settings = settings_from({}, environ)
    if settings is None:
        raise ArchiveError("No archive given: pass --url or set BONEAI_PACS_URL.")
    predictor = load_model(args.model or default_model_name("fracture"))  # not the model named "fracture"
    op: str | float | None = args.operating_point
    if op is not None:
        try:
            op = float(op)
        except ValueError:
            predictor.threshold(op)  # an unknown name fails once, before any study
    client = ArchiveClient(settings)
    failed = False
    for result in process_archive(client, predictor, model_version=model_version(predictor.card),
                                  study_uids=args.study, since=args.since, operating_point=op,
                                  aggregation=args.aggregation, captures=not args.no_captures, lock_dir=args.lock_dir):
        failed |= not result.ok
        if args.json:
            print(json.dumps(result.to_json()), flush=True)
        elif not result.ok:
            print(f"{result.study_uid}: error: {result.error}", flush=True)
        else:
            what = (f"bone age {result.boneage_months:.1f} months" if result.boneage_months is not None else
                    f"probability {result.probability:.3f} -> {result.decision}" if result.probability is not None
                    else "no view in scope, no finding")
            done = "already analysed" if result.skipped else "stored"
            unlike = "; its views together are unlike the training images" if result.unfamiliar else ""
            print(f"{result.study_uid}: {what} ({done}: SR {result.sr_sop_uid}{unlike})", flush=True)
    return 1 if failed else 0
