"""Per-batch data augmentation on the device, vectorised over the batch.

The reference recipe (Liu et al. 2017, Sec. 5; wy1iu/SphereNet) uses random horizontal flips for
CIFAR-10 and, for CIFAR-10+, padding by 4 pixels plus a random crop back to the original size plus
a random flip. Both are done here on whole uint8 batches at once: every output pixel is gathered
from the input through per-image row and column index maps, so one ``torch.gather`` performs the
padding, the crop and the flip of a whole batch without a Python loop over images.

Padding modes: ``reflect`` mirrors without repeating the edge pixel (``d c b | a b c d``),
``symmetric`` mirrors including it (``c b a | a b c d``), ``zeros`` fills with pixel value 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_choice, check_int
from ..errors import InvalidArgumentError

AUGMENTATIONS = ("none", "flip", "crop_flip")
PAD_MODES = ("reflect", "symmetric", "zeros")
# Padding of the CIFAR-10+ crop augmentation (reference recipe: pad 4, crop 32x32).
DEFAULT_CROP_PAD = 4
# Probability of a horizontal flip.
FLIP_PROBABILITY = 0.5


def max_crop_pad(height: int, width: int, pad_mode: str) -> int:
    """Largest ``pad`` for ``height x width`` images: a mirror must not reach past the far edge.

    ``reflect`` skips the edge pixel, so it folds at most ``size - 1`` pixels; ``symmetric`` repeats
    it and folds ``size``; ``zeros`` reads no pixel, ``size`` keeps the crop overlapping the image.
    """
    return min(height, width) - (1 if pad_mode == "reflect" else 0)


def check_crop(pad: int, pad_mode: str, height: int, width: int) -> tuple[int, str]:
    """Validate ``pad`` and ``pad_mode`` of the crop for ``height x width`` images; ``ValueError`` naming them."""
    pad_mode = check_choice("pad_mode", pad_mode, PAD_MODES)
    pad = check_int("pad", pad, minimum=0)
    max_pad = max_crop_pad(height, width, pad_mode)
    if pad > max_pad:
        # InvalidArgumentError is a ValueError that the command line prints as one line.
        raise InvalidArgumentError(
            f"pad = {pad} is too large for {height}x{width} images in {pad_mode} mode (max {max_pad}); lower pad, "
            "use larger images (image_size, --image-size) or augment 'flip' or 'none'"
        )
    return pad, pad_mode


def _fold_indices(index: Tensor, size: int, pad_mode: str) -> tuple[Tensor, Tensor | None]:
    """Map padded coordinates in ``[-pad, size + pad)`` into ``[0, size)``; also the in-range mask for zeros."""
    if pad_mode == "reflect":
        folded = index.abs()
        return torch.where(folded > size - 1, 2 * (size - 1) - folded, folded), None
    if pad_mode == "symmetric":
        folded = torch.where(index < 0, -index - 1, index)
        return torch.where(folded > size - 1, 2 * size - 1 - folded, folded), None
    inside = (index >= 0) & (index < size)
    return index.clamp(0, size - 1), inside


def gather_pixels(images: Tensor, rows: Tensor, cols: Tensor, pad_mode: str = "reflect") -> Tensor:
    """``out[b, c, i, j] = images[b, c, rows[b, i], cols[b, j]]`` with out-of-range rows/cols padded.

    ``rows`` is ``(B, H_out)`` and ``cols`` ``(B, W_out)``, both integer tensors that may leave the
    image (they are folded back according to ``pad_mode``; for ``zeros`` those pixels become 0).
    """
    batch, channels, height, width = images.shape
    rows, row_inside = _fold_indices(rows, height, pad_mode)
    cols, col_inside = _fold_indices(cols, width, pad_mode)
    flat_index = rows[:, :, None] * width + cols[:, None, :]
    out_h, out_w = flat_index.shape[1:]
    gathered = (
        images.reshape(batch, channels, height * width)
        .gather(2, flat_index.reshape(batch, 1, out_h * out_w).expand(batch, channels, out_h * out_w))
        .reshape(batch, channels, out_h, out_w)
    )
    if row_inside is not None and col_inside is not None:
        inside = row_inside[:, :, None] & col_inside[:, None, :]
        gathered = gathered * inside[:, None].to(gathered.dtype)
    return gathered


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image horizontally with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < FLIP_PROBABILITY
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_crop_flip(
    images: Tensor, generator: torch.Generator, pad: int = DEFAULT_CROP_PAD, pad_mode: str = "reflect"
) -> Tensor:
    """Pad by ``pad`` pixels, crop a random window of the original size, then flip with probability 1/2.

    Each image gets its own offsets ``(dy, dx)`` uniform in ``{0, ..., 2*pad}`` and its own flip.
    ``pad_mode`` is one of ``PAD_MODES``; ``pad`` at most :func:`max_crop_pad` (else ``ValueError``).
    """
    batch, _, height, width = images.shape
    pad, pad_mode = check_crop(pad, pad_mode, height, width)
    device = images.device
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < FLIP_PROBABILITY
    rows = dy[:, None] - pad + torch.arange(height, device=device)
    cols = dx[:, None] - pad + torch.arange(width, device=device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return gather_pixels(images, rows, cols, pad_mode)


def augment_batch(
    images: Tensor, augment: str, generator: torch.Generator, pad: int = DEFAULT_CROP_PAD, pad_mode: str = "reflect"
) -> Tensor:
    """Apply augmentation ``augment`` (one of ``AUGMENTATIONS``) to a batch ``(B, C, H, W)``."""
    if augment == "none":
        return images
    if augment == "flip":
        return random_flip(images, generator)
    if augment == "crop_flip":
        return random_crop_flip(images, generator, pad, pad_mode)
    raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}; got {augment!r}")
