"""Dataset readers and deterministic splits.

Every reader returns a :class:`pandas.DataFrame` with one row per image (or per study for MURA)
and at least the columns ``path`` and ``label`` (``boneage_months`` for bone age).

Example:
    >>> from boneai.data import read_fracatlas, split_train_val
    >>> df = read_fracatlas("../shared/data/fracatlas")        # doctest: +SKIP
    >>> train, val = split_train_val(df, val_fraction=0.2)      # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from boneai.errors import BoneAIError, DatasetError

__all__ = [
    "IMAGE_SUFFIXES",
    "REGIONS",
    "is_image_file",
    "image_files",
    "folder_label",
    "is_image_name",
    "has_dicom_marker",
    "read_fracatlas",
    "read_image_folder",
    "read_boneage",
    "read_mura",
    "read_classification_dir",
    "fracture_boxes",
    "split_train_val",
    "image_fingerprints",
    "near_duplicate_groups",
    "protocol_split",
    "read_split_file",
    "write_protocol_split",
    "DUPLICATE_MAX_BITS",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"}
#: A DICOM Part 10 file has this marker after its 128-byte preamble.
DICOM_MARKER, DICOM_MARKER_OFFSET = b"DICM", 128
REGIONS = ("hand", "leg", "hip", "shoulder", "mixed")

#: Class-folder names understood by :func:`read_image_folder`, lower-cased, with their label.
_FOLDER_LABELS = {
    "fractured": 1, "fracture": 1, "fractures": 1, "positive": 1, "abnormal": 1, "1": 1, "yes": 1,
    "not_fractured": 0, "non_fractured": 0, "nonfractured": 0, "no_fracture": 0, "no_fractures": 0,
    "negative": 0, "normal": 0, "0": 0, "no": 0,
}


def folder_label(name: str) -> int | None:
    """The label a class folder's name gives ("Not fractured", "non-fractured", "positive"), or None."""
    return _FOLDER_LABELS.get("_".join(name.lower().replace("-", " ").replace("_", " ").split()))


def has_dicom_marker(head: bytes) -> bool:
    """Whether a file's first bytes are those of a DICOM Part 10 file."""
    return head[DICOM_MARKER_OFFSET:DICOM_MARKER_OFFSET + len(DICOM_MARKER)] == DICOM_MARKER


def is_image_name(name: str) -> bool | None:
    """True for an image or DICOM suffix, False for a name to skip, None when only the bytes can tell.

    Skipped: hidden files (``.DS_Store``, and the ``._IMG1.jpg`` resource forks a Mac leaves on USB
    sticks and in zips, which have an image suffix but no image) and ``DICOMDIR``, the index of a DICOM
    medium. A name with another suffix or none may still be a DICOM file: PACS exports and DICOM media
    name them ``IM00001`` or after their UID (``1.2.840.113619.2.55.3.320``).
    """
    base = _base_name(name)
    if not base or base.startswith(".") or base.upper() == "DICOMDIR":
        return False
    if Path(base).suffix.lower() in IMAGE_SUFFIXES:
        return True
    return None


def is_image_file(path: str | Path) -> bool:
    """Whether a folder reader takes this file: an image suffix, or DICOM bytes under any name."""
    p = Path(path)
    known = is_image_name(p.name)
    if known is not None:
        return known and p.is_file()
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as fh:
            return has_dicom_marker(fh.read(DICOM_MARKER_OFFSET + len(DICOM_MARKER)))
    except OSError:
        return False


