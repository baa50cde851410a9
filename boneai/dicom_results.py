"""Results as DICOM objects, made with highdicom: the AI report, the secondary captures, the review.

**Why a TID 1500 Measurement Report in a Comprehensive SR.** TID 1500 ("Imaging Measurement Report")
is the template that the IHE AI Results (AIR) profile builds on and that viewers parse (OHIF shows its
measurement groups and draws their regions): each finding is a measurement group that references its
source image, holds numbers with units (the probability, the threshold, the bone age), coded evaluations
(finding present or absent) and the algorithm that made it (TID 4019: name, version, parameters). A
free-form Comprehensive SR content tree would carry the same numbers, but no viewer would know where to
find them. The document is a *Comprehensive* SR (not Comprehensive 3D): radiographs are projection
images without a frame of reference, so boxes are 2-D spatial coordinates (SCOORD, image pixels), which
Comprehensive SR holds.

Content of the AI report (:func:`ai_result_sr`), one measurement group each:

* ``study``: study probability, threshold, finding (present/absent) or the mean bone age; references
  every counted view. For a fracture study, "unlike the model's training images: present/absent" for its
  views in scope taken together (:func:`boneai.scope.set_familiarity`), as the Study review page says it.
* ``view N``: that view's probability, threshold and finding (or bone age) and its familiarity (0-1), or
  "within scope: absent" when the view was out of scope; references its image.
* ``view N box K``: a planar ROI (closed polyline on the referenced image, in its own pixels) with the
  box's score and the box operating point it passes, when the model gives boxes.

Every group names the algorithm (model name, version = weights hash, operating point, threshold,
aggregation) and carries "intended use: AI result - not for diagnosis"; the observer is a device.

The reviewer's decision (:func:`review_sr`) is a second Comprehensive SR that references the AI report
(a COMPOSITE content item, and the evidence sequence) and records the reviewer (person observer) and
agree / disagree / uncertain.

Codes: DCM and SNOMED CT where a standard code says exactly what is meant; a private coding scheme
(``99BONEAI``, the "99" prefix of PS3.16 for local codes) otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

__all__ = ["CODES", "AI_SR_SERIES_DESCRIPTION", "CAPTURE_SERIES_DESCRIPTION", "REVIEW_SR_SERIES_DESCRIPTION",
           "CAPTION", "MANUFACTURER", "ai_result_sr", "result_capture", "review_sr", "caption_image",
           "AIResult", "ViewResult", "ReviewResult", "read_ai_result", "read_review"]

MANUFACTURER = "BoneAI Review (research software)"
#: Series descriptions: how the archive's users (and :mod:`boneai.pacs`) tell our series apart.
AI_SR_SERIES_DESCRIPTION = "BoneAI AI result - not for diagnosis"
CAPTURE_SERIES_DESCRIPTION = "BoneAI AI capture - not for diagnosis"
REVIEW_SR_SERIES_DESCRIPTION = "BoneAI reviewer decision"
#: Burned into every secondary capture.
CAPTION = "AI result - not for diagnosis"
_PRIVATE = "99BONEAI"


def _codes() -> dict[str, Any]:
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    def private(value: str, meaning: str) -> CodedConcept:
        return CodedConcept(value, _PRIVATE, meaning)

    return {
        "probability": codes.DCM.Probability,
        "threshold": codes.DCM.ThresholdValue,
        "finding": codes.DCM.Finding,
        "present": codes.SCT.Present,
        "absent": codes.SCT.Absent,
        "fracture": CodedConcept("125605004", "SCT", "Fracture of bone"),
        "abnormal": CodedConcept("263654008", "SCT", "Abnormal"),
        "boneage_finding": private("BONEAGEFINDING", "Skeletal maturity"),
        "boneage": private("BONEAGE", "Bone age"),
        "within_scope": private("INSCOPE", "Within the model's scope"),
        "familiarity": private("FAMILIARITY", "Familiarity with the model's training images"),
        "unfamiliar": private("UNFAMILIAR", "Unlike the model's training images"),
        "box_operating_point": private("BOXOP", "Box operating point"),
        "balanced": private("BALANCED", "Balanced operating point"),
        "sensitive": private("SENSITIVE", "Sensitive operating point"),
        "intended_use": private("INTENDEDUSE", "Intended use"),
        "not_for_diagnosis": private("NOTFORDX", CAPTION),
        "procedure": codes.LN.XRUnspecifiedBodyRegion,
        "no_units": codes.UCUM.NoUnits,
        "month": codes.UCUM.Month,
        "review": private("REVIEW", "Reviewer assessment of AI result"),
        "ai_result": private("AIRESULT", "AI result reviewed"),
        "reviewer_decision": private("REVIEWDECISION", "Reviewer decision"),
        "agree": private("AGREE", "Agree with AI finding"),
        "disagree": private("DISAGREE", "Disagree with AI finding"),
        "uncertain": private("UNCERTAIN", "Uncertain about AI finding"),
    }


class _LazyCodes(dict):
    def __missing__(self, key: str) -> Any:
        if not dict.__len__(self):
            self.update(_codes())
            return self[key]
        raise KeyError(key)


#: The coded concepts used in our reports (highdicom/pydicom imported on first use).
CODES: dict[str, Any] = _LazyCodes()


# -- the AI report ---------------------------------------------------------------------------------------
def _algorithm(model_name: str, model_version: str, parameters: Sequence[str]) -> Any:
    from highdicom.sr import AlgorithmIdentification

    return AlgorithmIdentification(name=f"BoneAI {model_name}", version=model_version, parameters=list(parameters),
                                   manufacturer=MANUFACTURER)


def _finding_type(task: str) -> Any:
    return {"fracture": CODES["fracture"], "anomaly": CODES["abnormal"]}.get(task, CODES["boneage_finding"])


def _score_items(task: str, value: float | None, threshold: float | None, decision: bool | None,
                 boneage_months: float | None) -> tuple[list, list]:
    """(measurements, qualitative evaluations) of one view or of the study."""
    from highdicom.sr import Measurement, QualitativeEvaluation

    measurements, evaluations = [], []
    if task == "boneage":
        if boneage_months is not None:
            measurements.append(Measurement(CODES["boneage"], float(boneage_months), CODES["month"]))
    else:
        if value is not None:
            measurements.append(Measurement(CODES["probability"], float(value), CODES["no_units"]))
        if threshold is not None:
            measurements.append(Measurement(CODES["threshold"], float(threshold), CODES["no_units"]))
        if decision is not None:
            evaluations.append(QualitativeEvaluation(_finding_type(task),
                                                     CODES["present"] if decision else CODES["absent"]))
    evaluations.append(QualitativeEvaluation(CODES["intended_use"], CODES["not_for_diagnosis"]))
    return measurements, evaluations


def ai_result_sr(*, sources: Sequence[Any], predictions: Sequence[Any], in_scope: Sequence[bool], result: Any,
                 model_name: str, model_version: str, series_uid: str, sop_uid: str,
                 series_number: int = 9901, familiarities: Sequence[float | None] | None = None,
                 unfamiliar: bool | None = None) -> Any:
    """The AI report of one study (a highdicom ``ComprehensiveSR``; see the module docstring).

    Args:
        sources: the source images' headers (pydicom data sets, pixel data not needed), one per view.
        predictions: :class:`boneai.predictor.Prediction` per view (``extras["boxes"]`` in image pixels).
        in_scope: per view, whether it counted (out-of-scope views get no finding).
        result: the :class:`boneai.study.StudyResult`.
        model_name, model_version: the model card's name and version (weights hash).
        familiarities: per view, its familiarity (:class:`boneai.scope.ScopeResult`), recorded for counted
            views; None where there is none.
        unfamiliar: whether the counted views, taken together, are unlike the training images; None: not said.
    """
    import highdicom as hd
    from highdicom.sr import (
        DeviceObserverIdentifyingAttributes,
        ImageRegion,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        SourceImageForRegion,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    task = result.task
    params = [f"task={task}"]
    if task != "boneage":
        params += [f"operating_point={result.operating_point}", f"threshold={result.threshold:.6f}",
                   f"aggregation={result.aggregation}"]
    algorithm = _algorithm(model_name, model_version, params)
    groups: list[Any] = []

    def image_ref(ds: Any, cls: type) -> Any:
        return cls(referenced_sop_class_uid=ds.SOPClassUID, referenced_sop_instance_uid=ds.SOPInstanceUID)

    measurements, evaluations = _score_items(task, result.score, result.threshold, result.decision,
                                             result.boneage_months)
    if unfamiliar is not None:
        evaluations.insert(-1, QualitativeEvaluation(CODES["unfamiliar"], CODES["present" if unfamiliar else "absent"]))
    familiarities = list(familiarities) if familiarities is not None else [None] * len(sources)
    groups.append(MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="study"),
        finding_type=_finding_type(task), algorithm_id=algorithm, measurements=measurements or None,
        qualitative_evaluations=evaluations,
        source_images=[image_ref(sources[k], SourceImageForMeasurementGroup) for k in result.counted] or None))
    for n, (ds, pred, counted, fam) in enumerate(zip(sources, predictions, in_scope, familiarities, strict=True), 1):
        if counted:
            value = pred.probability if pred.probability is not None else pred.anomaly_score
            measurements, evaluations = _score_items(task, value, pred.threshold, pred.decision, pred.boneage_months)
            if fam is not None:
                measurements.append(Measurement(CODES["familiarity"], float(fam), CODES["no_units"]))
        else:
            measurements = []
            evaluations = [QualitativeEvaluation(CODES["within_scope"], CODES["absent"]),
                           QualitativeEvaluation(CODES["intended_use"], CODES["not_for_diagnosis"])]
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"view {n}"),
            finding_type=_finding_type(task), algorithm_id=algorithm, measurements=measurements or None,
            qualitative_evaluations=evaluations, source_images=[image_ref(ds, SourceImageForMeasurementGroup)]))
        for k, box in enumerate(pred.extras.get("boxes", []) if counted else [], 1):
            x0, y0, x1, y1 = (float(box[c]) for c in ("x0", "y0", "x1", "y1"))
            region = ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                                 graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]),
                                 source_image=image_ref(ds, SourceImageForRegion))
            point = box.get("operating_point")
            groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"view {n} box {k}"),
                referenced_region=region, finding_type=_finding_type(task), algorithm_id=algorithm,
                measurements=[Measurement(CODES["probability"], float(box["score"]), CODES["no_units"])],
                qualitative_evaluations=[QualitativeEvaluation(CODES["box_operating_point"], CODES[point])]
                if point in ("balanced", "sensitive") else None))
    device = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="BoneAI Review", manufacturer_name=MANUFACTURER,
            model_name=f"{model_name} {model_version}"))
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=device),
                               procedure_reported=CODES["procedure"], imaging_measurements=groups)
    sr = hd.sr.ComprehensiveSR(
        evidence=list(sources), content=report, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description=AI_SR_SERIES_DESCRIPTION)
    return sr


# -- secondary captures ----------------------------------------------------------------------------------
def caption_image(rgb: np.ndarray, caption: str = CAPTION) -> np.ndarray:
    """The image with a black band on top holding ``caption`` in white, sized to the image width."""
    img = np.asarray(rgb)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    h, w = img.shape[:2]
    scale = max(0.4, w / 900)
    thickness = max(1, int(round(scale * 2)))
    (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    if tw > w - 8:  # long caption on a narrow image: shrink to fit
        scale *= (w - 8) / tw
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    band = th + base + 12
    out = np.zeros((h + band, w, 3), np.uint8)
    out[band:] = img[:, :, :3]
    cv2.putText(out, caption, (6, band - base - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                cv2.LINE_AA)
    return out


def result_capture(source: Any, rgb: np.ndarray, *, series_uid: str, sop_uid: str, instance_number: int,
                   series_number: int = 9902) -> Any:
    """A Secondary Capture of one view: ``rgb`` (the radiograph with heatmap or boxes) with the caption
    burned in, in the source image's study (a highdicom ``SCImage``)."""
    import highdicom as hd

    pixels = caption_image(rgb)
    orientation = tuple(str(v) for v in (source.get("PatientOrientation") or ()))

    def make(patient_orientation: tuple[str, ...]) -> Any:
        return hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=series_number,
            sop_instance_uid=sop_uid, instance_number=instance_number, manufacturer=MANUFACTURER,
            patient_orientation=patient_orientation, transfer_syntax_uid="1.2.840.10008.1.2.1")

    try:
        sc = make(orientation)  # the source's orientation, when it states one
    except (TypeError, ValueError):
        # highdicom needs one to build the object; the source says none (or an odd one), so the
        # attribute is emptied afterwards (type 2: "unknown") rather than left invented.
        sc = make(("L", "F"))
        sc.PatientOrientation = ""
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = CAPTURE_SERIES_DESCRIPTION
    sc.ImageComments = CAPTION
    sc.DerivationDescription = f"{CAPTION}: BoneAI output burned into a copy of the radiograph"
    sc.Modality = "OT"
    from pydicom import Dataset

    item = Dataset()  # the image this capture was made from
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    sc.SourceImageSequence = [item]
    return sc


