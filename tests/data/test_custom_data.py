"""A site's own images through ``load_dataset("custom", ...)``: the four input forms, preprocessing, caching,
splits and every bad input with its message."""

from __future__ import annotations

import json
import os
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from monai_pld.data import load_dataset
from monai_pld.utils import ConfigError


def _npz(path, n=30, size=12, rgb=False, column_labels=False, splits=("train", "val", "test"), names=None, classes=3):
    rng = np.random.default_rng(0)
    arrays = {}
    for s in splits:
        shape = (n, size, size, 3) if rgb else (n, size, size)
        labels = np.arange(n) % classes
        arrays[f"{s}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{s}_labels"] = labels[:, None] if column_labels else labels
    if names is not None:
        arrays["class_names"] = np.array(names)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("column_labels", [False, True])
@pytest.mark.parametrize("rgb", [False, True])
def test_npz_reads_every_split_as_stored(tmp_path, rgb, column_labels):
    arrays = _npz(tmp_path / "site.npz", rgb=rgb, column_labels=column_labels, names=["a", "b", "c"])
    for split in ("train", "val", "test"):
        data = load_dataset("custom", split, tmp_path / "site.npz", image_size=12)
        expected = arrays[f"{split}_images"]
        expected = expected.transpose(0, 3, 1, 2) if rgb else expected[:, None]
        assert torch.equal(data.images, torch.from_numpy(expected))
        assert data.labels.tolist() == (np.arange(30) % 3).tolist()
        assert data.class_names == ["a", "b", "c"] and data.name == "custom"


def test_npz_without_class_names_resized_and_converted(tmp_path):
    arrays = _npz(tmp_path / "x.npz", size=16, rgb=True)
    data = load_dataset("custom", "test", tmp_path / "x.npz", image_size=8, data_options={"channels": 1})
    assert data.images.shape == (30, 1, 8, 8) and data.class_names == ["0", "1", "2"]
    # area resize of the BT.601 grey image: the mean of a 2x2 block
    grey = arrays["test_images"].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    block = grey[0, :2, :2].mean()
    assert abs(int(data.images[0, 0, 0, 0]) - block) <= 1