def image_files(folder: str | Path) -> list[Path]:
    """The image and DICOM files under ``folder``, recursively and sorted; hidden folders are skipped."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*")
                  if is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _require_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise DatasetError(f"Data folder does not exist: {p}.")
    return p


def read_fracatlas(root: str | Path) -> pd.DataFrame:
    """Read the FracAtlas layout: ``dataset.csv`` + ``images/Fractured|Non_fractured/*.jpg``.

    The folder is the label of record (the csv's ``fractured`` column disagrees for a few images).
    Columns: path, image_id, label, region, hardware, multiscan, view, group.
    """
    root = _require_dir(root)
    csv = root / "dataset.csv"
    if not csv.is_file():
        raise DatasetError(f"FracAtlas folder has no dataset.csv: {root}.")
    meta = pd.read_csv(csv)
    folders = {"Fractured": 1, "Non_fractured": 0}
    rows = []
    for folder, label in folders.items():
        for p in sorted((root / "images" / folder).glob("*")):
            if is_image_file(p):
                rows.append({"path": str(p), "image_id": p.name, "label": label})
    if not rows:
        raise DatasetError(f"FracAtlas folder has no images under images/Fractured or images/Non_fractured: {root}.")
    df = pd.DataFrame(rows).merge(meta, on="image_id", how="left")
    region_cols = [c for c in REGIONS if c in df.columns]
    if region_cols:
        onehot = df[region_cols].fillna(0).to_numpy()
        df["region"] = np.where(onehot.sum(axis=1) > 0, np.array(region_cols)[onehot.argmax(axis=1)], "unknown")
    else:
        df["region"] = "unknown"
    views = []
    for _, r in df.iterrows():
        names = [v for v in ("frontal", "lateral", "oblique") if r.get(v, 0) == 1]
        views.append("+".join(names) if names else "unknown")
    df["view"] = views
    for col in ("hardware", "multiscan"):
        df[col] = df[col].fillna(0).astype(int) if col in df.columns else 0
    # FracAtlas has no patient ids; each image is its own group.
    df["group"] = df["image_id"]
    keep = ["path", "image_id", "label", "region", "view", "hardware", "multiscan", "group"]
    return df[keep].reset_index(drop=True)


def fracture_boxes(root: str | Path) -> dict[str, list[list[float]]]:
    """Fracture boxes ``[x, y, w, h]`` keyed by file name, from the COCO json.

    Boxes are in the pixels of the image file as stored under ``root/images/*/``. The COCO file
    gives them in the original resolution; the large originals in our copy were reduced (2304x2880
    to 819x1024), so their boxes are scaled by the ratio of the file's size to the COCO size.
    When the file is not found the COCO coordinates are returned unchanged.
    """
    root = Path(root)
    path = root / "fracture_masks_coco.json"
    if not path.is_file():
        return {}
    coco = json.loads(path.read_text())
    images = {img["id"]: img for img in coco.get("images", [])}
    scales: dict[Any, tuple[float, float]] = {}
    boxes: dict[str, list[list[float]]] = {}
    for ann in coco.get("annotations", []):
        img = images.get(ann.get("image_id"))
        if not img or not img.get("file_name") or not ann.get("bbox"):
            continue
        if img["id"] not in scales:
            scales[img["id"]] = _coco_scale(root, img)
        sx, sy = scales[img["id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes.setdefault(_base_name(img["file_name"]), []).append([x * sx, y * sy, w * sx, h * sy])
    return boxes


def _base_name(file_name: str) -> str:
    """A COCO ``file_name`` as the image file's own name ("images/Fractured/a.jpg", "a.jpg": "a.jpg")."""
    return str(file_name).replace("\\", "/").rsplit("/", 1)[-1]


def _coco_scale(root: Path, img: dict[str, Any]) -> tuple[float, float]:
    """(x, y) factors from a COCO image entry's width/height to the stored file's size."""
    from PIL import Image

    width, height = img.get("width"), img.get("height")
    if not width or not height:
        return 1.0, 1.0
    for candidate in sorted((root / "images").glob(f"*/{_base_name(img['file_name'])}")):
        try:
            with Image.open(candidate) as im:  # reads the header only
                return im.width / float(width), im.height / float(height)
        except OSError:
            continue
    return 1.0, 1.0


def read_image_folder(root: str | Path) -> pd.DataFrame:
    """Read ``root/<class>/**/*`` with class folders such as fractured/not_fractured, positive/negative.

    Columns: path, image_id, label, region ("unknown"), group (the file's relative path).
    """
    root = _require_dir(root)
    rows = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = folder_label(sub.name)
        if label is None:
            continue
        for p in image_files(sub):
            rows.append({"path": str(p), "image_id": p.name, "label": label,
                         "region": "unknown", "group": str(p.relative_to(root))})
    if not rows:
        known = "fractured/not_fractured, Fractured/Non_fractured, positive/negative, abnormal/normal"
        raise DatasetError(f"No class subfolders with images found in {root} (expected e.g. {known}).")
    return pd.DataFrame(rows)