# -- the reviewer's decision ----------------------------------------------------------------------------
def review_sr(ai_sr: Any, *, reviewer: str, decision: str, series_uid: str, sop_uid: str,
              series_number: int = 9903) -> Any:
    """The reviewer's agree / disagree / uncertain on an AI report, as a Comprehensive SR referencing it."""
    import highdicom as hd
    from highdicom.sr import (
        CodeContentItem,
        CompositeContentItem,
        ContainerContentItem,
        ObserverContext,
        PersonObserverIdentifyingAttributes,
    )
    from pydicom.sr.codedict import codes

    if decision not in ("agree", "disagree", "uncertain"):
        raise ValueError(f"unknown reviewer decision {decision!r}")
    root = ContainerContentItem(name=CODES["review"], template_id=None)
    # A sign-in name or e-mail is one name component; the trailing caret says so (PS3.5 6.2.1.2).
    name = reviewer if "^" in reviewer else f"{reviewer}^"
    observer = ObserverContext(observer_type=codes.cid270.Person,
                               observer_identifying_attributes=PersonObserverIdentifyingAttributes(name=name))
    items = list(observer)
    items.append(CompositeContentItem(name=CODES["ai_result"], referenced_sop_class_uid=ai_sr.SOPClassUID,
                                      referenced_sop_instance_uid=ai_sr.SOPInstanceUID, relationship_type="CONTAINS"))
    items.append(CodeContentItem(name=CODES["reviewer_decision"], value=CODES[decision], relationship_type="CONTAINS"))
    root.ContentSequence = items
    return hd.sr.ComprehensiveSR(
        evidence=[ai_sr], content=root, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description=REVIEW_SR_SERIES_DESCRIPTION)