def test_npz_train_only_gets_a_stratified_split_file_reused(tmp_path):
    _npz(tmp_path / "t.npz", n=60, splits=("train",))
    opts = {"val_fraction": 0.2, "test_fraction": 0.1, "cache_dir": str(tmp_path / "cache")}
    sets = {
        s: load_dataset("custom", s, tmp_path / "t.npz", image_size=12, data_options=opts)
        for s in ("train", "val", "test")
    }
    assert [len(sets[s]) for s in ("train", "val", "test")] == [42, 12, 6]
    assert torch.bincount(sets["val"].labels).tolist() == [4, 4, 4]
    files = list((tmp_path / "cache").glob("*split*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert len(record["heldout"]["val"]) == 12
    # the held-out images are disjoint from train: compare pixel rows
    train_rows = {bytes(x) for x in sets["train"].images.numpy()}
    assert not any(bytes(x) in train_rows for x in sets["test"].images.numpy())
    again = load_dataset("custom", "val", tmp_path / "t.npz", image_size=12, data_options=opts)
    assert torch.equal(again.images, sets["val"].images)


def test_npz_bad_inputs(tmp_path):
    np.savez(tmp_path / "nolabels.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="lacks train_images/train_labels"):
        load_dataset("custom", "train", tmp_path / "nolabels.npz")
    np.savez(
        tmp_path / "range.npz",
        train_images=np.zeros((2, 4, 4), np.uint8),
        train_labels=np.array([0, 5]),
        class_names=np.array(["a", "b"]),
    )
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        load_dataset("custom", "train", tmp_path / "range.npz")
    np.savez(
        tmp_path / "empty.npz",
        train_images=np.zeros((4, 4, 4), np.uint8),
        train_labels=np.array([0, 0, 2, 2]),
        val_images=np.zeros((1, 4, 4), np.uint8),
        val_labels=np.array([0]),
        test_images=np.zeros((1, 4, 4), np.uint8),
        test_labels=np.array([0]),
    )
    with pytest.raises(ValueError, match=r"class 1 \(1\) has no training images"):
        load_dataset("custom", "train", tmp_path / "empty.npz", image_size=4)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="broken.npz is not a readable npz"):
        load_dataset("custom", "train", tmp_path / "broken.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("custom", "train", tmp_path / "missing.npz")
    with pytest.raises(ConfigError, match="'channels' must be 1"):
        load_dataset("custom", "train", tmp_path / "range.npz", data_options={"channels": 2})
    with pytest.raises(ConfigError, match="unknown key"):
        load_dataset("custom", "train", tmp_path / "range.npz", data_options={"chanels": 1})
    images = np.random.default_rng(0).random((6, 4, 4)).astype(np.float32)
    images[3, 1, 2] = np.nan  # min-max scaling would turn the whole image black
    images[5, 0, 0] = np.inf
    np.savez(tmp_path / "nan.npz", train_images=images, train_labels=np.arange(6) % 2)
    with pytest.raises(ValueError, match=r"2 of 6 train_images hold NaN or infinite values \(the first at index 3\)"):
        load_dataset("custom", "train", tmp_path / "nan.npz", image_size=4)
    _npz(tmp_path / "twice.npz", names=["a", "b", "a"])
    with pytest.raises(ValueError, match=r"class_names repeats \['a'\]"):
        load_dataset("custom", "train", tmp_path / "twice.npz")
    np.savez(tmp_path / "one.npz", train_images=np.zeros((4, 4, 4), np.uint8), train_labels=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="1 class.*needs at least two classes"):
        load_dataset("custom", "train", tmp_path / "one.npz", image_size=4)


# ---------------------------------------------------------------------------------------------------------------
# image files


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _grey(seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def _folder(root, per_class=5, classes=("benign", "malignant"), size=8):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"{i:03d}.png", _grey(10 * c + i, size))
    return root


def _opts(tmp_path, **kw):
    return {"cache_dir": str(tmp_path / "cache"), "num_workers": 0, **kw}


def test_folder_of_mixed_files_is_converted_cropped_resized_and_counted(tmp_path):
    root = tmp_path / "site"
    rng = np.random.default_rng(1)
    grey = _png(root / "a" / "0_grey.png", _grey(0, 8))  # first file: channels resolve to grey
    rgb = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    _png(root / "a" / "1_rgb.png", rgb)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "a" / "2.jpeg", quality=95)
    _png(root / "b" / "3_rgba.png", rng.integers(0, 256, (8, 8, 4), dtype=np.uint8))
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000
    _png(root / "b" / "4_16bit.png", ramp)
    palette = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert("P", palette=Image.ADAPTIVE)
    palette.save(root / "b" / "5_palette.png")
    _png(root / "b" / "6_grey.bmp", _grey(6))
    data = load_dataset(
        "custom", "train", root, image_size=8, data_options=_opts(tmp_path, val_fraction=0, test_fraction=0)
    )
    assert data.images.shape == (7, 1, 8, 8) and data.class_names == ["a", "b"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert torch.equal(data.images[0, 0], torch.from_numpy(np.array(Image.open(grey))))
    # RGB 8 x 12: centre crop to 8 x 8 (columns 2..9), then BT.601 grey
    luma = np.rint(rgb[:, 2:10].astype(np.float64) @ [0.299, 0.587, 0.114])
    assert np.abs(data.images[1, 0].numpy().astype(int) - luma).max() <= 1
    # 16-bit min-max: 0 -> 0, 63000 -> 255, linear in between
    assert np.abs(data.images[4, 0].numpy().astype(int) - np.rint(ramp / 63000 * 255)).max() <= 1
    converted = data.source_info["converted"]
    assert converted["RGB to grey"] == 4 and converted["cropped to square"] == 1 and converted["resized"] == 1
    assert converted["alpha dropped"] == 1 and sum(v for k, v in converted.items() if "scaled" in k) == 1


def test_folder_rgb_by_configuration_and_a_window(tmp_path):
    root = tmp_path / "site"
    _png(root / "x" / "a.png", _grey(0))
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 100).astype(np.uint16)  # 0 .. 6300
    _png(root / "y" / "b.png", ramp)
    opts = _opts(tmp_path, channels=3, intensity=[1000, 2000], val_fraction=0, test_fraction=0)
    data = load_dataset("custom", "train", root, image_size=8, data_options=opts)
    assert data.images.shape == (2, 3, 8, 8)
    assert torch.equal(data.images[0, 0], data.images[0, 2])
    expected = np.rint(np.clip((ramp.astype(np.float64) - 1000) / 1000, 0, 1) * 255)
    assert np.abs(data.images[1, 1].numpy().astype(int) - expected).max() <= 1


def test_folder_with_split_folders(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        _folder(tmp_path / "site" / split, per_class=n)
    sizes = {
        s: len(load_dataset("custom", s, tmp_path / "site", image_size=8, data_options=_opts(tmp_path)))
        for s in ("train", "val", "test")
    }
    assert sizes == {"train": 8, "val": 4, "test": 6}


def test_datalist_with_nifti_labels_mapping_and_sections(tmp_path):
    rng = np.random.default_rng(0)
    entries = []
    ramp = np.arange(64, dtype=np.float32).reshape(8, 8) * 10 - 200  # -200 .. 430
    for i in range(6):
        scan = ramp if i == 0 else rng.random((10, 10)).astype(np.float32) * 500
        nib.save(nib.Nifti1Image(scan, np.eye(4)), tmp_path / f"s{i}.nii.gz")
        entries.append({"image": f"s{i}.nii.gz", "label": ["normal", "tumour"][i % 2]})
    _png(tmp_path / "png" / "p.png", _grey(3, 10))
    document = {
        "labels": {"0": "normal", "1": "tumour"},
        "training": entries[:4] + [{"image": "png/p.png", "label": 1}],
        "validation": entries[4:5],
        "test": entries[5:],
    }
    (tmp_path / "list.json").write_text(json.dumps(document))
    opts = _opts(tmp_path)
    train = load_dataset("custom", "train", tmp_path / "list.json", image_size=8, data_options=opts)
    assert train.images.shape == (5, 1, 8, 8) and train.class_names == ["normal", "tumour"]
    assert train.labels.tolist() == [0, 1, 0, 1, 1]
    test = load_dataset("custom", "test", tmp_path / "list.json", image_size=8, data_options=opts)
    assert len(test) == 1 and test.labels.tolist() == [1]
    # min-max per image, in the stored array order (MONAI's NIfTI convention)
    expected = np.rint((ramp - ramp.min()) / (ramp.max() - ramp.min()) * 255)
    assert np.abs(train.images[0, 0].numpy().astype(int) - expected).max() <= 1


def test_csv_with_class_names_and_relative_paths(tmp_path):
    _folder(tmp_path / "img", per_class=5)
    rows = ["path,diagnosis"] + [f"img/{name}/{i:03d}.png,{name}" for name in ("malignant", "benign") for i in range(5)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    opts = _opts(tmp_path, csv_path_column="path", csv_label_column="diagnosis", val_fraction=0.2, test_fraction=0.2)
    sets = {
        s: load_dataset("custom", s, tmp_path / "labels.csv", image_size=8, data_options=opts)
        for s in ("train", "val", "test")
    }
    assert sets["train"].class_names == ["benign", "malignant"]
    assert [len(sets[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(sets["val"].labels.tolist()) == [0, 1]


def test_cache_is_reused_and_rebuilt_after_a_change(tmp_path):
    root = _folder(tmp_path / "site", per_class=4)
    opts = _opts(tmp_path, val_fraction=0, test_fraction=0)
    first = load_dataset("custom", "train", root, image_size=8, data_options=opts)
    caches = list((tmp_path / "cache").glob("*.npz"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    again = load_dataset("custom", "train", root, image_size=8, data_options=opts)
    assert torch.equal(first.images, again.images) and caches[0].stat().st_mtime_ns == stamp
    # a changed image: new pixels, new cache, the old one removed
    new = _grey(99)
    target = root / "benign" / "001.png"
    _png(target, new)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = load_dataset("custom", "train", root, image_size=8, data_options=opts)
    assert torch.equal(changed.images[1, 0], torch.from_numpy(new))
    assert [p.name for p in (tmp_path / "cache").glob("*.npz")] != [caches[0].name]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    # another image size is another cache
    load_dataset("custom", "train", root, image_size=4, data_options=opts)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_split_file_keeps_the_held_out_images_when_images_are_added(tmp_path):
    root = _folder(tmp_path / "site", per_class=10)
    opts = _opts(tmp_path, val_fraction=0.2, test_fraction=0.2, split_seed=3)
    held = {s: load_dataset("custom", s, root, image_size=8, data_options=opts) for s in ("val", "test")}
    assert [len(held[s]) for s in ("val", "test")] == [4, 4]
    (split_file,) = (tmp_path / "cache").glob("*split*.json")
    record = json.loads(split_file.read_text())
    assert len(record["heldout"]["test"]) == 4 and all(k.endswith(".png") for k in record["heldout"]["test"])
    _png(root / "benign" / "new.png", _grey(500))
    for s in ("val", "test"):
        assert torch.equal(load_dataset("custom", s, root, image_size=8, data_options=opts).images, held[s].images)
    assert len(load_dataset("custom", "train", root, image_size=8, data_options=opts)) == 13
    other = load_dataset("custom", "test", root, image_size=8, data_options={**opts, "split_seed": 4})
    assert not torch.equal(other.images, held["test"].images)


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_unreadable_image_stops_the_run_and_leaves_no_cache(tmp_path):
    root = _folder(tmp_path / "site", per_class=3)
    bad = root / "benign" / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    opts = _opts(tmp_path, val_fraction=0, test_fraction=0)
    with pytest.raises(ValueError, match=r"1 image\(s\) cannot be read: .*corrupt\.png.*skip_unreadable: true"):
        load_dataset("custom", "train", root, image_size=8, data_options=opts)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("*.npz*"))
    data = load_dataset("custom", "train", root, image_size=8, data_options={**opts, "skip_unreadable": True})
    assert len(data) == 6 and data.source_info["skipped"] == [str(bad)]
    with pytest.raises(ValueError, match="corrupt.png"):
        load_dataset("custom", "train", root, image_size=8, data_options=opts)


def test_an_image_file_with_nan_is_named_not_blackened(tmp_path):
    scans = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    scans[2, :2] = np.nan  # e.g. outside a brain mask
    entries = []
    for i, scan in enumerate(scans):
        nib.save(nib.Nifti1Image(scan, np.eye(4)), tmp_path / f"s{i}.nii.gz")
        entries.append({"image": f"s{i}.nii.gz", "label": i % 2})
    (tmp_path / "list.json").write_text(json.dumps({"labels": {"0": "a", "1": "b"}, "training": entries}))
    opts = _opts(tmp_path, val_fraction=0, test_fraction=0)
    with pytest.raises(ValueError, match=r"1 image\(s\) cannot be read: .*s2\.nii\.gz .*16 NaN or infinite"):
        load_dataset("custom", "train", tmp_path / "list.json", image_size=8, data_options=opts)
    data = load_dataset(
        "custom", "train", tmp_path / "list.json", image_size=8, data_options={**opts, "skip_unreadable": True}
    )
    assert len(data) == 3 and data.source_info["skipped"] == [str(tmp_path / "s2.nii.gz")]


def test_a_failed_cache_write_leaves_no_file(tmp_path):
    from monai_pld.data.cache import load_or_build

    def build():
        return {"images": np.zeros(3, dtype=object)}  # refused by atomic_savez before anything is written

    with pytest.raises(TypeError):
        load_or_build(tmp_path / "c" / "x_1.npz", build)
    assert list((tmp_path / "c").iterdir()) == []


def test_empty_and_classless_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no class folders"):
        load_dataset("custom", "train", tmp_path / "empty", data_options=_opts(tmp_path))
    root = _folder(tmp_path / "site", per_class=2)
    (root / "unused").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*unused holds no images"):
        load_dataset("custom", "train", root, data_options=_opts(tmp_path))


def test_datalist_errors_name_the_entry(tmp_path):
    _folder(tmp_path / "img", per_class=2)
    good = [{"image": f"img/benign/{i:03d}.png", "label": "benign"} for i in range(2)]

    def load(document, **kw):
        (tmp_path / "d.json").write_text(json.dumps(document))
        return load_dataset("custom", "train", tmp_path / "d.json", data_options=_opts(tmp_path, **kw))

    with pytest.raises(ValueError, match=r"d.json training\[2\]: image .*gone.png does not exist"):
        load({"training": good + [{"image": "img/gone.png", "label": "benign"}]})
    with pytest.raises(ValueError, match=r"training\[1\]: label 'cyst' is not in the labels mapping"):
        load({"labels": {"0": "benign"}, "training": [good[0], {**good[1], "label": "cyst"}]})
    with pytest.raises(ValueError, match=r"class 1 \(malignant\) has no training images"):
        load({"labels": {"0": "benign", "1": "malignant"}, "training": good}, val_fraction=0, test_fraction=0)
    with pytest.raises(ValueError, match="mixes class indices and class names"):
        load({"training": [good[0], {**good[1], "label": 1}]})
    with pytest.raises(ValueError, match="needs a non-empty 'training' list"):
        load({"validation": good})
    outside = tmp_path.parent / f"{tmp_path.name}_outside.png"
    _png(outside, _grey(0))
    other = {"image": "img/malignant/000.png", "label": "malignant"}
    escape = {"training": good + [{"image": f"../{outside.name}", "label": "benign"}, other]}
    with pytest.raises(ValueError, match=r"training\[2\]: .*outside.png lies outside .*allow_outside_root: true"):
        load(escape)
    assert len(load(escape, allow_outside_root=True, val_fraction=0, test_fraction=0)) == 4
    outside.unlink()


def test_symlink_escape_is_refused(tmp_path):
    root = _folder(tmp_path / "site", per_class=2)
    secret = _png(tmp_path / "elsewhere" / "secret.png", _grey(1))
    (root / "benign" / "link.png").symlink_to(secret)
    with pytest.raises(ValueError, match=r"link.png lies outside .*site"):
        load_dataset("custom", "train", root, data_options=_opts(tmp_path))
    rows = "image,label\nimg.png,0\n"
    (root / "list.csv").write_text(rows)
    (root / "img.png").symlink_to(secret)
    with pytest.raises(ValueError, match=r"list.csv row 2: .*img.png lies outside"):
        load_dataset("custom", "train", root / "list.csv", data_options=_opts(tmp_path))


def test_csv_errors(tmp_path):
    _folder(tmp_path / "img", per_class=2)
    (tmp_path / "a.csv").write_text("file,label\nimg/benign/000.png,0\n")
    with pytest.raises(ValueError, match=r"has no column \['image'\].*csv_path_column"):
        load_dataset("custom", "train", tmp_path / "a.csv", data_options=_opts(tmp_path))
    (tmp_path / "b.csv").write_text("image,label\nimg/benign/000.png,0\nimg/benign/001.png,2\n")
    with pytest.raises(ValueError, match=r"class 1 \(1\) has no training images"):
        load_dataset(
            "custom", "train", tmp_path / "b.csv", data_options=_opts(tmp_path, val_fraction=0, test_fraction=0)
        )


def test_dicom_without_pydicom_says_how_to_install(tmp_path):
    pytest.importorskip("PIL")
    try:
        import pydicom  # noqa: F401

        pytest.skip("pydicom is installed")
    except ImportError:
        pass
    root = _folder(tmp_path / "site", per_class=2)
    (root / "benign" / "scan.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(ValueError, match=r"scan.dcm .*needs pydicom: pip install 'monai_pld\[dicom\]'"):
        load_dataset("custom", "train", root, data_options=_opts(tmp_path))


def test_check_dataset_for_custom(tmp_path):
    from monai_pld.data import check_dataset

    with pytest.raises(ValueError, match="'dataset_dir' .*does not exist"):
        check_dataset("custom", 28, tmp_path / "nope")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="cannot tell the input form"):
        check_dataset("custom", 28, tmp_path / "x.txt")
    with pytest.raises(ValueError, match="'intensity' must be 'minmax' or a window"):
        check_dataset("custom", 28, tmp_path, {"intensity": [5, 1]})
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction < 1"):
        check_dataset("custom", 28, tmp_path, {"val_fraction": 0.5, "test_fraction": 0.5})
    check_dataset("custom", 28, tmp_path, {"format": "folder"})


def test_distillation_config_check_covers_custom_data(tmp_path):
    from monai_pld.workflows import check_distillation_config

    common = {"ipc": 1, "iterations": 1, "matcher": "dm", "parameterization": "slfd", "rank": 0, "image_size": 28}
    with pytest.raises(ConfigError, match="'dataset_dir' is not set.*--dataset_dir"):
        check_distillation_config(**common, dataset_flag="custom", dataset_dir=None)
    with pytest.raises(ConfigError, match="'skip_unreadable' must be true or false"):
        check_distillation_config(
            **common, dataset_flag="custom", dataset_dir=str(tmp_path), data_options={"skip_unreadable": "maybe"}
        )
    checked = check_distillation_config(**common, dataset_flag="custom", dataset_dir=str(tmp_path), data_options={})
    assert checked["iterations"] == 1


def test_npz_damaged_or_not_an_archive(tmp_path):
    """A bit flipped inside a compressed member, or an .npy renamed .npz: a message naming the file, not zlib's."""
    arrays = _npz(tmp_path / "plain.npz")
    np.savez_compressed(tmp_path / "good.npz", **arrays)
    data = bytearray((tmp_path / "good.npz").read_bytes())
    middle = len(data) // 3  # inside one of the compressed members
    data[middle : middle + 200] = bytes(200)
    (tmp_path / "damaged.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged.npz: \w+_images cannot be read .*the file is damaged"):
        load_dataset("custom", "train", tmp_path / "damaged.npz")
    np.save(tmp_path / "array.npy", arrays["train_images"])
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    with pytest.raises(ValueError, match="array.npz holds a single .npy array, not an npz archive"):
        load_dataset("custom", "train", tmp_path / "array.npz")


def test_npz_splits_take_the_training_channels(tmp_path):
    """A colour file whose test split was stored grey (or the reverse) gives every split the training channels."""
    grey, rgb = _npz(tmp_path / "grey.npz"), _npz(tmp_path / "rgb.npz", rgb=True)
    np.savez(tmp_path / "mixed.npz", **{**rgb, "test_images": grey["test_images"]})
    test = load_dataset("custom", "test", tmp_path / "mixed.npz", image_size=12)
    assert test.channels == 3 and torch.equal(test.images[:, 0], test.images[:, 2])
    np.savez(tmp_path / "mixed_grey.npz", **{**grey, "val_images": rgb["val_images"]})
    assert load_dataset("custom", "val", tmp_path / "mixed_grey.npz", image_size=12).channels == 1


def test_labels_numbered_from_one_are_named_as_such(tmp_path):
    labels = np.arange(6) % 3 + 1
    np.savez(tmp_path / "from1.npz", train_images=np.zeros((6, 4, 4), np.uint8), train_labels=labels)
    with pytest.raises(ValueError, match=r"The labels start at 1.*subtract 1 from every label"):
        load_dataset("custom", "train", tmp_path / "from1.npz", image_size=4)


@pytest.mark.parametrize("layout", [("Training", "Testing"), ("train", "valid")])
def test_folder_with_split_folders_spelt_otherwise_is_refused(tmp_path, layout):
    """Kaggle's Training/Testing would become two classes (the test images trained on); valid/ beside train/
    would go unused."""
    for split in layout:
        _folder(tmp_path / "site" / split, per_class=2)
    with pytest.raises(ValueError, match=r"named like splits .*must be called train/, val/ and test/"):
        load_dataset("custom", "train", tmp_path / "site", image_size=8, data_options=_opts(tmp_path))