def read_boneage(root: str | Path) -> pd.DataFrame:
    """Read the RSNA bone-age layout: ``boneage.csv`` (id, boneage, male) + ``images/<id>.png``.

    Columns: path, id, boneage_months, male (bool), group.
    """
    root = _require_dir(root)
    csv = root / "boneage.csv"
    if not csv.is_file():
        raise DatasetError(f"Bone-age folder has no boneage.csv: {root}.")
    meta = pd.read_csv(csv)
    missing = {"id", "boneage", "male"} - set(meta.columns)
    if missing:
        raise DatasetError(f"boneage.csv lacks the columns {sorted(missing)}: {csv}.")
    meta["path"] = [str(root / "images" / f"{i}.png") for i in meta["id"]]
    meta = meta[[Path(p).is_file() for p in meta["path"]]]
    if meta.empty:
        raise DatasetError(f"None of the images listed in boneage.csv exist under {root / 'images'}.")
    male = meta["male"].astype(str).str.lower().isin(["true", "1", "m", "male"])
    return pd.DataFrame({
        "path": meta["path"].to_numpy(),
        "id": meta["id"].to_numpy(),
        "boneage_months": meta["boneage"].astype(float).to_numpy(),
        "male": male.to_numpy(),
        "group": meta["id"].astype(str).to_numpy(),
    })


_MURA_STUDY = re.compile(r"^(study\d+)_(positive|negative)$", re.IGNORECASE)


def read_mura(root: str | Path) -> pd.DataFrame:
    """Read the MURA study layout ``[XR_REGION/]patientXXXXX/studyN_positive|negative/image*.png``.

    One row per study: study (relative folder), patient, region, label, views (list of paths), group.
    """
    root = _require_dir(root)
    rows = []
    for study_dir in sorted(p for p in root.rglob("*") if p.is_dir() and _MURA_STUDY.match(p.name)):
        views = sorted(str(p) for p in study_dir.iterdir() if is_image_file(p))
        if not views:
            continue
        patient = study_dir.parent.name
        region_dir = study_dir.parent.parent.name
        region = region_dir[3:].lower() if region_dir.upper().startswith("XR_") else "unknown"
        label = 1 if _MURA_STUDY.match(study_dir.name).group(2).lower() == "positive" else 0
        rows.append({"study": str(study_dir.relative_to(root)), "patient": patient, "region": region,
                     "label": label, "views": views, "group": patient})
    if not rows:
        raise DatasetError(f"No MURA-style studies (patient*/studyN_positive|negative/) found in {root}.")
    return pd.DataFrame(rows)


def read_classification_dir(root: str | Path) -> pd.DataFrame:
    """FracAtlas layout when ``dataset.csv`` is present, otherwise a class-folder layout."""
    root = _require_dir(root)
    if (root / "dataset.csv").is_file() and (root / "images").is_dir():
        return read_fracatlas(root)
    return read_image_folder(root)