# -- reading them back ----------------------------------------------------------------------------------
@dataclass
class ViewResult:
    """One view's group of an AI report."""

    sop_instance_uid: str
    probability: float | None = None
    threshold: float | None = None
    present: bool | None = None
    boneage_months: float | None = None
    in_scope: bool = True
    familiarity: float | None = None
    boxes: list[dict[str, Any]] = field(default_factory=list)  # x0, y0, x1, y1, score, operating_point


@dataclass
class AIResult:
    """What :func:`read_ai_result` finds in one of our AI reports."""

    sop_instance_uid: str
    model_name: str
    model_version: str
    parameters: dict[str, str]
    probability: float | None
    threshold: float | None
    present: bool | None
    boneage_months: float | None
    study_sources: list[str]
    views: list[ViewResult]
    unfamiliar: bool | None = None  # the counted views together unlike the training images; None: not said

    @property
    def task(self) -> str:
        return self.parameters.get("task", "fracture")

    @property
    def finding(self) -> str | None:
        from boneai.study import finding_text

        return finding_text(self.task, self.present)


def _code_of(item: Any) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.CodeValue), str(concept.CodingSchemeDesignator)


def _key(code: Any) -> tuple[str, str]:
    """(value, scheme) of a pydicom/highdicom code or of a code sequence item."""
    if "CodeValue" in getattr(code, "keys", lambda: ())() or hasattr(code, "CodeValue"):
        return str(code.CodeValue), str(code.CodingSchemeDesignator)
    return str(code.value), str(code.scheme_designator)


