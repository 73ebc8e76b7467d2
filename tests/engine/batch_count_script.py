"""Train under ``torchrun`` and record how many images this rank consumes at every step.

Usage: ``python batch_count_script.py '<overrides as JSON>' OUT_DIR``. Each rank writes
``OUT_DIR/batches_rank<R>.json``: ``{"rank", "world_size", "images_per_step": [...]}``, the sizes of
the batches the trainer handed to its ``on_batch`` hook, one per optimizer step.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from sphereconv.engine import Callback, load_config, train


class CountImages(Callback):
    def __init__(self) -> None:
        self.images_per_step: dict[int, int] = {}

    def on_batch(self, step: int, images, labels) -> None:
        assert images.shape[0] == labels.shape[0]
        self.images_per_step[step] = self.images_per_step.get(step, 0) + int(images.shape[0])


def main() -> None:
    overrides, out_dir = json.loads(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    counter = CountImages()
    train(load_config(None, overrides), [counter])
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    steps = sorted(counter.images_per_step)
    with open(os.path.join(out_dir, f"batches_rank{rank}.json"), "w") as handle:
        json.dump(
            {
                "rank": rank,
                "world_size": world_size,
                "steps": steps,
                "images_per_step": [counter.images_per_step[s] for s in steps],
            },
            handle,
        )


if __name__ == "__main__":
    main()
