"""Preprocessing inspector: every pipeline step side by side, parameters adjustable, ending with the
exact tensor the model sees."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import streamlit as st

from boneai.errors import BoneAIError
from boneai.preprocess import Stage, run_pipeline, step_defaults
from boneai.transforms import to_tensor
from ui.common import (
    SAMPLES_DIR,
    TASK_LABELS,
    intended_use_note,
    model_cards,
    plain,
    predictor_for,
    read_views,
    require_role,
    route_through_app,
    sample_table,
    selected_card,
)

route_through_app()
require_role("reviewer")  # any signed-in user; refuses when nobody may use the app

RESIZE_STEPS = ("resize_pad", "squash_resize")


ADJUSTABLE = ("otsu_crop", "clahe", "segment_foreground", "remove_background", "laplacian_sharpen")


def card_params(pipeline: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """For each adjustable step: its parameters in the card (defaults filled in), or None if absent."""
    steps = {s["step"]: dict(s.get("params") or {}) for s in pipeline}
    return {name: ({**step_defaults(name), **steps[name]} if name in steps else None) for name in ADJUSTABLE}


def build_pipeline(card_pipeline: list[dict[str, Any]], wanted: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The card's pipeline with adjustable steps switched on/off or re-parameterised, order kept.

    ``wanted`` maps a step name to its parameters, or to None to leave the step out. A step the card
    lacks goes where the trainer would put it: the crop right after ``standardise``, the others just
    before the final resize.
    """
    out: list[dict[str, Any]] = []
    for spec in card_pipeline:
        name = spec["step"]
        if name in wanted:
            if wanted[name] is not None:
                out.append({"step": name, "params": dict(wanted[name])})
        else:
            out.append({"step": name, "params": dict(spec.get("params") or {})})
    present = {s["step"] for s in out}
    if wanted.get("otsu_crop") is not None and "otsu_crop" not in present:
        at = 1 if out and out[0]["step"] == "standardise" else 0
        out.insert(at, {"step": "otsu_crop", "params": dict(wanted["otsu_crop"])})
    final = len(out) - 1 if out and out[-1]["step"] in RESIZE_STEPS else len(out)
    for name in ADJUSTABLE[1:]:
        if wanted.get(name) is not None and name not in present:
            out.insert(final, {"step": name, "params": dict(wanted[name])})
            final += 1
    return out


def comparable(pipeline: list[dict[str, Any]]) -> list[tuple[str, tuple]]:
    """A pipeline with default parameters filled in and display-only steps dropped, for comparison."""
    out = []
    for spec in pipeline:
        if spec["step"] == "segment_foreground":  # returns its input unchanged; an overlay only
            continue
        params = {**step_defaults(spec["step"]), **(spec.get("params") or {})}
        out.append((spec["step"], tuple(sorted((k, float(v) if isinstance(v, (int, float)) else v)
                                               for k, v in params.items()))))
    return out