def _walk(items: Any) -> list[Any]:
    out = []
    for item in items or []:
        out.append(item)
        out.extend(_walk(item.get("ContentSequence")))
    return out


def _group_fields(group: Any) -> dict[str, Any]:
    """Numbers, evaluations, algorithm and references of one measurement group (a content item)."""
    fields: dict[str, Any] = {"refs": [], "params": {}, "region": None}
    for item in _walk(group.get("ContentSequence")):
        kind = item.ValueType
        key = _code_of(item) if "ConceptNameCodeSequence" in item else None
        if kind == "NUM":
            value = float(item.MeasuredValueSequence[0].NumericValue)
            for name in ("probability", "threshold", "boneage", "familiarity"):
                if key == _key(CODES[name]):
                    fields.setdefault(name, value)
        elif kind == "CODE":
            value = _key(item.ConceptCodeSequence[0])
            fields.setdefault("codes", {})[key] = value
        elif kind == "TEXT" and key == ("111001", "DCM"):
            fields["algorithm"] = str(item.TextValue)
        elif kind == "TEXT" and key == ("111003", "DCM"):
            fields["version"] = str(item.TextValue)
        elif kind == "TEXT" and key == ("111002", "DCM"):
            name, _, value = str(item.TextValue).partition("=")
            fields["params"][name] = value
        elif kind == "IMAGE":
            fields["refs"].append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        elif kind == "SCOORD":
            fields["region"] = np.asarray(item.GraphicData, dtype=float).reshape(-1, 2)
    return fields


def _present(fields: dict[str, Any], concept: Any) -> bool | None:
    value = fields.get("codes", {}).get(_key(concept))
    if value is None:
        return None
    return value == _key(CODES["present"])


