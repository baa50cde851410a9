"""boneai.data: dataset readers on the real layouts and on small folders built from the samples;
deterministic, stratified, grouped splits; and the shipped samples' own index."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneai.data import (
    REGIONS,
    fracture_boxes,
    read_boneage,
    read_classification_dir,
    read_fracatlas,
    read_image_folder,
    read_mura,
    split_train_val,
)
from boneai.errors import DatasetError

FRACTURED = ["IMG0000019.jpg", "IMG0000351.jpg", "IMG0000479.jpg", "IMG0002180.jpg", "IMG0002621.jpg"]
NOT_FRACTURED = ["IMG0000597.jpg", "IMG0000353.jpg", "IMG0000354.jpg", "IMG0000298.jpg", "IMG0000531.jpg"]


@pytest.fixture(scope="module")
def fracatlas_df(fracatlas_root: Path) -> pd.DataFrame:
    return read_fracatlas(fracatlas_root)


def _save_png(src: Path, dst: Path, size: int = 96) -> None:
    """A small PNG copy of a sample (MURA and bone-age folders hold PNGs)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as img:
        img = img.convert("L")
        img.thumbnail((size, size))
        img.save(dst)


# --------------------------------------------------------------------------- FracAtlas


def test_read_fracatlas_counts_and_labels(fracatlas_df: pd.DataFrame):
    df = fracatlas_df
    assert len(df) == 3469
    assert int(df["label"].sum()) == 608
    assert df["image_id"].is_unique
    # The folder is the label of record, not the csv's `fractured` column.
    by_folder = df["path"].map(lambda p: Path(p).parent.name).map({"Fractured": 1, "Non_fractured": 0})
    assert (df["label"] == by_folder).all()
    assert int(df.loc[df["image_id"] == "IMG0003298.jpg", "label"].iloc[0]) == 1


def test_read_fracatlas_regions_views_and_flags(fracatlas_df: pd.DataFrame):
    df = fracatlas_df
    assert set(df["region"]) <= set(REGIONS)
    counts = df["region"].value_counts()
    assert counts["leg"] > counts["hand"] > counts["hip"] > counts["shoulder"] > 50
    assert set(df.loc[df["image_id"] == "IMG0000019.jpg", ["region", "view"]].iloc[0]) == {"hand", "frontal"}
    assert set("+".join(df["view"]).split("+")) <= {"frontal", "lateral", "oblique", "unknown"}
    assert set(df["hardware"].unique()) <= {0, 1} and set(df["multiscan"].unique()) <= {0, 1}
    assert 0 < df["multiscan"].sum() < len(df)
    assert (df["group"] == df["image_id"]).all()  # no patient ids in FracAtlas
    assert list(df.columns) == ["path", "image_id", "label", "region", "view", "hardware", "multiscan", "group"]


def test_fracture_boxes_match_the_stored_files(fracatlas_root: Path, fracatlas_df: pd.DataFrame):
    boxes = fracture_boxes(fracatlas_root)
    assert len(boxes) == 608
    assert sum(len(v) for v in boxes.values()) == 787
    fractured = set(fracatlas_df.loc[fracatlas_df["label"] == 1, "image_id"])
    assert set(boxes) <= fractured
    assert len(boxes["IMG0000479.jpg"]) == 2
    # The large originals were reduced for this copy; boxes must be in the stored file's pixels.
    paths = dict(zip(fracatlas_df["image_id"], fracatlas_df["path"]))
    for name in ["IMG0000019.jpg", "IMG0000025.jpg", "IMG0000479.jpg", "IMG0002621.jpg"]:
        with Image.open(paths[name]) as img:
            width, height = img.size
        for x, y, w, h in boxes[name]:
            assert 0 <= x and 0 <= y and w > 5 and h > 5
            assert x + w <= width + 0.5 and y + h <= height + 0.5, (name, (x, y, w, h), (width, height))
    x, y, w, h = boxes["IMG0000019.jpg"][0]  # COCO: [1242.3, 929.1, 273.3, 147.3] on 2304x2880
    assert (x, y, w, h) == pytest.approx([1242.297 * 819 / 2304, 929.109 * 1024 / 2880,
                                          273.267 * 819 / 2304, 147.327 * 1024 / 2880], rel=1e-3)