def stage_picture(stage: Stage, previous: np.ndarray) -> np.ndarray:
    """What to draw for a stage: its image, or its overlay (segmentation) or box (Otsu crop) on the input."""
    extras = stage.result.extras
    if stage.step == "segment_foreground":
        return extras["overlay"]
    if stage.step == "otsu_crop" and extras.get("box"):
        canvas = cv2.cvtColor(previous if previous.ndim == 2 else previous[..., 0], cv2.COLOR_GRAY2RGB)
        cv2.polylines(canvas, [np.array(extras["box"], np.int32)], True, (255, 170, 0),
                      max(2, canvas.shape[0] // 150))
        return canvas
    return stage.result.image


def stage_caption(stage: Stage) -> str:
    extras = stage.result.extras
    notes = [f"{k}={v}" for k, v in stage.params.items()]
    if stage.step == "otsu_crop":
        notes.append(f"fallback: {extras['fallback']}" if extras.get("fallback") else "box drawn on the input")
    if "coverage" in extras:
        notes.append(f"mask covers {extras['coverage']:.0%}")
    h, w = stage.result.image.shape[:2]
    notes.append(f"{w}x{h}")
    return ", ".join(notes)


st.title("Preprocessing inspector")
intended_use_note()
st.write("Each step of the input pipeline, left to right, as the model's card defines it. "
         "Change a step to see its effect; the last row is what the model is fed.")

cards = [c for c in model_cards() if c.get("pipeline")]
if not cards:
    st.warning("No model is installed in weights/; the inspector needs a model card's pipeline.")
    st.stop()

top = st.columns([2, 2, 3])
with top[0]:
    default_card = selected_card("fracture") or cards[0]
    names = [c["name"] for c in cards]
    name = st.selectbox("Model", names, index=names.index(default_card["name"]), key="pre_model",
                        format_func=lambda n: f"{n} ({TASK_LABELS.get(next(c for c in cards if c['name'] == n)['task'], '')})")
    card = next(c for c in cards if c["name"] == name)
with top[1]:
    source = st.radio("Image", ["Sample", "Upload"], horizontal=True, key="pre_source")
with top[2]:
    if source == "Upload":
        # No type= filter (extensionless DICOM); boneai.io tells the format from the bytes.
        upload = st.file_uploader("One radiograph (PNG, JPEG or DICOM)", key="pre_upload")
        files = [(upload.name, upload.getvalue())] if upload is not None else []
    else:
        table = sample_table()
        options = table["file"].tolist()
        preferred = "boneage" if card["task"] == "boneage" else "frac"
        first = next((i for i, f in enumerate(options) if f.startswith(preferred)), 0)
        chosen = st.selectbox("Sample radiograph", options, index=first, key=f"pre_sample_{card['task']}")
        files = [(chosen.split("/")[-1], (SAMPLES_DIR / chosen).read_bytes())] if chosen else []

if not files:
    st.info("Choose a sample or upload a radiograph.")
    st.stop()
views = read_views(files)
if not views:
    st.stop()
view = views[0]

defaults = card_params(card["pipeline"])
st.subheader("Steps")
with st.container(border=True):
    c1, c2, c3, c4 = st.columns(4)
    # Widget keys include the model: switching model resets the controls to that card's pipeline.
    k = card["name"]
    crop_p = defaults["otsu_crop"] or step_defaults("otsu_crop")
    clahe_p = defaults["clahe"] or step_defaults("clahe")
    sharp_p = defaults["laplacian_sharpen"] or step_defaults("laplacian_sharpen")
    with c1:
        crop = st.toggle("Otsu crop to the film", value=defaults["otsu_crop"] is not None, key=f"pre_crop_{k}")
        margin = st.slider("Crop margin", 0.0, 0.2, float(crop_p["margin"]), 0.01, key=f"pre_margin_{k}",
                           disabled=not crop)
    with c2:
        use_clahe = st.toggle("CLAHE", value=defaults["clahe"] is not None, key=f"pre_clahe_{k}")
        clip = st.slider("CLAHE clip limit", 0.5, 8.0, float(clahe_p["clip_limit"]), 0.5, key=f"pre_clip_{k}",
                         disabled=not use_clahe)
        tile = st.slider("CLAHE tiles per side", 2, 16, int(clahe_p["tile_grid"]), 1, key=f"pre_tile_{k}",
                         disabled=not use_clahe)
    with c3:
        segment = st.toggle("Segmentation overlay", value=False, key=f"pre_segment_{k}",
                            help="Shows the bone/hand mask; the image itself is unchanged.")
        remove_bg = st.toggle("Remove background", value=defaults["remove_background"] is not None,
                              key=f"pre_rmbg_{k}")
    with c4:
        sharpen = st.toggle("Laplacian sharpening", value=defaults["laplacian_sharpen"] is not None,
                            key=f"pre_sharpen_{k}")
        strength = st.slider("Sharpening strength", 0.1, 3.0, float(sharp_p["strength"]), 0.1,
                             key=f"pre_strength_{k}", disabled=not sharpen)

wanted = {
    "otsu_crop": {**crop_p, "margin": margin} if crop else None,
    "clahe": {**clahe_p, "clip_limit": clip, "tile_grid": tile} if use_clahe else None,
    "segment_foreground": {} if segment else None,
    "remove_background": (defaults["remove_background"] or {}) if remove_bg else None,
    "laplacian_sharpen": {**sharp_p, "strength": strength} if sharpen else None,
}
pipeline = build_pipeline(card["pipeline"], wanted)
try:
    stages = run_pipeline(view.radiograph.pixels, pipeline)
except (BoneAIError, ValueError) as exc:
    st.error(plain(exc))
    st.stop()

per_row = 4
previous = view.radiograph.pixels
pictures = []
for stage in stages:
    pictures.append((stage, stage_picture(stage, previous)))
    previous = stage.result.image
for start in range(0, len(pictures), per_row):
    cols = st.columns(per_row)
    for col, (stage, picture) in zip(cols, pictures[start:start + per_row]):
        with col:
            st.markdown(f"**{stage.step.replace('_', ' ')}**")
            st.image(picture, width="stretch")
            st.caption(stage_caption(stage))

matches_card = comparable(pipeline) == comparable(card["pipeline"])
final = stages[-1].result.image
st.subheader("What the model sees")
if matches_card:
    st.success("These steps are the model card's pipeline: the tensor below is exactly the model's input.")
else:
    st.warning("These steps differ from the model card's pipeline. The model itself always uses its card's "
               "pipeline; the tensor below is what it would see with your steps.")
tensor = to_tensor(final, card["mean"], card["std"]).unsqueeze(0)
if matches_card:
    model_input = predictor_for(card).input_tensor(view.radiograph)
    if not np.array_equal(model_input.numpy(), tensor.numpy()):  # would mean the page and model disagree
        st.error("The inspector's tensor differs from the model's own input; please report this.")
t1, t2 = st.columns([1, 2])
with t1:
    st.image(final, width="stretch")
with t2:
    x = tensor.numpy()
    st.dataframe({
        "channel": ["R", "G", "B"],
        "min": [float(x[0, c].min()) for c in range(3)],
        "max": [float(x[0, c].max()) for c in range(3)],
        "mean": [float(x[0, c].mean()) for c in range(3)],
        "std": [float(x[0, c].std()) for c in range(3)],
    }, hide_index=True)
    st.text(f"tensor shape {tuple(tensor.shape)}  dtype {str(tensor.dtype).replace('torch.', '')}  "
            f"normalised with mean {card['mean']} and std {card['std']}")
with st.expander("Pipeline as data (model card format)"):
    st.json({"pipeline": pipeline, "model_card_pipeline": card["pipeline"]})
