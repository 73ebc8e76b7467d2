"""An in-memory, on-device data loader with per-batch augmentation, DDP sharding and exact resume.

Small datasets (MNIST, Fashion-MNIST, CIFAR: at most 150 MB as uint8) fit on any accelerator, so
they are kept there as uint8 tensors; each batch is indexed, augmented (:mod:`.augment`) and scaled
to float on the device, as in the reference recipe of Liu et al. 2017 (Sec. 5, wy1iu/SphereNet):
``x = (pixel - 127.5) / 128``, which maps [0, 255] into [-0.996, 0.996].

Randomness is a pure function of ``(seed, epoch)`` for the data order and of
``(seed, epoch, rank, batch index)`` for the augmentation, each derived through
``numpy.random.SeedSequence``. So the state of a loader is just ``(epoch, batch position)``: a
resumed loader continues with exactly the batches the interrupted one would have produced, and no
random-number generator state needs saving.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from .._validation import check_choice, check_int, fail
from .augment import AUGMENTATIONS, DEFAULT_CROP_PAD, augment_batch, check_crop

# Input scaling of the reference code (wy1iu/SphereNet): (pixel - 127.5) / 128.
PIXEL_CENTER = 127.5
PIXEL_SCALE = 128.0
# Tags that keep the permutation and augmentation random streams apart.
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1
# Version of the state_dict layout.
_STATE_VERSION = 1


def normalize_pixels(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Scale uint8 pixels to floats as the reference code does: ``(p - 127.5) / 128``."""
    return (images.to(dtype) - PIXEL_CENTER) / PIXEL_SCALE


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing the non-negative integers ``parts`` (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def subset(images: Tensor, labels: Tensor, n: int, seed: int = 0, *, stratified: bool = True) -> tuple[Tensor, Tensor]:
    """Select ``n`` samples, reproducibly for a given ``seed``, keeping their original order.

    ``stratified=True`` keeps the class proportions: the samples are shuffled, each gets its rank
    ``r`` within its class and the key ``(r + 1/2) / class size``, and the ``n`` smallest keys are
    kept, so every class contributes ``n * class size / N`` samples up to rounding.
    ``stratified=False`` takes a seeded random sample.
    """
    total = labels.shape[0]
    n = check_int("n", n, minimum=1)
    if n > total:
        raise ValueError(f"n = {n} exceeds the {total} samples available")
    if images.shape[0] != total:
        raise ValueError(f"images has {images.shape[0]} samples but labels has {total}")
    generator = torch.Generator().manual_seed(derive_seed(check_int("seed", seed, minimum=0)))
    order = torch.randperm(total, generator=generator)
    if stratified:
        shuffled = labels.cpu()[order]
        _, inverse, counts = torch.unique(shuffled, return_inverse=True, return_counts=True)
        sorted_classes, by_class = torch.sort(inverse, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty(total, dtype=torch.long)
        rank[by_class] = torch.arange(total) - starts[sorted_classes]
        key = (rank.double() + 0.5) / counts[inverse].double()
        chosen = order[torch.sort(key, stable=True).indices[:n]]
    else:
        chosen = order[:n]
    chosen = chosen.sort().values.to(labels.device)
    return images[chosen.to(images.device)], labels[chosen]


class DeviceLoader:
    """Batches of an in-memory dataset kept on ``device``; see the module docstring.

    Args:
        images: uint8 tensor ``(N, C, H, W)``; moved to ``device`` once.
        labels: integer tensor ``(N,)``.
        batch_size: images per batch on this rank.
        device: where the data live and batches are produced.
        shuffle: a new permutation of the data every epoch (else the stored order).
        augment: ``none``, ``flip`` (random horizontal flip) or ``crop_flip`` (pad ``pad`` pixels in
            ``pad_mode``, random crop to the original size, random flip).
        drop_last: drop the last incomplete batch of each epoch.
        seed: non-negative seed of the data order and the augmentation.
        rank: index of this process among the ``world_size`` data-parallel ranks.
        world_size: number of data-parallel ranks. Every rank computes the same epoch permutation;
            with ``even_shards=True`` rank ``r`` takes the slice ``[r*m, (r+1)*m)`` with
            ``m = N // world_size`` (the last ``N mod world_size`` samples of the permutation are
            left out that epoch), so all ranks run the same number of steps; with
            ``even_shards=False`` rank ``r`` takes every ``world_size``-th sample starting at ``r``,
            covering all samples with shard sizes differing by at most one (for evaluation).
        dtype: floating dtype of the produced images.

    Iterating yields ``(images, labels)`` for the rest of the current epoch, then advances the
    epoch; :meth:`batches_forever` never stops (for iteration-based training). ``len()`` is the
    number of batches per epoch on this rank.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        shuffle: bool = True,
        augment: str = "none",
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool = True,
        pad: int = DEFAULT_CROP_PAD,
        pad_mode: str = "reflect",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(
                f"images must be a uint8 tensor of shape (N, C, H, W); got "
                f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}"
            )
        if (
            not isinstance(labels, Tensor)
            or labels.dim() != 1
            or labels.dtype.is_floating_point
            or labels.dtype == torch.bool
        ):
            raise TypeError(
                f"labels must be a 1-d integer tensor; got {getattr(labels, 'dtype', type(labels).__name__)}"
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"images has {images.shape[0]} samples but labels has {labels.shape[0]}")
        augment = check_choice("augment", augment, AUGMENTATIONS)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self.world_size = check_int("world_size", world_size, minimum=1)
        self.rank = check_int("rank", rank, minimum=0)
        if self.rank >= self.world_size:
            raise fail("rank", self.rank, f"an integer in [0, world_size = {self.world_size})")
        height, width = images.shape[2:]
        # The size limit concerns the crop only; without it any pad is stored unused.
        _, pad_mode = check_crop(pad if augment == "crop_flip" else 0, pad_mode, height, width)
        self.pad = check_int("pad", pad, minimum=0)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype; got {dtype}")
        self.device = torch.device(device)
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.drop_last = bool(drop_last)
        self.even_shards = bool(even_shards)
        self.pad_mode = pad_mode
        self.dtype = dtype
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.long)
        self.dataset_size = images.shape[0]
        if self.even_shards:
            self.num_samples = self.dataset_size // self.world_size
        else:
            self.num_samples = len(range(self.rank, self.dataset_size, self.world_size))
        if len(self) == 0:
            raise ValueError(
                f"no batches: {self.num_samples} samples on rank {self.rank} with batch_size {self.batch_size} "
                f"and drop_last={self.drop_last}"
            )
        self._generator = torch.Generator(device=self.device)
        self._epoch = 0
        self._position = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch + 1 if self._position >= len(self) else self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next batch come from ``epoch`` (like ``DistributedSampler.set_epoch``).

        If the loader is already inside ``epoch`` (e.g. right after :meth:`load_state_dict`), it keeps
        its position, so an epoch loop that calls ``set_epoch`` still resumes mid-epoch; any other
        epoch starts from its first batch. Calling it is optional: iterating advances the epoch.
        """
        epoch = check_int("epoch", epoch, minimum=0)
        if epoch != self._epoch or self._position >= len(self):
            self._epoch, self._position = epoch, 0

    def epoch_indices(self, epoch: int) -> Tensor:
        """Indices (on ``device``) of this rank's samples in ``epoch``, in batch order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, _ORDER_STREAM, epoch))
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        if self.even_shards:
            shard = order[self.rank * self.num_samples : (self.rank + 1) * self.num_samples]
        else:
            shard = order[self.rank :: self.world_size]
        return shard.to(self.device)

    def _batch(self, indices: Tensor, epoch: int, batch_index: int) -> tuple[Tensor, Tensor]:
        batch_ids = indices[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
        # index_select on the (N, C*H*W) view is several times faster than indexing the 4-d tensor.
        images = self.images.view(self.dataset_size, -1).index_select(0, batch_ids).view(-1, *self.images.shape[1:])
        if self.augment != "none":
            self._generator.manual_seed(derive_seed(self.seed, _AUGMENT_STREAM, epoch, self.rank, batch_index))
            images = augment_batch(images, self.augment, self._generator, self.pad, self.pad_mode)
        return normalize_pixels(images, self.dtype), self.labels.index_select(0, batch_ids)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._position >= len(self):
            self._epoch, self._position = self._epoch + 1, 0
        epoch = self._epoch
        indices = self.epoch_indices(epoch)
        for batch_index in range(self._position, len(self)):
            # Count the batch as consumed before handing it out, so a checkpoint written after the
            # training step on it resumes with the next one.
            self._position = batch_index + 1
            yield self._batch(indices, epoch, batch_index)
        self._epoch, self._position = epoch + 1, 0

    def batches_forever(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield batches epoch after epoch without end (for training by iteration count)."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        """Position in the data stream: ``epoch`` and ``batch`` (batches of it already handed out).

        Also records ``seed``, ``dataset_size``, ``batch_size``, ``world_size`` and ``shuffle`` so a
        mismatched resume is caught. Only plain ints and bools: loadable with ``weights_only=True``.
        """
        epoch, position = self._epoch, self._position
        if position >= len(self):
            epoch, position = epoch + 1, 0
        return {
            "version": _STATE_VERSION,
            "epoch": epoch,
            "batch": position,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`; the next batch is the one the saved loader would yield next.

        The saved ``seed`` is adopted. A different dataset size, batch size, world size or shuffle
        setting would change the data order, so it raises ``ValueError`` naming the setting.
        """
        required = ("epoch", "batch", "seed", "dataset_size", "batch_size", "world_size", "shuffle")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {', '.join(missing)}; expected a DeviceLoader.state_dict()")
        # world_size first: a run resumed on another number of processes also has another batch
        # size per process, and the number of processes is the setting that changed.
        current = {
            "world_size": self.world_size,
            "dataset_size": self.dataset_size,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
        }
        for key, value in current.items():
            if state[key] != value:
                raise ValueError(
                    f"cannot resume the data order: the saved loader had {key}={state[key]!r}, this one has "
                    f"{key}={value!r}"
                )
        batch = check_int("batch", state["batch"], minimum=0)
        if batch > len(self):
            raise ValueError(f"saved batch position {batch} exceeds the {len(self)} batches per epoch")
        self.seed = check_int("seed", state["seed"], minimum=0)
        self._epoch = check_int("epoch", state["epoch"], minimum=0)
        self._position = batch
