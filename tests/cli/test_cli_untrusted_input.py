"""Untrusted input through the command line: hostile config files, image bombs, photos of any size,
and ``eval`` arguments checked like ``train``'s. Every failure is one line and exit code 2."""

from __future__ import annotations

import logging
import struct
import time
import zlib

import numpy as np
import pytest
import torch
import yaml

from sphereconv.cli.main import main
from sphereconv.data.image_folder import DEFAULT_FOLDER_IMAGE_SIZE
from sphereconv.engine.checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint

Image = pytest.importorskip("PIL.Image")

# Seconds within which each hostile config is refused (the alias cases hung before).
FAST_SECONDS = 10.0
# Flags of a tiny, quick run: 2 iterations of a 1/16-width SphereNet-9 on the CPU.
TINY_RUN = [
    "--width-mult",
    "0.0625",
    "--batch-size",
    "4",
    "--iterations",
    "2",
    "--eval-every",
    "2",
    "--device",
    "cpu",
    "--no-progress",
]
# Photo sizes (height, width) of the folder below: two large ones and a small one, JPEG and PNG.
PHOTO_SIZES = ((400, 600), (300, 500), (48, 64))


def one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("sphereconv: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def billion_laughs(indent: str) -> str:
    lines = [f"{indent}- &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{indent}- &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("lr:\n" + billion_laughs("  "), ["line 3: YAML alias *a is not allowed"]),
        ("model_kwargs:\n  x:\n" + billion_laughs("    "), ["line 4: YAML alias *a is not allowed"]),
        ("lr: 0.1\nbatch_size: 32\nlr: 0.5\n", ["line 3: key 'lr' given twice (first at line 1)"]),
    ],
    ids=["laughs-in-lr", "laughs-in-model-kwargs", "duplicate-key"],
)
def test_hostile_config_files_fail_fast_with_one_line(tmp_path, capsys, text, fragments):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    start = time.perf_counter()
    one_line_error(capsys, ["train", "--config", str(path), "--dry-run"], str(path), *fragments)
    assert time.perf_counter() - start < FAST_SECONDS


def test_config_from_dev_zero_fails_fast(capsys):
    start = time.perf_counter()
    one_line_error(capsys, ["train", "--config", "/dev/zero", "--dry-run"], "'/dev/zero' is larger than")
    assert time.perf_counter() - start < FAST_SECONDS


def save_photo(path, height: int, width: int, seed: int) -> None:
    """A photo-like image: smooth gradients plus noise (so JPEG and PNG sizes are realistic)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    base = np.stack([rows * 255 // height, cols * 255 // width, (rows + cols) * 127 // (height + width)], axis=-1)
    noise = rng.integers(0, 32, (height, width, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)


def png_declaring(path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """train/ and test/ folders of two classes holding photos of mixed, large sizes (JPEG and PNG)."""
    root = tmp_path_factory.mktemp("photos")
    seed = 0
    for split, per_class in (("train", 4), ("test", 2)):
        for name in ("cat", "dog"):
            for i in range(per_class):
                height, width = PHOTO_SIZES[i % len(PHOTO_SIZES)]
                save_photo(root / split / name / f"{i}.{'jpg' if i % 2 else 'png'}", height, width, seed)
                seed += 1
    return root


@pytest.fixture(scope="module")
def photo_run(photo_folder, tmp_path_factory):
    """A 2-iteration run on the photo folder with the default image size; returns (out, warnings logged)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("photo-run") / "run"
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("sphereconv.data.image_folder")
    logger.addHandler(handler)
    try:
        rc = main(["train", "--dataset", "folder", "--data-dir", str(photo_folder), *TINY_RUN, "--out", str(out)])
    finally:
        logger.removeHandler(handler)
        torch.set_num_threads(previous)
    assert rc == 0
    return out, [record.getMessage() for record in records]