def test_fracture_boxes_scale_to_a_reduced_file_and_tolerate_absence(tmp_path: Path):
    assert fracture_boxes(tmp_path) == {}
    (tmp_path / "images" / "Fractured").mkdir(parents=True)
    Image.new("L", (100, 200)).save(tmp_path / "images" / "Fractured" / "a.jpg")
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 400, "height": 400},
                   {"id": 2, "file_name": "gone.jpg", "width": 400, "height": 400}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [40, 80, 20, 40]},
                        {"id": 2, "image_id": 2, "bbox": [1, 2, 3, 4]},
                        {"id": 3, "image_id": 1, "bbox": []}],
    }
    (tmp_path / "fracture_masks_coco.json").write_text(json.dumps(coco))
    boxes = fracture_boxes(tmp_path)
    assert boxes["a.jpg"] == [pytest.approx([10, 40, 5, 20])]  # x by 100/400, y by 200/400
    assert boxes["gone.jpg"] == [[1.0, 2.0, 3.0, 4.0]]  # no file to measure: COCO pixels as given
    # A COCO file name with its folder (either slash) names the same file.
    for name in ("images/Fractured/a.jpg", "Fractured\\a.jpg"):
        coco["images"][0]["file_name"] = name
        (tmp_path / "fracture_masks_coco.json").write_text(json.dumps(coco))
        assert fracture_boxes(tmp_path)["a.jpg"] == [pytest.approx([10, 40, 5, 20])]


