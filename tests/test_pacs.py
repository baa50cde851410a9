"""The archive over DICOMweb against a real Orthanc: QIDO/WADO/STOW, `pacs process`, the SR read back.

Orthanc comes from Debian (`make pacs-deps`); without it the archive tests skip with the reason. The
tests without an archive (settings, UIDs, the study rule, the caption) always run.
"""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _orthanc import running_orthanc  # noqa: E402

from boneai import cli  # noqa: E402
from boneai.dicom_results import (  # noqa: E402
    AI_SR_SERIES_DESCRIPTION,
    CAPTION,
    CAPTURE_SERIES_DESCRIPTION,
    ai_result_sr,
    caption_image,
    read_ai_result,
    read_review,
)
from boneai.inference import default_model_name  # noqa: E402
from boneai.io import read_radiograph  # noqa: E402
from boneai.pacs import (  # noqa: E402
    ArchiveClient,
    ArchiveError,
    ArchiveSettings,
    check_uid,
    process_study,
    record_review,
    settings_from,
)
from boneai.pacs_server import radiograph_dataset, sample_study_datasets  # noqa: E402
from boneai.predictor import Prediction  # noqa: E402
from boneai.study import review_record, study_result  # noqa: E402

JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


# -- without an archive ---------------------------------------------------------------------------------
def test_settings_come_from_the_secrets_section_and_the_environment_wins() -> None:
    section = {"url": "https://pacs.example.org/dicom-web/", "username": "svc", "password": "pw", "modalities": ["dx"]}
    s = settings_from(section, {})
    assert s is not None and s.url == "https://pacs.example.org/dicom-web" and s.modalities == ("DX",)
    env = {"BONEAI_PACS_URL": "http://127.0.0.1:8042/dicom-web", "BONEAI_PACS_MODALITIES": "CR, DX"}
    s = settings_from(section, env)
    assert s.url == "http://127.0.0.1:8042/dicom-web" and s.modalities == ("CR", "DX")
    assert "pw" not in repr(s)  # secrets never printed
    assert settings_from({}, {}) is None
    with pytest.raises(ArchiveError, match="both a user name and a password"):
        settings_from({"url": "http://x/dicom-web", "username": "svc"}, {})
    with pytest.raises(ArchiveError, match="http"):
        ArchiveSettings(url="ftp://x")


def test_only_dicom_uids_reach_a_lock_file_name() -> None:
    assert check_uid("1.2.840.10008.1") == "1.2.840.10008.1"
    for bad in ("../../etc/passwd", "1.2.x", "", "1." * 40 + "1"):
        with pytest.raises(ArchiveError):
            check_uid(bad)


def _pred(p: float, thr: float = 0.5) -> Prediction:
    return Prediction("fracture", "m", probability=p, threshold=thr, operating_point="balanced", decision=p >= thr)


def test_the_study_rule_counts_only_views_in_scope_and_the_record_logs_them() -> None:
    preds = [_pred(0.2), _pred(0.9), _pred(0.99)]
    mean = study_result(preds, counted=[0, 1], aggregation="mean")
    assert mean.score == pytest.approx(0.55) and mean.finding == "fracture" and mean.counted == (0, 1)
    assert study_result(preds, counted=[0], aggregation="max").finding == "no fracture"
    assert study_result(preds, counted=[], aggregation="mean").score is None
    record = review_record(study_label="S-1", view_labels=["v1", "v2", "v3"], predictions=preds, result=mean,
                           model_name="m", model_version="abc", reviewer_decision="agree", reviewer="local")
    assert record["view_probabilities"] == [0.2, 0.9, None]
    assert record["study_probability"] == pytest.approx(0.55) and record["model_decision"] == "fracture"


def test_the_caption_is_burned_in_above_the_image() -> None:
    gray = np.full((300, 400), 90, np.uint8)
    out = caption_image(gray)
    band = out.shape[0] - 300
    assert out.shape[1:] == (400, 3) and band > 10
    assert (out[band:] == 90).all()  # the image itself is untouched
    assert out[:band].max() == 255 and (out[:band] == 0).mean() > 0.5  # white text on black


# -- against Orthanc ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    yield from running_orthanc(tmp_path_factory.mktemp("orthanc"))


