"""A narrow SphereNet-9 trained for a few seconds on real Fashion-MNIST learns: test accuracy far
above both chance (10%) and the same network before training."""

from __future__ import annotations

from engine_helpers import tiny_overrides

from sphereconv.engine import Callback, load_config, train
from sphereconv.engine.objective import evaluate_batches

# Measured on 2 shared CPU cores: 0.813 after 160 steps (25-37 s); chance is 0.10, the
# untrained network about the same.
ACCURACY_THRESHOLD = 0.72


class InitialAccuracy(Callback):
    def on_train_start(self, trainer):
        loss, correct, count = evaluate_batches(trainer.module, trainer.test_loader, trainer.ctx.device).tolist()
        self.accuracy = correct / count


def test_narrow_spherenet9_learns_fashion_mnist(tmp_path):
    overrides = tiny_overrides(
        tmp_path / "run",
        width_mult=0.125,
        train_subset=4000,
        test_subset=1000,
        batch_size=64,
        iterations=160,
        eval_every=0,
        checkpoint_every=0,
        eval_batch_size=500,
        lr_milestones=[0.75],
    )
    initial = InitialAccuracy()
    summary = train(load_config(None, overrides), [initial])
    assert initial.accuracy < 0.3
    assert summary["final_test_acc"] > ACCURACY_THRESHOLD, summary
    assert summary["operator"] == "cosine" and summary["steps"] == 160
