"""DeviceLoader: scaling, determinism, per-epoch shuffling, DDP shards, exact resume, augmentation; subset."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from sphereconv.cli.main import main
from sphereconv.data import DeviceLoader, augment_batch, normalize_pixels, subset
from sphereconv.errors import SphereconvError

N = 50


def make_data(n=N, channels=3, side=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=generator)
    return images, torch.arange(n)  # label = sample id, to track the order


def collect(loader, batches=None):
    stream = iter(loader) if batches is None else itertools.islice(loader.batches_forever(), batches)
    return [(x.clone(), y.clone()) for x, y in stream]


def test_batches_are_scaled_like_the_reference():
    images, labels = make_data()
    images[0] = 0
    images[1] = 255
    loader = DeviceLoader(images, labels, 16, shuffle=False)
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (16, 3, 8, 8) and y.tolist() == list(range(16))
    assert torch.equal(x, (images[:16].float() - 127.5) / 128)
    assert x[0].eq(-127.5 / 128).all() and x[1].eq(127.5 / 128).all()
    assert float(x.min()) >= -0.9961 and float(x.max()) <= 0.9961
    assert torch.equal(
        normalize_pixels(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-0.99609375, 0.99609375])
    )


def test_length_drop_last_and_last_batch():
    images, labels = make_data(10)
    assert len(DeviceLoader(images, labels, 4)) == 3
    assert [y.numel() for _, y in DeviceLoader(images, labels, 4)] == [4, 4, 2]
    assert [y.numel() for _, y in DeviceLoader(images, labels, 4, drop_last=True)] == [4, 4]


@pytest.mark.parametrize("augment", ["none", "flip", "crop_flip"])
def test_same_seed_same_stream_other_seed_other_stream(augment):
    images, labels = make_data()
    a = collect(DeviceLoader(images, labels, 16, augment=augment, seed=3), batches=8)
    b = collect(DeviceLoader(images, labels, 16, augment=augment, seed=3), batches=8)
    c = collect(DeviceLoader(images, labels, 16, augment=augment, seed=4), batches=8)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert any(not torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


def test_each_epoch_is_a_new_permutation_and_set_epoch_replays_it():
    images, labels = make_data()
    loader = DeviceLoader(images, labels, 10, seed=1)
    epochs = [torch.cat([y for _, y in loader]) for _ in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(N))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert loader.epoch == 3
    loader.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in loader]), epochs[1])
    unshuffled = DeviceLoader(images, labels, 10, shuffle=False)
    assert torch.cat([y for _, y in unshuffled]).tolist() == list(range(N))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shards_are_disjoint_equal_and_cover(world_size):
    images, labels = make_data()
    for epoch in range(2):
        shards = []
        for rank in range(world_size):
            loader = DeviceLoader(images, labels, 4, seed=7, rank=rank, world_size=world_size)
            loader.set_epoch(epoch)
            shards.append(torch.cat([y for _, y in loader]).tolist())
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == N // world_size
        union = set().union(*shards)
        assert len(union) == sum(len(s) for s in shards) == (N // world_size) * world_size
        # The shards are slices of the one epoch permutation that a single process would see.
        single = DeviceLoader(images, labels, N, seed=7)
        single.set_epoch(epoch)
        assert sum(shards, []) == next(iter(single))[1].tolist()[: len(union)]
    uneven = [
        DeviceLoader(images, labels, 4, rank=r, world_size=world_size, even_shards=False) for r in range(world_size)
    ]
    ids = [torch.cat([y for _, y in loader]).tolist() for loader in uneven]
    assert sorted(sum(ids, [])) == list(range(N))


def test_resume_from_state_dict_reproduces_the_remaining_batches():
    images, labels = make_data()
    options = dict(batch_size=8, augment="crop_flip", seed=5, rank=1, world_size=2, drop_last=True)
    original = DeviceLoader(images, labels, **options)
    stream = original.batches_forever()
    for _ in range(len(original) + 2):  # one epoch and two batches into the next
        next(stream)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    remaining = [(x.clone(), y.clone()) for x, y in itertools.islice(stream, 2 * len(original))]

    resumed = DeviceLoader(images, labels, **{**options, "seed": 0})  # the saved seed wins
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.epoch == 1
    resumed.set_epoch(1)  # an epoch loop calling set_epoch does not lose the position
    replay = collect(resumed, batches=len(remaining))
    assert len(replay) == len(remaining)
    for (x, y), (xr, yr) in zip(remaining, replay):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_state_at_epoch_end_points_to_the_next_epoch():
    images, labels = make_data()
    loader = DeviceLoader(images, labels, 10)
    for _ in itertools.islice(iter(loader), len(loader)):  # consume every batch, generator not resumed
        pass
    state = loader.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 0)
    other = DeviceLoader(images, labels, 10)
    other.load_state_dict(state)
    assert torch.equal(torch.cat([y for _, y in other]), torch.cat([y for _, y in loader]))


def test_mismatched_resume_is_refused():
    images, labels = make_data()
    state = DeviceLoader(images, labels, 10).state_dict()
    with pytest.raises(ValueError, match="saved loader had batch_size=10, this one has batch_size=5"):
        DeviceLoader(images, labels, 5).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_size=50.*dataset_size=49"):
        DeviceLoader(images[:49], labels[:49], 10).load_state_dict(state)
    # The same global batch on two processes: the number of processes is named, not the batch per process.
    with pytest.raises(ValueError, match="saved loader had world_size=1, this one has world_size=2"):
        DeviceLoader(images, labels, 5, rank=0, world_size=2).load_state_dict(state)


def _padded(image: np.ndarray, pad: int, mode: str) -> np.ndarray:
    mode = {"zeros": "constant"}.get(mode, mode)
    return np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode=mode)


@pytest.mark.parametrize("pad_mode", ["reflect", "symmetric", "zeros"])
def test_crop_flip_outputs_are_flipped_crops_of_the_padded_image(pad_mode):
    images, labels = make_data(32, channels=2, side=6)
    pad = 2
    loader = DeviceLoader(images, labels, 32, shuffle=False, augment="crop_flip", pad=pad, pad_mode=pad_mode, seed=2)
    x, y = next(iter(loader))
    assert x.shape == (32, 2, 6, 6)
    pixels = (x * 128 + 127.5).round().to(torch.uint8).numpy()
    seen = set()
    for out, index in zip(pixels, y.tolist()):
        padded = _padded(images[index].numpy(), pad, pad_mode)
        matches = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if np.array_equal(out, (lambda c: c[:, :, ::-1] if flip else c)(padded[:, dy : dy + 6, dx : dx + 6]))
        ]
        assert matches, f"sample {index} is not a crop of its padded image"
        seen.add(matches[0])
    assert len(seen) > 10  # offsets and flips vary across the batch
    assert any(flip for _, _, flip in seen) and any(not flip for _, _, flip in seen)
    assert not torch.equal(x, normalize_pixels(images))


def test_augment_batch_checks_the_pad_mode_and_the_pad():
    # The public augment_batch took any pad_mode it did not know (say "replicate") as zero padding in
    # silence, and a pad past the far edge of the image failed inside gather (on CUDA: a device assert).
    images, _ = make_data(4, side=6)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="invalid pad_mode='replicate': expected one of reflect, symmetric, zeros"):
        augment_batch(images, "crop_flip", generator, pad=2, pad_mode="replicate")
    with pytest.raises(ValueError, match=r"pad = 6 is too large for 6x6 images in reflect mode \(max 5\)"):
        augment_batch(images, "crop_flip", generator, pad=6)
    with pytest.raises(ValueError, match="invalid pad=-1"):
        augment_batch(images, "crop_flip", generator, pad=-1)
    for pad_mode, pad in (("reflect", 5), ("symmetric", 6), ("zeros", 6)):  # the largest pads still work
        assert augment_batch(images, "crop_flip", generator, pad=pad, pad_mode=pad_mode).shape == images.shape
    with pytest.raises(ValueError, match="invalid pad_mode='edge'"):
        DeviceLoader(images, torch.arange(4), 2, augment="crop_flip", pad_mode="edge")


def test_crop_larger_than_small_images_is_a_one_line_error_in_train(tmp_path, capsys):
    # Was a ValueError traceback from `sphereconv train --augment crop_flip` on images of 4 pixels or less.
    Image = pytest.importorskip("PIL.Image")
    for split in ("train", "test"):
        for name in ("a", "b"):
            for i in range(4):
                path = tmp_path / "data" / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((3, 3, 3), 40 * i, np.uint8)).save(path)
    images, _ = make_data(4, side=3)
    with pytest.raises(SphereconvError) as caught:
        DeviceLoader(images, torch.arange(4), 2, augment="crop_flip")
    assert isinstance(caught.value, ValueError)  # still what the Python API documents
    argv = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--augment", "crop_flip"]
    argv += [
        "--iterations",
        "1",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "pad = 4 is too large for 3x3 images" in err and "--image-size" in err and "'flip'" in err
    assert not (tmp_path / "run").exists()


def test_flip_flips_about_half_and_nothing_else():
    images, labels = make_data(64)
    x, y = next(iter(DeviceLoader(images, labels, 64, shuffle=False, augment="flip", seed=1)))
    original = normalize_pixels(images)
    flipped = [torch.equal(x[i], original[i].flip(2)) for i in range(64)]
    kept = [torch.equal(x[i], original[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 16 <= sum(flipped) <= 48 and sum(kept) >= 16


def test_augmentation_differs_between_epochs():
    images, labels = make_data(16)
    loader = DeviceLoader(images, labels, 16, shuffle=False, augment="crop_flip")
    first, second = next(iter(loader)), next(iter(loader))
    assert torch.equal(first[1], second[1]) and not torch.equal(first[0], second[0])


def test_invalid_arguments_name_the_value():
    images, labels = make_data()
    with pytest.raises(ValueError, match="invalid augment='mixup': expected one of none, flip, crop_flip"):
        DeviceLoader(images, labels, 8, augment="mixup")
    with pytest.raises(ValueError, match=r"invalid rank=2: expected an integer in \[0, world_size = 2\)"):
        DeviceLoader(images, labels, 8, rank=2, world_size=2)
    with pytest.raises(TypeError, match="images must be a uint8 tensor"):
        DeviceLoader(images.float(), labels, 8)
    with pytest.raises(ValueError, match="invalid batch_size=0: expected a positive integer"):
        DeviceLoader(images, labels, 0)
    with pytest.raises(ValueError, match="no batches"):
        DeviceLoader(images, labels, 64, drop_last=True)
    with pytest.raises(ValueError, match="pad = 8 is too large"):
        DeviceLoader(images, labels, 8, augment="crop_flip", pad=8)


def test_subset_is_stratified_seeded_and_ordered():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)[
        torch.randperm(100, generator=torch.Generator().manual_seed(0))
    ]
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 2, 2).contiguous()
    sub_x, sub_y = subset(images, labels, 20, seed=1)
    assert sub_y.bincount().tolist() == [12, 6, 2]
    ids = sub_x[:, 0, 0, 0].long()
    assert torch.equal(labels[ids], sub_y) and torch.all(ids[1:] > ids[:-1])
    again_x, _ = subset(images, labels, 20, seed=1)
    other_x, _ = subset(images, labels, 20, seed=2)
    assert torch.equal(again_x, sub_x) and not torch.equal(other_x, sub_x)
    _, random_y = subset(images, labels, 30, seed=3, stratified=False)
    assert random_y.numel() == 30
    with pytest.raises(ValueError, match="n = 101 exceeds the 100 samples"):
        subset(images, labels, 101)