def test_read_fracatlas_on_a_small_copy(tmp_path: Path, samples_dir: Path):
    for folder, names in (("Fractured", FRACTURED), ("Non_fractured", NOT_FRACTURED)):
        (tmp_path / "images" / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(samples_dir / "fracatlas" / name, tmp_path / "images" / folder / name)
    rows = [{"image_id": n, "hand": 0, "leg": 1, "hip": 0, "shoulder": 0, "mixed": 0, "hardware": 0,
             "multiscan": 0, "fractured": 0, "fracture_count": 0, "frontal": 1, "lateral": 0, "oblique": 0}
            for n in FRACTURED + NOT_FRACTURED[:-1]]  # last image has no csv row
    pd.DataFrame(rows).to_csv(tmp_path / "dataset.csv", index=False)
    df = read_fracatlas(tmp_path)
    assert len(df) == 10 and int(df["label"].sum()) == 5  # csv says 0 for all: folders win
    missing = df[df["image_id"] == NOT_FRACTURED[-1]].iloc[0]
    assert missing["region"] == "unknown" and missing["view"] == "unknown"
    assert set(df.loc[df["image_id"] != NOT_FRACTURED[-1], "region"]) == {"leg"}
    assert read_classification_dir(tmp_path)["label"].tolist() == df["label"].tolist()


# --------------------------------------------------------------------------- class folders


@pytest.mark.parametrize("positive, negative", [("fractured", "not_fractured"), ("positive", "negative"),
                                                ("Fractured", "Non_fractured"), ("abnormal", "normal"),
                                                ("Fractures", "No fracture"), ("fractured", "Non-Fractured")])
def test_read_image_folder_labels_by_class_folder(tmp_path: Path, samples_dir: Path, positive, negative):
    for name in FRACTURED[:3]:
        (tmp_path / positive).mkdir(exist_ok=True)
        shutil.copy(samples_dir / "fracatlas" / name, tmp_path / positive / name)
    (tmp_path / negative / "ward2").mkdir(parents=True)  # nested subfolders are read too
    for name in NOT_FRACTURED[:4]:
        shutil.copy(samples_dir / "fracatlas" / name, tmp_path / negative / "ward2" / name)
    (tmp_path / "notes").mkdir()  # not a class folder: ignored
    shutil.copy(samples_dir / "fracatlas" / NOT_FRACTURED[4], tmp_path / "notes" / NOT_FRACTURED[4])
    (tmp_path / positive / "readme.txt").write_text("not an image")
    df = read_image_folder(tmp_path)
    assert len(df) == 7
    assert sorted(df.loc[df["label"] == 1, "image_id"]) == sorted(FRACTURED[:3])
    assert sorted(df.loc[df["label"] == 0, "image_id"]) == sorted(NOT_FRACTURED[:4])
    assert all(Path(p).is_file() for p in df["path"])
    assert set(df["region"]) == {"unknown"}
    assert df["group"].is_unique
    assert f"{negative}/ward2/{NOT_FRACTURED[0]}" in set(df["group"])
    assert read_classification_dir(tmp_path)["path"].tolist() == df["path"].tolist()


def test_read_image_folder_finds_dicom_files_by_their_bytes_and_skips_what_is_not_an_image(
        tmp_path: Path, samples_dir: Path, dicom_bytes) -> None:
    """A PACS export names DICOM files IM00001 or after their UID; a Mac leaves ._x.jpg and .DS_Store."""
    with Image.open(samples_dir / "fracatlas" / FRACTURED[0]) as img:
        pixels = np.asarray(img.convert("L"))
    dicom = dicom_bytes(pixels)
    study = tmp_path / "fractured" / "PAT0001" / "STU01"
    study.mkdir(parents=True)
    (study / "IM00001").write_bytes(dicom)  # no suffix
    (study / "1.2.840.113619.2.55.3.320").write_bytes(dicom)  # named after its UID
    (study / "DICOMDIR").write_bytes(dicom_bytes(None))  # a medium's index, not an image
    (study / "._IM00002.jpg").write_bytes(b"\x00\x05\x16\x07 Mac resource fork")
    (study / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (study / "LOG").write_bytes(b"export finished\n")  # no suffix, not DICOM
    (tmp_path / "fractured" / ".thumbnails").mkdir()
    shutil.copy(samples_dir / "fracatlas" / FRACTURED[1], tmp_path / "fractured" / ".thumbnails" / FRACTURED[1])
    (tmp_path / "not_fractured").mkdir()
    shutil.copy(samples_dir / "fracatlas" / NOT_FRACTURED[0], tmp_path / "not_fractured" / "A.JPG")
    df = read_image_folder(tmp_path)
    assert sorted(df["image_id"]) == ["1.2.840.113619.2.55.3.320", "A.JPG", "IM00001"]
    assert df.set_index("image_id")["label"].to_dict() == {"1.2.840.113619.2.55.3.320": 1, "A.JPG": 0, "IM00001": 1}
    from boneai.io import read_radiograph

    assert read_radiograph(df.loc[df["image_id"] == "IM00001", "path"].item()).pixels.shape == pixels.shape


def test_read_image_folder_without_class_folders_says_what_it_expected(tmp_path: Path, samples_dir: Path):
    (tmp_path / "xrays").mkdir()
    shutil.copy(samples_dir / "fracatlas" / FRACTURED[0], tmp_path / "xrays" / FRACTURED[0])
    with pytest.raises(DatasetError, match="positive/negative"):
        read_image_folder(tmp_path)
    (tmp_path / "fractured").mkdir()  # a class folder, but empty
    with pytest.raises(DatasetError):
        read_image_folder(tmp_path)


# --------------------------------------------------------------------------- bone age


def test_read_boneage_on_a_small_folder(tmp_path: Path, samples_dir: Path):
    (tmp_path / "images").mkdir()
    for i in (101, 102, 103):
        _save_png(samples_dir / "boneage" / "1685.png", tmp_path / "images" / f"{i}.png")
    (tmp_path / "boneage.csv").write_text("id,boneage,male\n101,120,True\n102,36.5,False\n103,200,True\n104,50,False\n")
    df = read_boneage(tmp_path)
    assert df["id"].tolist() == [101, 102, 103]  # 104 has no image: dropped
    assert df["boneage_months"].tolist() == [120.0, 36.5, 200.0]
    assert df["male"].tolist() == [True, False, True] and df["male"].dtype == bool
    assert df["group"].tolist() == ["101", "102", "103"]
    assert all(Path(p).is_file() for p in df["path"])


def test_read_boneage_on_the_full_resolution_subset(boneage_full_root: Path):
    df = read_boneage(boneage_full_root)
    meta = pd.read_csv(boneage_full_root / "boneage.csv")
    assert len(df) == len(meta) == 40
    assert int(df["male"].sum()) == int((meta["male"].astype(str) == "True").sum())
    assert df.set_index("id")["boneage_months"].to_dict() == meta.set_index("id")["boneage"].astype(float).to_dict()
    assert 0 < df["boneage_months"].min() and df["boneage_months"].max() <= 240
    with Image.open(df["path"].iloc[0]) as img:
        assert max(img.size) <= 1024 and min(img.size) > 100


def test_read_boneage_on_the_100px_set(shared_data: Path):
    root = shared_data / "boneage"
    if not (root / "boneage.csv").is_file():
        pytest.skip("bone-age set not available")
    df = read_boneage(root)
    assert len(df) == 11611
    assert df["id"].is_unique
    assert 0.4 < df["male"].mean() < 0.65


def test_read_boneage_errors(tmp_path: Path):
    with pytest.raises(DatasetError, match="no boneage.csv"):
        read_boneage(tmp_path)
    (tmp_path / "boneage.csv").write_text("id,age\n1,10\n")
    with pytest.raises(DatasetError, match="boneage.*male"):
        read_boneage(tmp_path)
    (tmp_path / "boneage.csv").write_text("id,boneage,male\n1,10,True\n")
    with pytest.raises(DatasetError, match="None of the images"):
        read_boneage(tmp_path)


# --------------------------------------------------------------------------- MURA-style studies


@pytest.fixture()
def mura_tree(tmp_path: Path, samples_dir: Path) -> Path:
    src = samples_dir / "fracatlas"
    layout = {
        "XR_HAND/patient00001/study1_positive": [FRACTURED[0], FRACTURED[1]],
        "XR_HAND/patient00001/study2_negative": [NOT_FRACTURED[0]],
        "XR_HAND/patient00002/study1_negative": NOT_FRACTURED[1:4],
        "XR_WRIST/patient00003/study1_positive": [FRACTURED[2]],
    }
    for study, names in layout.items():
        for k, name in enumerate(names, start=1):
            _save_png(src / name, tmp_path / study / f"image{k}.png")
    (tmp_path / "XR_HAND/patient00002/study2_positive").mkdir(parents=True)  # no images: skipped
    (tmp_path / "XR_HAND/patient00002/study1_negative/notes.txt").write_text("not a view")
    return tmp_path


def test_read_mura_one_row_per_study(mura_tree: Path):
    df = read_mura(mura_tree)
    assert len(df) == 4
    by_study = df.set_index("study")
    assert by_study.loc["XR_HAND/patient00001/study1_positive", "label"] == 1
    assert by_study.loc["XR_HAND/patient00001/study2_negative", "label"] == 0
    assert len(by_study.loc["XR_HAND/patient00002/study1_negative", "views"]) == 3
    assert by_study.loc["XR_WRIST/patient00003/study1_positive", "region"] == "wrist"
    assert set(df["region"]) == {"hand", "wrist"}
    assert (df["group"] == df["patient"]).all()
    assert df["patient"].tolist().count("patient00001") == 2
    for views in df["views"]:
        assert all(Path(v).suffix == ".png" and Path(v).is_file() for v in views)
        assert [Path(v).name for v in views] == sorted(Path(v).name for v in views)


def test_read_mura_keeps_a_patient_on_one_side_of_a_split(mura_tree: Path):
    df = read_mura(mura_tree)
    for seed in range(5):
        train, val = split_train_val(df, val_fraction=0.3, seed=seed)
        assert not set(train["patient"]) & set(val["patient"])


def test_read_mura_without_region_folders(tmp_path: Path, samples_dir: Path):
    _save_png(samples_dir / "fracatlas" / FRACTURED[0], tmp_path / "patient07/study3_positive/image1.png")
    df = read_mura(tmp_path)
    assert df.iloc[0]["region"] == "unknown" and df.iloc[0]["label"] == 1 and df.iloc[0]["patient"] == "patient07"


def test_sample_study_reads_as_one_positive_study(samples_dir: Path):
    df = read_mura(samples_dir)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["study"] == "studies/study1_positive" and row["label"] == 1
    assert [Path(v).name for v in row["views"]] == ["image1.jpg", "image2.jpg"]


# --------------------------------------------------------------------------- splits


def _grouped_frame(n_groups: int = 400, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = int(rng.random() < 0.25)
        for k in range(int(rng.integers(1, 6))):
            # A few groups hold both labels (e.g. one abnormal study among normal ones).
            row_label = label if rng.random() > 0.05 else 1 - label
            rows.append({"path": f"p{g}_{k}.png", "label": row_label, "group": f"patient{g:04d}"})
    return pd.DataFrame(rows)


def test_split_is_deterministic():
    df = _grouped_frame()
    a_train, a_val = split_train_val(df, 0.2, seed=11)
    b_train, b_val = split_train_val(df, 0.2, seed=11)
    pd.testing.assert_frame_equal(a_train, b_train)
    pd.testing.assert_frame_equal(a_val, b_val)
    _, c_val = split_train_val(df, 0.2, seed=12)
    assert set(c_val["path"]) != set(a_val["path"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_is_disjoint_complete_grouped_and_stratified(seed):
    df = _grouped_frame()
    train, val = split_train_val(df, val_fraction=0.2, seed=seed)
    assert len(train) + len(val) == len(df)
    assert not set(train["path"]) & set(val["path"])
    assert set(train["path"]) | set(val["path"]) == set(df["path"])
    assert not set(train["group"]) & set(val["group"])  # groups kept whole
    assert abs(len(val) / len(df) - 0.2) < 0.03
    assert abs(val["label"].mean() - df["label"].mean()) < 0.02
    assert abs(train["label"].mean() - df["label"].mean()) < 0.02


def test_split_without_groups_or_strata():
    df = pd.DataFrame({"path": [f"{i}.png" for i in range(1000)], "label": [int(i % 10 == 0) for i in range(1000)]})
    train, val = split_train_val(df, 0.25, seed=0, group=None)
    assert len(val) == 250 and abs(val["label"].mean() - 0.1) < 0.02
    train, val = split_train_val(df, 0.25, seed=0, stratify=None, group=None)
    assert len(val) == 250 and len(train) == 750


def test_split_on_fracatlas_is_stratified(fracatlas_df: pd.DataFrame):
    train, val = split_train_val(fracatlas_df, 0.2, seed=0)
    assert len(train) + len(val) == 3469
    assert abs(len(val) - 0.2 * 3469) < 5
    assert abs(val["label"].mean() - 608 / 3469) < 0.02
    assert not set(train["image_id"]) & set(val["image_id"])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_impossible_fractions(fraction):
    with pytest.raises(ValueError):
        split_train_val(_grouped_frame(20), fraction)


# --------------------------------------------------------------------------- missing / empty folders


@pytest.mark.parametrize("reader", [read_fracatlas, read_image_folder, read_boneage, read_mura, read_classification_dir])
def test_readers_raise_dataset_error_on_a_missing_folder(tmp_path: Path, reader):
    with pytest.raises(DatasetError, match="does not exist"):
        reader(tmp_path / "nowhere")


@pytest.mark.parametrize("reader", [read_fracatlas, read_image_folder, read_boneage, read_mura, read_classification_dir])
def test_readers_raise_dataset_error_on_an_empty_folder(tmp_path: Path, reader):
    with pytest.raises(DatasetError, match=str(tmp_path.name)):
        reader(tmp_path)


def test_fracatlas_csv_without_images_is_an_error(tmp_path: Path):
    (tmp_path / "dataset.csv").write_text("image_id,hand\nIMG1.jpg,1\n")
    with pytest.raises(DatasetError, match="no images"):
        read_fracatlas(tmp_path)


# --------------------------------------------------------------------------- the shipped samples


def _samples_index(samples_dir: Path) -> list[dict[str, str]]:
    with open(samples_dir / "samples.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_samples_index_lists_every_file_with_its_attribution(samples_dir: Path):
    rows = _samples_index(samples_dir)
    assert list(rows[0]) == ["file", "dataset", "label", "region", "fracture_boxes", "boneage_months", "male"]
    listed = {r["file"] for r in rows}
    on_disk = {p.relative_to(samples_dir).as_posix() for p in samples_dir.rglob("*")
               if p.is_file() and p.suffix.lower() in {".jpg", ".png", ".dcm"}}
    assert listed == on_disk
    readme = (samples_dir / "README.md").read_text()
    for needle in ("10.1038/s41597-023-02432-4", "CC BY 4.0", "Halabi", "Radiology", "non-commercial"):
        assert needle in readme
    for name in on_disk:
        assert name in readme, f"{name} is not credited in samples/README.md"
    assert sum(p.stat().st_size for p in samples_dir.rglob("*") if p.is_file()) < 4_000_000


def test_samples_index_content(samples_dir: Path):
    rows = _samples_index(samples_dir)
    fa = [r for r in rows if r["dataset"] == "fracatlas" and r["file"].startswith("fracatlas/")]
    assert len(fa) == 10
    assert sorted(r["label"] for r in fa) == ["0"] * 5 + ["1"] * 5
    assert {r["region"] for r in fa} == {"hand", "leg", "hip", "shoulder"}
    for r in rows:
        boxes = json.loads(r["fracture_boxes"])
        assert isinstance(boxes, list)
        if r["dataset"] == "fracatlas":
            assert r["label"] in {"0", "1"} and r["boneage_months"] == "" and r["male"] == ""
            assert bool(boxes) == (r["label"] == "1")
            with Image.open(samples_dir / r["file"]) as img:
                for x, y, w, h in boxes:
                    assert 0 <= x and 0 <= y and x + w <= img.width + 0.5 and y + h <= img.height + 0.5
        else:
            assert r["dataset"] == "rsna_boneage" and r["label"] == "" and boxes == []
            assert 0 < float(r["boneage_months"]) <= 240 and r["male"] in {"true", "false"}
    assert any(r["region"] == "hand" and json.loads(r["fracture_boxes"]) for r in fa)
    assert any(r["region"] == "leg" and json.loads(r["fracture_boxes"]) for r in fa)
    assert {r["male"] for r in rows if r["dataset"] == "rsna_boneage"} == {"true", "false"}


def test_samples_agree_with_the_shared_data(samples_dir: Path, fracatlas_root: Path, fracatlas_df: pd.DataFrame):
    rows = [r for r in _samples_index(samples_dir) if r["dataset"] == "fracatlas"]
    boxes = fracture_boxes(fracatlas_root)
    by_id = fracatlas_df.set_index("image_id")
    study_sources = {"studies/study1_positive/image1.jpg": "IMG0000351.jpg",
                     "studies/study1_positive/image2.jpg": "IMG0000352.jpg"}
    for r in rows:
        image_id = study_sources.get(r["file"], Path(r["file"]).name)
        original = Path(by_id.loc[image_id, "path"])
        assert (samples_dir / r["file"]).read_bytes() == original.read_bytes(), r["file"]
        assert int(r["label"]) == int(by_id.loc[image_id, "label"])
        assert r["region"] == by_id.loc[image_id, "region"]
        expected = [[round(v, 1) for v in b] for b in boxes.get(image_id, [])]
        assert json.loads(r["fracture_boxes"]) == expected