def read_ai_result(ds: Any) -> AIResult:
    """The study and per-view results of one of our AI reports (a pydicom data set).

    Raises:
        ValueError: the data set is not an AI report made by :func:`ai_result_sr`.
    """
    groups = [item for item in ds.get("ContentSequence", []) if item.ValueType == "CONTAINER"
              and _code_of(item) == ("126010", "DCM")]  # Imaging Measurements
    if not groups:
        raise ValueError("not a TID 1500 measurement report")
    study, views, boxes = None, {}, []
    model = version = None
    for container in groups:
        for group in container.get("ContentSequence", []):
            if group.ValueType != "CONTAINER":
                continue
            f = _group_fields(group)
            ident = next((str(i.TextValue) for i in group.get("ContentSequence", [])
                          if i.ValueType == "TEXT" and _code_of(i) == ("112039", "DCM")), "")
            model, version = f.get("algorithm", model), f.get("version", version)
            if ident == "study":
                study = f
            elif ident.startswith("view ") and " box " in ident and f["region"] is not None:
                boxes.append((ident.split(" box ")[0], f))
            elif ident.startswith("view "):
                views[ident] = f
    if study is None or model is None or not str(model).startswith("BoneAI "):
        raise ValueError("not a BoneAI AI report")
    task = study["params"].get("task", "fracture")
    finding = {"fracture": CODES["fracture"], "anomaly": CODES["abnormal"]}.get(task)
    view_results: dict[str, ViewResult] = {}
    for ident, f in views.items():
        scope = f.get("codes", {}).get(_key(CODES["within_scope"]))
        view_results[ident] = ViewResult(
            sop_instance_uid=f["refs"][0] if f["refs"] else "", probability=f.get("probability"),
            threshold=f.get("threshold"), present=_present(f, finding) if finding is not None else None,
            boneage_months=f.get("boneage"), in_scope=scope != _key(CODES["absent"]), familiarity=f.get("familiarity"))
    for ident, f in boxes:
        xy = f["region"]
        point = f.get("codes", {}).get(_key(CODES["box_operating_point"]))
        name = next((n for n in ("balanced", "sensitive") if point == _key(CODES[n])), None)
        if ident in view_results:
            view_results[ident].boxes.append({
                "x0": float(xy[:, 0].min()), "y0": float(xy[:, 1].min()), "x1": float(xy[:, 0].max()),
                "y1": float(xy[:, 1].max()), "score": f.get("probability"), "operating_point": name,
                "sop_instance_uid": f["refs"][0] if f["refs"] else None})
    order = sorted(view_results, key=lambda s: int(s.split()[1]))
    return AIResult(sop_instance_uid=str(ds.SOPInstanceUID), model_name=str(model)[len("BoneAI "):],
                    model_version=str(version), parameters=dict(study["params"]),
                    probability=study.get("probability"), threshold=study.get("threshold"),
                    present=_present(study, finding) if finding is not None else None,
                    boneage_months=study.get("boneage"), study_sources=list(study["refs"]),
                    views=[view_results[k] for k in order], unfamiliar=_present(study, CODES["unfamiliar"]))


@dataclass
class ReviewResult:
    """What :func:`read_review` finds in one of our reviewer reports."""

    sop_instance_uid: str
    reviewer: str
    decision: str
    ai_result_uid: str


def read_review(ds: Any) -> ReviewResult:
    """Reviewer, decision and the referenced AI report of one of our reviewer reports.

    Raises:
        ValueError: the data set is not a reviewer report made by :func:`review_sr`.
    """
    if "ConceptNameCodeSequence" not in ds or _code_of(ds) != _key(CODES["review"]):
        raise ValueError("not a BoneAI reviewer report")
    reviewer = decision = ai_uid = None
    for item in ds.get("ContentSequence", []):
        key = _code_of(item)
        if item.ValueType == "PNAME" and key == ("121008", "DCM"):  # Person Observer Name
            reviewer = str(item.PersonName).rstrip("^")
        elif item.ValueType == "COMPOSITE" and key == _key(CODES["ai_result"]):
            ai_uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif item.ValueType == "CODE" and key == _key(CODES["reviewer_decision"]):
            value = _key(item.ConceptCodeSequence[0])
            decision = next((d for d in ("agree", "disagree", "uncertain") if value == _key(CODES[d])), None)
    if decision is None or ai_uid is None:
        raise ValueError("reviewer report without a decision or without the AI report it reviews")
    return ReviewResult(str(ds.SOPInstanceUID), reviewer or "", decision, ai_uid)
