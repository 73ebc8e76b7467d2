"""Image-folder reader on PNG/JPEG files written with Pillow."""

from __future__ import annotations

import builtins
import hashlib
import os
import warnings

import numpy as np
import pytest
import torch

from sphereconv.data import dataset_info, load_dataset
from sphereconv.data.image_folder import DEFAULT_FOLDER_IMAGE_SIZE, FLAT_TEST_FRACTION, flat_split_of, list_image_folder
from sphereconv.errors import DatasetError

Image = pytest.importorskip("PIL.Image")


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_split_layout_reads_pixels_labels_and_classes(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for split, per_class in (("train", 3), ("test", 2)):
        for label, name in enumerate(("cat", "dog")):
            for i in range(per_class):
                pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
                save_png(tmp_path / split / name / f"{i}.png", pixels)
                expected.setdefault(split, []).append((pixels, label))
    for split in ("train", "test"):
        x, y = load_dataset("folder", split, data_dir=tmp_path)
        assert x.dtype == torch.uint8 and x.shape == (len(expected[split]), 3, 6, 5)
        for image, label, (pixels, want) in zip(x, y, expected[split]):
            assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1)) and int(label) == want
    info = dataset_info("image_folder", data_dir=tmp_path)
    assert info.class_names == ("cat", "dog") and info.num_classes == 2
    assert info.in_channels == 3 and info.image_size == (6, 5)


def test_val_folder_and_greyscale(tmp_path):
    save_png(tmp_path / "train" / "a" / "0.png", np.full((4, 4), 200, np.uint8))
    save_png(tmp_path / "val" / "a" / "0.png", np.full((4, 4), 50, np.uint8))
    x, y = load_dataset("folder", "test", data_dir=tmp_path, channels=1)
    assert x.shape == (1, 1, 4, 4) and int(x.max()) == 50 and y.tolist() == [0]
    x, _ = load_dataset("folder", "test", data_dir=tmp_path)  # RGB conversion of a greyscale file
    assert x.shape == (1, 3, 4, 4) and (x == 50).all()


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits_not_clipped(tmp_path):
    pixels = np.array([[0, 255, 256, 4095], [32768, 40000, 65280, 65535]], np.uint16)
    save_png(tmp_path / "train" / "a" / "0.png", pixels)
    save_png(tmp_path / "test" / "a" / "0.png", pixels)
    assert Image.open(tmp_path / "train" / "a" / "0.png").mode.startswith("I")
    expected = torch.from_numpy((pixels >> 8).astype(np.uint8))
    x, _ = load_dataset("folder", "train", data_dir=tmp_path, channels=1)
    assert torch.equal(x[0, 0], expected)
    x, _ = load_dataset("folder", "test", data_dir=tmp_path)
    assert x.shape == (1, 3, 2, 4) and all(torch.equal(channel, expected) for channel in x[0])


def test_mixed_sizes_are_resized_to_the_default_or_to_image_size(tmp_path, caplog):
    save_png(tmp_path / "train" / "a" / "big.png", np.zeros((16, 16, 3), np.uint8))
    Image.fromarray(np.full((8, 12, 3), 255, np.uint8)).save(tmp_path / "train" / "a" / "small.jpg")
    (tmp_path / "test" / "a").mkdir(parents=True)
    with caplog.at_level("WARNING", logger="sphereconv.data.image_folder"):
        info = dataset_info("folder", data_dir=tmp_path)
    side = DEFAULT_FOLDER_IMAGE_SIZE
    assert info.image_size == side
    assert "2 different sizes" in caplog.text and f"resizing every image to {side}x{side}" in caplog.text
    assert "--image-size" in caplog.text
    x, _ = load_dataset("folder", "train", data_dir=tmp_path)
    assert x.shape == (2, 3, side, side)
    x, _ = load_dataset("folder", "train", data_dir=tmp_path, image_size=10)
    assert x.shape == (2, 3, 10, 10)
    assert int(x[0].max()) == 0 and int(x[1].min()) >= 250  # JPEG of a flat image stays near 255