@pytest.fixture(scope="module")
def samples() -> list[pydicom.Dataset]:
    return sample_study_datasets()


@pytest.fixture(scope="module")
def archive(orthanc, samples) -> ArchiveClient:
    client = ArchiveClient(ArchiveSettings(url=orthanc.dicomweb_url))
    client.store(samples)
    return client


@pytest.fixture(scope="module")
def predictor():
    """The model `pacs process` uses without --model: the fracture task's default."""
    from boneai.inference import load_model

    return load_model(default_model_name("fracture"))


@pytest.fixture(scope="module")
def version(predictor) -> str:
    from boneai.store import model_version

    return model_version(predictor.card)


def _file_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _by_study(samples: list[pydicom.Dataset]) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for ds in samples:
        out.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    return out


def _familiarity(datasets: list[pydicom.Dataset]) -> list[float]:
    """The scope check's familiarity of the same DICOM files."""
    from boneai.scope import check_views

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = [read_radiograph(_file_bytes(ds), name="x") for ds in datasets]
    return [s.familiarity for s in check_views(images)]


def _expected(predictor, datasets: list[pydicom.Dataset]) -> list[float]:
    """What `predict` gives for the same DICOM files (the same read, the same model call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = [read_radiograph(_file_bytes(ds), name="x") for ds in datasets]
    return [p.probability for p in predictor.predict_many(images)]


def _run_cli(args: list[str], capsys) -> tuple[int, list[dict], str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


def test_search_lists_the_sample_studies_newest_first_with_their_views(archive, samples) -> None:
    studies = archive.search_studies()
    by_study = _by_study(samples)
    assert {s.study_uid for s in studies} == set(by_study)
    assert [s.date for s in studies] == sorted((s.date for s in studies), reverse=True)
    for s in studies:
        assert s.n_views == len(by_study[s.study_uid]) and s.modalities == ("DX",)
    assert len(archive.search_studies(since="20261129")) == 2  # the samples' dates count back one day each


def test_fetched_views_keep_uids_and_drop_patient_identifiers(archive, samples) -> None:
    study_uid, datasets = next((k, v) for k, v in _by_study(samples).items() if len(v) == 2)
    views, errors = archive.fetch_views(study_uid)
    assert errors == []
    assert [v.sop_instance_uid for v in views] == [str(d.SOPInstanceUID) for d in datasets]
    for view, ds in zip(views, datasets, strict=True):
        np.testing.assert_array_equal(view.radiograph.pixels, ds.pixel_array)
        text = json.dumps(view.radiograph.metadata, default=str)
        assert str(ds.PatientName) not in text and str(ds.PatientID) not in text and "ACC0" not in text


def test_pacs_process_stores_an_sr_with_predicts_probability_and_the_right_references(
        archive, orthanc, samples, predictor, capsys, tmp_path) -> None:
    by_study = _by_study(samples)
    study_uid, datasets = next((k, v) for k, v in by_study.items() if len(v) == 2)
    code, lines, err = _run_cli(["pacs", "process", "--url", orthanc.dicomweb_url, "--study", study_uid,
                                 "--no-captures", "--lock-dir", str(tmp_path), "--json"], capsys)
    assert code == 0, err
    [line] = lines
    assert set(line) >= {"study_uid", "ok", "probability", "decision", "sr_sop_uid", "error"}
    assert line["ok"] and line["study_uid"] == study_uid and not line["skipped"]
    assert line["unfamiliar"] is False  # FracAtlas sample views: not, together, unlike the training images
    for ds in datasets:  # nothing of the patient in what we print
        assert str(ds.PatientName) not in json.dumps(line) and str(ds.PatientID) not in json.dumps(line)

    per_view = _expected(predictor, datasets)
    assert line["probability"] == pytest.approx(np.mean(per_view), abs=1e-6)
    study = archive.study(study_uid)
    [series_uid] = study.ai_series
    assert series_uid not in study.image_series  # a new series in the same study
    [sr] = archive.retrieve_series(study_uid, series_uid)
    assert sr.StudyInstanceUID == study_uid and sr.SOPInstanceUID == line["sr_sop_uid"]
    assert sr.Modality == "SR" and sr.SeriesDescription == AI_SR_SERIES_DESCRIPTION

    result = read_ai_result(sr)
    assert result.model_name == predictor.name and result.probability == pytest.approx(np.mean(per_view), abs=1e-6)
    assert result.threshold == pytest.approx(predictor.threshold(None), abs=1e-9)
    assert result.parameters["operating_point"] == predictor.card.default_operating_point
    assert [v.sop_instance_uid for v in result.views] == [str(d.SOPInstanceUID) for d in datasets]
    assert [v.probability for v in result.views] == pytest.approx(per_view, abs=1e-6)
    assert result.study_sources == [str(d.SOPInstanceUID) for d in datasets]
    assert result.finding == line["decision"]
    # familiarity as the scope check gives it for the same files, and the study's verdict as printed
    assert result.unfamiliar is line["unfamiliar"] is False
    assert [v.familiarity for v in result.views] == pytest.approx(_familiarity(datasets), abs=1e-6)

    # highdicom reads it as a TID 1500 report: one group for the study, one per view, each naming the image.
    import highdicom as hd

    report = hd.sr.ComprehensiveSR.from_dataset(sr)
    groups = report.content.get_image_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == ["study", "view 1", "view 2"]
    evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == {str(d.SOPInstanceUID) for d in datasets}


def test_views_a_reviewer_showed_anyway_count_in_the_ai_report_made_at_review(
        archive, samples, predictor, version, monkeypatch) -> None:
    import dataclasses
    import hashlib

    from boneai import scope
    from boneai.pacs import analyse_study

    study_uid, datasets = next((k, v) for k, v in _by_study(samples).items() if len(v) == 2)
    study = archive.study(study_uid)
    real = scope.check_views

    def second_view_out(images, **kw):  # as if the scope check refused the second view
        return [r if k == 0 else dataclasses.replace(r, in_scope=False, reason="a test reason")
                for k, r in enumerate(real(images, **kw))]

    monkeypatch.setattr(scope, "check_views", second_view_out)
    stored: list = []
    monkeypatch.setattr(archive, "store", stored.extend)  # nothing reaches the shared archive
    views, _ = archive.fetch_views(study)
    page_digest = hashlib.sha256(views[1].data).hexdigest()[:16]  # how Study review names a view
    per_view = _expected(predictor, datasets)
    alone = analyse_study(archive, predictor, study, model_version=version, captures=False)
    shown = analyse_study(archive, predictor, study, model_version=version, captures=False,
                          show_anyway=[page_digest])
    assert alone.probability == pytest.approx(per_view[0], abs=1e-6)
    assert shown.probability == pytest.approx(np.mean(per_view), abs=1e-6)
    first, second = (read_ai_result(ds) for ds in stored)
    assert [v.in_scope for v in first.views] == [True, False]
    assert [v.in_scope for v in second.views] == [True, True]


def test_pacs_process_is_idempotent_and_processes_only_new_studies(archive, orthanc, samples, capsys,
                                                                   tmp_path) -> None:
    study_uid = next(k for k, v in _by_study(samples).items() if len(v) == 2)
    code, first, _ = _run_cli(["pacs", "process", "--url", orthanc.dicomweb_url, "--study", study_uid,
                               "--no-captures", "--lock-dir", str(tmp_path), "--json"], capsys)
    code2, second, _ = _run_cli(["pacs", "process", "--url", orthanc.dicomweb_url, "--study", study_uid,
                                 "--no-captures", "--lock-dir", str(tmp_path), "--json"], capsys)
    assert code == code2 == 0
    assert second[0]["skipped"] and second[0]["sr_sop_uid"] == first[0]["sr_sop_uid"]
    assert second[0]["probability"] == pytest.approx(first[0]["probability"], abs=1e-9)
    study = archive.study(study_uid)
    assert len(study.ai_series) == 1 and len(archive.retrieve_series(study_uid, study.ai_series[0])) == 1
    # without --model it used the task's default (weights/defaults.json), as the app and predict do
    [(report, _)] = archive.ai_results(study)
    assert report.model_name == default_model_name("fracture")


def test_two_processes_at_once_analyse_a_study_once(archive, samples, predictor, version, tmp_path) -> None:
    study_uid = sorted(_by_study(samples))[0]
    results = []

    def run() -> None:
        results.append(process_study(archive, predictor, study_uid, model_version=version, captures=False,
                                     lock_dir=tmp_path))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.ok for r in results), [r.error for r in results]
    assert sorted(r.skipped for r in results) == [False, True, True]
    assert len({r.sr_sop_uid for r in results}) == 1
    study = archive.study(study_uid)
    assert sum(len(archive.retrieve_series(study_uid, s)) for s in study.ai_series) == 1


def test_secondary_capture_has_the_caption_burned_in_and_points_at_its_image(archive, samples, predictor,
                                                                             version, tmp_path) -> None:
    study_uid, [source] = next((k, v) for k, v in sorted(_by_study(samples).items()) if len(v) == 1
                               and k != sorted(_by_study(samples))[0])
    result = process_study(archive, predictor, study_uid, model_version=version, captures=True, lock_dir=tmp_path)
    assert result.ok, result.error
    from dicomweb_client.api import DICOMwebClient  # the series list by description, as a viewer would

    rows = DICOMwebClient(archive.settings.url).search_for_series(
        study_instance_uid=study_uid, search_filters={"Modality": "OT"}, fields=["SeriesDescription"])
    [row] = rows
    assert row["0008103E"]["Value"][0] == CAPTURE_SERIES_DESCRIPTION
    captures = archive.retrieve_series(study_uid, row["0020000E"]["Value"][0])
    [sc] = captures
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.Columns == source.Columns and sc.Rows > source.Rows  # the caption band on top
    assert CAPTION in sc.ImageComments
    band = sc.pixel_array[: sc.Rows - source.Rows]
    assert band.max() == 255  # the caption's white text


def test_the_reviewer_sr_refers_to_the_ai_sr_and_sets_the_status(archive, samples, predictor, version,
                                                                 tmp_path) -> None:
    study_uid = next(k for k, v in _by_study(samples).items() if len(v) == 2)
    ai = process_study(archive, predictor, study_uid, model_version=version, captures=False, lock_dir=tmp_path)
    uid = record_review(archive, study_uid, ai.sr_sop_uid, reviewer="dr.reviewer@example.org", decision="disagree")
    study = archive.study(study_uid)
    [review_series] = study.review_series
    [ds] = archive.retrieve_series(study_uid, review_series)
    review = read_review(ds)
    assert (review.sop_instance_uid, review.decision, review.ai_result_uid) == (uid, "disagree", ai.sr_sop_uid)
    assert review.reviewer == "dr.reviewer@example.org"
    evidence = {str(i.ReferencedSOPInstanceUID) for s in ds.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == {ai.sr_sop_uid}
    status = archive.status(study, predictor.name, version)
    assert (status.state, status.decision, status.ai_sr_uid) == ("reviewed", "disagree", ai.sr_sop_uid)


@pytest.mark.parametrize("syntax", [JPEG_LOSSLESS, JPEG_2000_LOSSLESS], ids=["jpeg-lossless", "jpeg2000"])
def test_compressed_archive_syntaxes_end_to_end(archive, orthanc, samples, predictor, version, syntax,
                                                tmp_path) -> None:
    """JPEG 2000: stored compressed (pylibjpeg-openjpeg), fetched as stored. JPEG Lossless: stored plain and
    transcoded by Orthanc on WADO-RS. Lossless both ways, so predict's probability on the plain file holds."""
    source = next(v for v in _by_study(samples).values() if len(v) == 1)[0]
    import highdicom as hd

    ds = radiograph_dataset(source.pixel_array, study_uid=hd.UID(), series_uid=hd.UID(), sop_uid=hd.UID(),
                            instance=1, patient_id="SAMPLE-9999", patient_name="SAMPLE^COMPRESSED",
                            study_date="20250101", body_part="HAND")
    expected = _expected(predictor, [ds])[0]
    if syntax == JPEG_2000_LOSSLESS:
        ds.compress(JPEG_2000_LOSSLESS, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    archive.store([ds])
    client = ArchiveClient(ArchiveSettings(url=orthanc.dicomweb_url, transfer_syntax=syntax))
    views, errors = client.fetch_views(str(ds.StudyInstanceUID))
    assert errors == []
    [view] = views
    assert pydicom.dcmread(io.BytesIO(view.data)).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(view.radiograph.pixels, source.pixel_array)
    result = process_study(client, predictor, str(ds.StudyInstanceUID), model_version=version, captures=False,
                           lock_dir=tmp_path)
    assert result.ok, result.error
    assert result.probability == pytest.approx(expected, abs=1e-6)


def test_a_failed_study_is_a_json_line_and_exit_1_without_traceback(orthanc, archive, capsys, tmp_path) -> None:
    code, lines, err = _run_cli(["pacs", "process", "--url", orthanc.dicomweb_url, "--study", "1.2.3.4.5",
                                 "--study", "../etc", "--lock-dir", str(tmp_path), "--json"], capsys)
    assert code == 1 and "Traceback" not in err
    assert [line["ok"] for line in lines] == [False, False]
    assert "no study 1.2.3.4.5" in lines[0]["error"] and "not a DICOM UID" in lines[1]["error"]


def test_basic_authentication_is_sent_and_a_refusal_says_so(tmp_path) -> None:
    for server in running_orthanc(tmp_path / "auth", users={"boneai": "s3cret"}):
        with pytest.raises(ArchiveError, match="refused the credentials"):
            ArchiveClient(ArchiveSettings(url=server.dicomweb_url)).search_studies()
        with pytest.raises(ArchiveError, match="refused the credentials"):
            wrong = ArchiveSettings(url=server.dicomweb_url, username="boneai", password="wrong")
            ArchiveClient(wrong).search_studies()
        assert ArchiveClient(ArchiveSettings(url=server.dicomweb_url, username="boneai",
                                             password="s3cret")).search_studies() == []


def test_a_bearer_token_is_sent_and_a_gateway_refusal_says_so(orthanc, archive, samples) -> None:
    """Behind an OAuth gateway (here a small reverse proxy in front of Orthanc that accepts one bearer
    token, as a hospital's API gateway would) only the configured token gets through."""
    import http.server
    import urllib.error
    import urllib.request

    from boneai.pacs_server import free_port

    token = "t0ken-for-the-test"
    seen: list[str | None] = []

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != f"Bearer {token}":
                self.send_response(401)
                self.send_header("WWW-Authenticate", "Bearer")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            upstream = orthanc.dicomweb_url.rsplit("/dicom-web", 1)[0] + self.path
            request = urllib.request.Request(upstream, headers={"Accept": self.headers.get("Accept", "*/*")})
            try:
                with urllib.request.urlopen(request, timeout=30) as reply:
                    body, status, kind = reply.read(), reply.status, reply.headers.get("Content-Type", "")
            except urllib.error.HTTPError as exc:
                body, status, kind = exc.read(), exc.code, exc.headers.get("Content-Type", "")
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        with pytest.raises(ArchiveError, match="refused the credentials"):
            ArchiveClient(ArchiveSettings(url=url)).search_studies()
        with pytest.raises(ArchiveError, match="refused the credentials"):
            ArchiveClient(ArchiveSettings(url=url, token="wrong")).search_studies()
        studies = ArchiveClient(ArchiveSettings(url=url, token=token)).search_studies()
        assert {s.study_uid for s in studies} == {s.study_uid for s in archive.search_studies()}
        assert seen[:2] == [None, "Bearer wrong"] and seen[-1] == f"Bearer {token}"
    finally:
        server.shutdown()
        server.server_close()


def test_bone_age_and_boxes_are_in_the_report_and_read_back() -> None:
    """Without an archive: the SR holds each box as a SCOORD polyline on its own image (in that image's
    pixels) and, in bone-age mode, the months per view and for the study."""
    import highdicom as hd

    from boneai.dicom_results import ai_result_sr

    headers = [radiograph_dataset(np.zeros((80, 100), np.uint8), study_uid="1.2.3", series_uid="1.2.3.1",
                                  sop_uid=f"1.2.3.1.{k}", instance=k, patient_id="P", patient_name="A^B",
                                  study_date="20260101", body_part="HAND") for k in (1, 2)]
    boxes = [{"x0": 10.5, "y0": 20.0, "x1": 40.25, "y1": 60.0, "score": 0.8123, "operating_point": "balanced"},
             {"x0": 1.0, "y0": 2.0, "x1": 3.0, "y1": 4.0, "score": 0.31, "operating_point": "sensitive"}]
    preds = [Prediction("fracture", "loc", probability=0.9, threshold=0.4, operating_point="balanced", decision=True,
                        extras={"boxes": boxes}),
             Prediction("fracture", "loc", probability=0.1, threshold=0.4, operating_point="balanced", decision=False,
                        extras={"boxes": []})]
    sr = ai_result_sr(sources=headers, predictions=preds, in_scope=[True, True], result=study_result(preds, [0, 1]),
                      model_name="loc", model_version="abc123", series_uid=hd.UID(), sop_uid=hd.UID(),
                      familiarities=[0.031, 0.42], unfamiliar=True)
    back = read_ai_result(sr)
    assert back.unfamiliar is True  # the study's views together are unlike the training images
    assert [v.familiarity for v in back.views] == pytest.approx([0.031, 0.42])
    assert [b["operating_point"] for b in back.views[0].boxes] == ["balanced", "sensitive"]
    for got, want in zip(back.views[0].boxes, boxes, strict=True):
        assert [got[k] for k in ("x0", "y0", "x1", "y1")] == pytest.approx([want[k] for k in ("x0", "y0", "x1", "y1")])
        assert got["score"] == pytest.approx(want["score"]) and got["sop_instance_uid"] == "1.2.3.1.1"
    assert back.views[1].boxes == [] and back.present is True and back.probability == pytest.approx(0.5)

    ages = [Prediction("boneage", "boneage", boneage_months=m) for m in (120.0, 130.0)]
    sr = ai_result_sr(sources=headers, predictions=ages, in_scope=[True, False], result=study_result(ages, [0]),
                      model_name="boneage", model_version="v1", series_uid=hd.UID(), sop_uid=hd.UID())
    back = read_ai_result(sr)
    assert back.unfamiliar is None and back.views[0].familiarity is None  # not said: nothing recorded
    assert back.task == "boneage" and back.boneage_months == pytest.approx(120.0) and back.probability is None
    assert back.views[0].boneage_months == pytest.approx(120.0)
    assert back.views[1].in_scope is False and back.views[1].boneage_months is None


def test_localiser_boxes_reach_the_sr_in_the_original_pixels(archive, samples, tmp_path) -> None:
    from boneai.inference import load_model
    from boneai.store import model_version

    localiser = load_model("fracture_localiser")
    by_study = _by_study(samples)
    study_uid, datasets = next((k, v) for k, v in by_study.items() if len(v) == 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = [read_radiograph(_file_bytes(ds), name="x") for ds in datasets]
    predicted = localiser.predict_many(images)
    assert any(p.extras["boxes"] for p in predicted), "the sample study should give at least one box"
    result = process_study(archive, localiser, study_uid, model_version=model_version(localiser.card),
                           captures=False, lock_dir=tmp_path)
    assert result.ok, result.error
    [(ai, _)] = [(r, ds) for r, ds in archive.ai_results(archive.study(study_uid)) if r.model_name == localiser.name]
    for view, pred, ds in zip(ai.views, predicted, datasets, strict=True):
        assert view.probability == pytest.approx(pred.probability, abs=1e-6)
        assert len(view.boxes) == len(pred.extras["boxes"])
        for got, want in zip(view.boxes, pred.extras["boxes"], strict=True):
            corners = ("x0", "y0", "x1", "y1")
            assert [got[k] for k in corners] == pytest.approx([want[k] for k in corners])
            assert got["sop_instance_uid"] == ds.SOPInstanceUID and got["operating_point"] == want["operating_point"]


def test_two_pacs_process_commands_at_once_store_one_report(archive, orthanc, samples, tmp_path) -> None:
    import os
    import subprocess

    singles = sorted(k for k, v in _by_study(samples).items() if len(v) == 1)
    study_uid = singles[-1]
    cmd = [sys.executable, "-m", "boneai", "pacs", "process", "--url", orthanc.dicomweb_url, "--study", study_uid,
           "--no-captures", "--lock-dir", str(tmp_path), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=Path(__file__).resolve().parents[1]) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    lines = [json.loads(out) for out, _ in outputs]
    assert sorted(line["skipped"] for line in lines) == [False, True]
    assert lines[0]["sr_sop_uid"] == lines[1]["sr_sop_uid"]
    study = archive.study(study_uid)
    assert sum(len(archive.retrieve_series(study_uid, s)) for s in study.ai_series) == 1


def test_worklist_page_lists_the_archive_and_opens_a_study_on_study_review(archive, orthanc, samples,
                                                                           monkeypatch) -> None:
    """The pages without a browser (AppTest): the Worklist's rows, newest first, and "Open"."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("BONEAI_PACS_URL", orthanc.dicomweb_url)
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=300).run()
    at.switch_page("pages/worklist.py").run()
    assert not at.exception and at.title[0].value == "Worklist"
    dates = [t.value for t in at.text if re.fullmatch(r"\d{4}-\d{2}-\d{2}", t.value)]
    assert len(dates) == len(archive.search_studies()) and dates == sorted(dates, reverse=True)
    assert not any("SAMPLE" in t.value for t in at.text)
    [b for b in at.button if b.label == "Open"][0].click().run()
    assert not at.exception and at.title[0].value == "Study review"
    assert at.radio(key="review_source").value == "Archive study"
    newest = archive.search_studies()[0]
    assert len([m for m in at.metric if m.label == "Probability"]) == newest.n_views


def test_worklist_page_says_how_to_configure_an_archive(monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv("BONEAI_PACS_URL", raising=False)
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=120).run()
    at.switch_page("pages/worklist.py").run()
    assert not at.exception and "No archive is configured" in at.info[0].value


def test_an_unreadable_instance_is_named_and_the_other_views_still_come(archive) -> None:
    import highdicom as hd

    study, series = hd.UID(), hd.UID()
    good = radiograph_dataset(np.tile(np.arange(200, dtype=np.uint8), (120, 1)), study_uid=study, series_uid=series,
                              sop_uid=hd.UID(), instance=1, patient_id="P-1", patient_name="SMALL^IMAGE",
                              study_date="20240101", body_part="HAND")
    tiny = radiograph_dataset(np.zeros((32, 32), np.uint8), study_uid=study, series_uid=series, sop_uid=hd.UID(),
                              instance=2, patient_id="P-1", patient_name="SMALL^IMAGE", study_date="20240101",
                              body_part="HAND")
    archive.store([good, tiny])
    views, errors = archive.fetch_views(str(study))
    assert [v.sop_instance_uid for v in views] == [good.SOPInstanceUID]
    [message] = errors
    assert "too small" in message and "instance" in message and "SMALL" not in message


def test_the_worklist_says_when_the_ai_report_found_the_views_unlike_the_training_images(archive, orthanc,
                                                                                        monkeypatch) -> None:
    """A study whose AI report (of the selected model and version) says its views, together, are unlike the
    training images: the status carries it and the Worklist's finding says so; the other studies' do not."""
    import highdicom as hd
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from boneai.inference import load_model
    from boneai.store import model_version

    model = load_model(default_model_name("fracture"))
    study, series = hd.UID(), hd.UID()
    views = [radiograph_dataset(np.tile(np.arange(200, dtype=np.uint8), (150, 1)), study_uid=study,
                                series_uid=series, sop_uid=hd.UID(), instance=k, patient_id="P-2",
                                patient_name="OTHER^SOURCE", study_date="20991231", body_part="WRIST")
             for k in (1, 2)]
    preds = [Prediction("fracture", model.name, probability=p, threshold=0.4, operating_point="balanced",
                        decision=p >= 0.4) for p in (0.7, 0.2)]
    sr = ai_result_sr(sources=views, predictions=preds, in_scope=[True, True], result=study_result(preds, [0, 1]),
                      model_name=model.name, model_version=model_version(model.card), series_uid=hd.UID(),
                      sop_uid=hd.UID(), familiarities=[0.01, 0.03], unfamiliar=True)
    archive.store([*views, sr])
    status = archive.status(archive.study(str(study)), model.name, model_version(model.card))
    assert status.state == "analysed" and status.unfamiliar is True

    monkeypatch.setenv("BONEAI_PACS_URL", orthanc.dicomweb_url)
    st.cache_data.clear()  # the Worklist keeps the archive's rows 30 s; an earlier test may have read them
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=300).run()
    at.switch_page("pages/worklist.py").run()
    assert not at.exception
    findings = [t.value for t in at.text if t.value.startswith(("fracture (", "no fracture (", "no finding"))]
    flagged = [f for f in findings if f.endswith("; views unlike the training images")]
    assert flagged == ["fracture (0.450); views unlike the training images"]  # the newest study: ours (2099)