def test_a_folder_of_large_mixed_photos_trains_and_evaluates(photo_folder, photo_run, capsys):
    out, messages = photo_run
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["dataset"] == "folder" and config["image_size"] is None
    side = DEFAULT_FOLDER_IMAGE_SIZE
    assert len(messages) == 1, messages  # said once, though the folder's size is looked up several times
    assert "3 different sizes, up to 600x400" in messages[0] and f"resizing every image to {side}x{side}" in messages[0]
    assert "--image-size" in messages[0]
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy:" in printed and "(4 folder test images" in printed


def test_image_size_flag_resizes_and_is_recorded(photo_folder, tmp_path, capsys):
    assert (
        main(["train", "--dataset", "folder", "--data-dir", str(photo_folder), "--image-size", "24", "--dry-run"]) == 0
    )
    assert yaml.safe_load(capsys.readouterr().out.split("config is valid")[0])["image_size"] == 24
    out = tmp_path / "run24"
    assert (
        main(
            [
                "train",
                "--dataset",
                "folder",
                "--data-dir",
                str(photo_folder),
                "--image-size",
                "24",
                *TINY_RUN,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert yaml.safe_load((out / "config.yaml").read_text())["image_size"] == 24
    # The run trained on 24 x 24 images: SphereNet-9's three 2 x 2 poolings leave a 3 x 3 map for fc6
    # (4 x 4 at the default 32).
    _, newest = list_checkpoints(checkpoint_dir(out))[-1]
    state = load_checkpoint(newest)
    assert state["dataset_info"]["image_size"] == 24
    assert tuple(state["model"]["fc6.conv.weight"].shape[-2:]) == (3, 3)
    assert main(["eval", str(out), "--device", "cpu", "--batch-size", "3"]) == 0
    assert "(4 folder test images" in capsys.readouterr().out


def test_image_size_errors_name_the_flag(capsys):
    one_line_error(capsys, ["train", "--image-size", "0"], "--image-size", "image_size=0", "[1, 512]")
    one_line_error(
        capsys,
        ["train", "--image-size", "32", "--dry-run"],
        "image_size=32 applies to image folders",
        "fashion-mnist images are 28x28",
        "--image-size",
    )
    one_line_error(capsys, ["train", "--image-size", "100000", "--dry-run"], "image_size=100000", "[1, 512]")


def test_decompression_bomb_in_a_folder_is_one_line_in_train_and_eval(photo_folder, photo_run, tmp_path, capsys):
    run, _ = photo_run
    bomb = photo_folder / "test" / "cat" / "bomb.png"
    png_declaring(bomb, 20000, 20000)
    try:
        one_line_error(capsys, ["eval", str(run), "--device", "cpu"], "bomb.png declares more than", "pixels")
        one_line_error(
            capsys,
            [
                "train",
                "--dataset",
                "folder",
                "--data-dir",
                str(photo_folder),
                *TINY_RUN,
                "--out",
                str(tmp_path / "bombed"),
            ],
            "bomb.png declares more than",
        )
    finally:
        bomb.unlink()


def test_eval_arguments_are_checked_like_train(photo_run, tmp_path, capsys):
    run, _ = photo_run
    one_line_error(
        capsys,
        ["eval", str(run), "--device", "tpu"],
        "--device",
        "invalid device='tpu'",
        "auto, cpu, cuda, cuda:N or mps",
    )
    one_line_error(
        capsys, ["train", "--device", "tpu", "--dry-run"], "invalid device='tpu'", "auto, cpu, cuda, cuda:N or mps"
    )
    one_line_error(
        capsys,
        ["eval", str(run), "--data-dir", str(tmp_path / "missing")],
        "--data-dir",
        "expected an existing directory",
    )
    one_line_error(capsys, ["eval", ""], "CHECKPOINT is empty")
    one_line_error(capsys, ["eval", str(run), "--batch-size", "0"], "--batch-size", "positive integer")
    one_line_error(capsys, ["eval", str(run), "--test-subset", "many"], "--test-subset", "'many'")
    one_line_error(capsys, ["eval", str(run), "--device", "cpu", "--test-subset", "99"], "subset_size=99")