def split_train_val(
    df: pd.DataFrame,
    val_fraction: float = 0.2,
    seed: int = 0,
    stratify: str | None = "label",
    group: str | None = "group",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic stratified split, grouped so one patient/study never spans both sides.

    Stratification uses ``stratify`` (for regression, pass a binned column). Groups are assigned
    whole: within each stratum, groups are shuffled with ``seed`` and taken until the stratum's
    validation share is reached.
    """
    if not 0 < val_fraction < 1:
        raise ValueError("val_fraction must be between 0 and 1")
    rng = np.random.default_rng(seed)
    groups = df[group] if group and group in df.columns else pd.Series(np.arange(len(df)), index=df.index)
    strata = df[stratify] if stratify and stratify in df.columns else pd.Series(0, index=df.index)
    # A group's stratum is its most common one, so mixed groups stay whole.
    group_stratum = strata.groupby(groups).agg(lambda s: s.value_counts().index[0])
    val_groups: set[Any] = set()
    for _, members in group_stratum.groupby(group_stratum):
        names = members.index.to_numpy()
        names = names[rng.permutation(len(names))]
        sizes = groups.value_counts().reindex(names).to_numpy()
        target = val_fraction * sizes.sum()
        taken = np.cumsum(sizes) <= max(target, sizes[0])
        val_groups.update(names[taken].tolist())
    is_val = groups.isin(val_groups).to_numpy()
    return df[~is_val].reset_index(drop=True), df[is_val].reset_index(drop=True)


#: Near-duplicate threshold for :func:`near_duplicate_groups`: two images whose 256-bit difference
#: hashes differ in at most this many bits are one group. Measured on FracAtlas (3,469 images): 188
#: pairs lie within 20 bits, then the count jumps (2,001 pairs within 30). At 20 bits the largest group
#: has 6 images; at 24 bits chaining already builds a group of 37 unrelated views (docs/localisation.md).
DUPLICATE_MAX_BITS = 20


def image_fingerprints(paths: list[str], hash_size: int = 16, errors: dict[int, str] | None = None) -> np.ndarray:
    """Difference hash (dHash) of each image: ``hash_size``**2 bits as a bool array (n, bits).

    The image is standardised to grey, Otsu-cropped to the radiograph and shrunk to
    (hash_size + 1) x hash_size; each bit says whether a pixel is brighter than its right neighbour.
    Robust to scale, compression and small contrast changes, which is what near-duplicate views need.
    With ``errors``, a file that cannot be read leaves its row all zero and its message under its
    index there, instead of raising.
    """
    import warnings

    import cv2

    from boneai.io import read_radiograph
    from boneai.preprocess import otsu_crop, standardise

    out = np.zeros((len(paths), hash_size * hash_size), dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncated FracAtlas JPEGs
        for i, path in enumerate(paths):
            try:
                img = otsu_crop(standardise(read_radiograph(path).pixels).image).image
            except BoneAIError as exc:
                if errors is None:
                    raise
                errors[i] = str(exc)
                continue
            small = cv2.resize(img, (hash_size + 1, hash_size), interpolation=cv2.INTER_AREA).astype(np.int16)
            out[i] = (small[:, 1:] > small[:, :-1]).ravel()
    return out


def near_duplicate_groups(fingerprints: np.ndarray, max_bits: int = DUPLICATE_MAX_BITS) -> np.ndarray:
    """Group index per image: connected components of the "at most ``max_bits`` apart" graph."""
    bits = np.asarray(fingerprints, dtype=np.float32)
    dist = bits @ (1 - bits).T + (1 - bits) @ bits.T
    n = len(bits)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(dist <= max_bits, k=1))):
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)])


def protocol_split(df: pd.DataFrame, groups: np.ndarray, legacy_val: set[str], test_share: float = 0.5,
                   seed: int = 0) -> pd.Series:
    """Assign each image to ``train``, ``val`` or ``test``, keeping near-duplicate groups whole.

    ``legacy_val`` holds the image ids of the earlier 80/20 validation split, which no shipped model
    trained on. Test groups are drawn (stratified by label, seeded) only among groups that lie wholly
    inside it, so no model that trained on the earlier split has seen a test image or its near-duplicate.
    The rest of that earlier split is the new validation split; everything else is training.
    """
    frame = pd.DataFrame({"image_id": df["image_id"].to_numpy(), "label": df["label"].to_numpy(),
                          "group": np.asarray(groups)})
    in_val = frame["image_id"].isin(legacy_val)
    clean = frame.groupby("group")["image_id"].transform(lambda ids: ids.isin(legacy_val).all())
    candidates = frame[in_val & clean]
    _, test = split_train_val(candidates, val_fraction=test_share, seed=seed)
    split = pd.Series("train", index=frame.index)
    split[in_val.to_numpy()] = "val"
    split[frame["image_id"].isin(set(test["image_id"])).to_numpy()] = "test"
    return split


def read_split_file(path: str | Path) -> pd.DataFrame:
    """Read a committed split file (``image_id, group, split``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Split file not found: {path}.")
    split = pd.read_csv(path)
    missing = {"image_id", "split"} - set(split.columns)
    if missing:
        raise DatasetError(f"Split file {path} lacks the columns {sorted(missing)}.")
    return split


def write_protocol_split(root: str | Path, out: str | Path, max_bits: int | None = None, test_share: float = 0.5,
                         legacy_val_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """Compute the grouped train/val/test split of a FracAtlas folder and write it as a csv.

    The earlier validation split is ``split_train_val(df, legacy_val_fraction, seed)``, on which the
    shipped classifiers were validated (and never trained). Returns a summary of the split.
    """
    df = read_fracatlas(root)
    _, legacy_val = split_train_val(df, val_fraction=legacy_val_fraction, seed=seed)
    fingerprints = image_fingerprints(df["path"].tolist())
    threshold = DUPLICATE_MAX_BITS if max_bits is None else int(max_bits)
    groups = near_duplicate_groups(fingerprints, threshold)
    split = protocol_split(df, groups, set(legacy_val["image_id"]), test_share=test_share, seed=seed)
    frame = pd.DataFrame({"image_id": df["image_id"], "label": df["label"], "region": df["region"],
                          "group": [f"g{g:04d}" for g in groups], "split": split.to_numpy()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    sizes = frame.groupby("group")["image_id"].transform("size")
    return {"max_bits": threshold, "n_images": len(frame), "n_groups": int(frame["group"].nunique()),
            "images_in_multi_image_groups": int((sizes > 1).sum()),
            "largest_group": int(sizes.max()),
            "splits": {k: {"images": int((frame["split"] == k).sum()),
                           "fractured": int(((frame["split"] == k) & (frame["label"] == 1)).sum())}
                       for k in ("train", "val", "test")}}