def save_with_orientation(path, array, orientation: int) -> None:
    """``array`` stored as is, with an EXIF orientation tag saying how to show it upright."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_photos_upright(tmp_path, orientation):
    from PIL import ImageOps

    stored = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)  # 3 rows, 5 columns
    path = tmp_path / "train" / "a" / "0.png"
    save_with_orientation(path, stored, orientation)
    save_png(tmp_path / "test" / "a" / "0.png", stored)
    with Image.open(path) as image:  # Pillow's own rule is the reference
        upright = np.array(ImageOps.exif_transpose(image).convert("RGB"))
    assert upright.shape == ((5, 3, 3) if orientation >= 5 else (3, 5, 3))
    x, _ = load_dataset("folder", "train", data_dir=tmp_path)
    assert torch.equal(x[0], torch.from_numpy(upright).permute(2, 0, 1))
    # Orientation 6 (a phone held upright, camera rotated): the stored left column becomes the top row.
    if orientation == 6:
        assert torch.equal(x[0][:, 0, :], torch.from_numpy(stored[::-1, 0].copy()).permute(1, 0))
    assert dataset_info("folder", data_dir=tmp_path).image_size == tuple(upright.shape[:2])


@pytest.mark.parametrize("damage", ["ifd_offset", "entry_count"])
def test_a_damaged_exif_block_reads_the_photo_as_stored_without_warnings(tmp_path, damage):
    stored = np.random.default_rng(0).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    path = tmp_path / "train" / "a" / "0.jpg"
    save_with_orientation(path, stored, 6)
    data = bytearray(path.read_bytes())
    tiff = data.find(b"Exif\x00\x00") + 6  # the TIFF header inside the APP1 segment
    if damage == "ifd_offset":  # the first IFD points far past the segment
        data[tiff + 4 : tiff + 8] = b"\xff\xff\x00\x00"
    else:  # the first IFD claims 255 entries
        data[tiff + 8 : tiff + 10] = b"\xff\x00"
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():  # Pillow warns at this open: not our loader's
        warnings.simplefilter("ignore")
        with Image.open(path) as image:
            plain = np.array(image.convert("RGB"))  # the JPEG's pixels as stored
    (tmp_path / "test" / "a").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, _ = load_dataset("folder", "train", data_dir=tmp_path)
    if damage == "ifd_offset":  # no readable orientation: as stored
        assert torch.equal(x[0], torch.from_numpy(plain).permute(2, 0, 1))
    else:  # the tag still reads (6): turned upright, 4 rows become columns
        assert x.shape == (1, 3, 4, 6)


def test_rotated_photos_are_resized_upright(tmp_path):
    # A JPEG stored 48 wide and 24 high, top half white and bottom half black, shown rotated 90 degrees
    # clockwise (orientation 6): upright it is 24 wide and 48 high, white on the right.
    stored = np.zeros((24, 48, 3), np.uint8)
    stored[:12] = 255
    save_with_orientation(tmp_path / "train" / "a" / "0.jpg", stored, 6)
    save_png(tmp_path / "train" / "a" / "1.png", np.zeros((48, 24, 3), np.uint8))
    (tmp_path / "test" / "a").mkdir(parents=True)
    assert dataset_info("folder", data_dir=tmp_path).image_size == (48, 24)  # one upright size: kept
    x, _ = load_dataset("folder", "train", data_dir=tmp_path, image_size=(16, 8))
    assert x.shape == (2, 3, 16, 8)
    assert int(x[0, :, :, 6:].min()) >= 230 and int(x[0, :, :, :2].max()) <= 25


def test_flat_layout_split_rule_is_a_stable_partition(tmp_path):
    names = [f"img_{i:03d}.png" for i in range(60)]
    for name in names:
        save_png(tmp_path / "birds" / name, np.zeros((2, 2, 3), np.uint8))
    save_png(tmp_path / "fish" / "only.png", np.zeros((2, 2, 3), np.uint8))  # hashes into test
    save_png(tmp_path / "fish" / "a.png", np.zeros((2, 2, 3), np.uint8))  # into train
    names.append("a.png")
    classes, train = list_image_folder(tmp_path, "train")
    _, test = list_image_folder(tmp_path, "test")
    assert classes == ("birds", "fish")
    train_names = {p.name for p, _ in train}
    test_names = {p.name for p, _ in test}
    assert not train_names & test_names and train_names | test_names == set(names) | {"only.png"}
    expected_test = {n for n in names if flat_split_of("birds", n) == "test"} | {"only.png"}
    assert flat_split_of("fish", "a.png") == "train"
    assert test_names == expected_test
    assert 0.05 < len(test_names) / 62 < 2 * FLAT_TEST_FRACTION
    # Adding files never moves existing ones between splits.
    save_png(tmp_path / "birds" / "new.png", np.zeros((2, 2, 3), np.uint8))
    _, test_after = list_image_folder(tmp_path, "test")
    assert test_names <= {p.name for p, _ in test_after}


def test_flat_layout_takes_file_names_that_are_not_utf8(tmp_path):
    """Was: UnicodeEncodeError from the split hash for a name like b"caf\\xe9.png" (a Latin-1 zip)."""
    for name in ("cat", "dog"):
        for i in range(5):
            save_png(tmp_path / name / f"{i}.png", np.full((4, 4, 3), 10 * i, np.uint8))
    latin1 = os.fsencode(tmp_path / "cat") + b"/caf\xe9.png"
    with open(latin1, "wb") as handle:
        handle.write((tmp_path / "cat" / "0.png").read_bytes())
    train = list_image_folder(tmp_path, "train")[1]
    test = list_image_folder(tmp_path, "test")[1]
    assert sorted(os.fsencode(p) for p, _ in train + test) == sorted(os.fsencode(p) for p in tmp_path.glob("*/*.png"))
    assert os.fsencode(tmp_path / "cat" / "caf\udce9.png") == latin1
    # Names that are UTF-8 are split as before: the hash of their UTF-8 bytes.
    digest = hashlib.sha256("cat/caf\u00e9.png".encode()).digest()
    expected = "test" if int.from_bytes(digest[:4], "big") / 2**32 < FLAT_TEST_FRACTION else "train"
    assert flat_split_of("cat", "caf\u00e9.png") == expected
    for split in ("train", "test"):
        images, labels = load_dataset("folder", split, data_dir=tmp_path)
        assert images.shape[0] == labels.shape[0] > 0


def test_class_folder_without_images_is_refused_naming_it(tmp_path):
    """A class of only unread formats would be an output the model never trains."""
    for layout in ("split", "flat"):
        root = tmp_path / layout
        base = root / "train" if layout == "split" else root
        save_png(base / "cat" / "1.png", np.zeros((4, 4, 3), np.uint8))  # flat: hashes into train
        (base / "dog").mkdir(parents=True)
        (base / "dog" / "0.gif").write_bytes(b"GIF89a")
        (base / "dog" / "notes.txt").write_text("not an image")
        if layout == "split":
            save_png(root / "test" / "cat" / "0.png", np.zeros((4, 4, 3), np.uint8))
        for split in ("train", "test"):
            with pytest.raises(DatasetError, match=r"class folders without images \(\.png.*\): 'dog';"):
                list_image_folder(root, split)
        with pytest.raises(DatasetError, match="'dog'"):
            dataset_info("folder", data_dir=root)
        save_png(base / "dog" / "0.png", np.zeros((4, 4, 3), np.uint8))
        classes, _ = list_image_folder(root, "train")
        assert classes == ("cat", "dog")


def test_flat_class_whose_images_all_fall_into_test_is_refused_naming_it(tmp_path):
    """Was: the class became an output the model never trains (its one image held out for testing)."""
    save_png(tmp_path / "cat" / "1.png", np.zeros((4, 4, 3), np.uint8))  # hashes into train
    save_png(tmp_path / "fish" / "only.png", np.zeros((4, 4, 3), np.uint8))
    assert flat_split_of("fish", "only.png") == "test"
    for split in ("train", "test"):
        with pytest.raises(DatasetError, match=r"every image of class 'fish' falls into the test split"):
            list_image_folder(tmp_path, split)
    with pytest.raises(DatasetError, match="'fish'"):
        dataset_info("folder", data_dir=tmp_path)
    save_png(tmp_path / "fish" / "a.png", np.zeros((4, 4, 3), np.uint8))  # hashes into train
    classes, train = list_image_folder(tmp_path, "train")
    assert classes == ("cat", "fish") and sorted(label for _, label in train) == [0, 1]


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="needs data_dir"):
        load_dataset("folder", "train")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("folder", "train", data_dir=tmp_path / "nope")
    save_png(tmp_path / "train" / "a" / "0.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"no test/ or val/ folder"):
        load_dataset("folder", "test", data_dir=tmp_path)
    save_png(tmp_path / "test" / "b" / "0.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"class folder that .*train does not have"):
        load_dataset("folder", "test", data_dir=tmp_path)
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*1\.png"):
        load_dataset("folder", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="image_size must be"):
        load_dataset("folder", "train", data_dir=tmp_path, image_size=-3)


def test_missing_pillow_gives_install_instructions(tmp_path, monkeypatch):
    save_png(tmp_path / "a" / "0.png", np.zeros((2, 2, 3), np.uint8))
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("No module named 'PIL'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(DatasetError, match=r"needs Pillow.*pip install pillow"):
        load_dataset("folder", "train", data_dir=tmp_path)
