"""The training loop on real Fashion-MNIST subsets: run files, skipped non-finite steps, divergence,
signals, out-of-memory, refusing to overwrite or to resume a different model, evaluation."""

from __future__ import annotations

import json
import math
import os
import signal
import warnings

import pytest
import torch
import yaml
from engine_helpers import tiny_overrides

from cli_helpers import METRIC_KEYS, SUMMARY_KEYS
from sphereconv.data import load_dataset
from sphereconv.engine import Callback, config_to_dict, evaluate, load_config, train
from sphereconv.engine import loaders as loaders_module
from sphereconv.engine import trainer as trainer_module
from sphereconv.engine.checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint, save_checkpoint
from sphereconv.engine.distributed import DistributedContext
from sphereconv.errors import CheckpointError, ConfigError, SphereconvError, TrainingDivergedError

_CACHE: dict = {}


@pytest.fixture(autouse=True)
def cached_dataset(monkeypatch):
    """Read each real Fashion-MNIST split once per test session (the files are verified each read)."""

    def cached(name, split, data_dir=None, download=False, **kwargs):
        key = (name, split, data_dir)
        if key not in _CACHE:
            _CACHE[key] = load_dataset(name, split, data_dir, download, **kwargs)
        return _CACHE[key]

    monkeypatch.setattr(loaders_module, "load_dataset", cached)


def _config(tmp_path, **extra):
    return load_config(None, tiny_overrides(tmp_path / "run", **extra))


def _state_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_run_writes_config_metrics_summary_and_checkpoints(tmp_path):
    config = _config(tmp_path, tensorboard=True)
    summary = train(config)
    out = tmp_path / "run"
    assert yaml.safe_load((out / "config.yaml").read_text()) == config_to_dict(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [6, 12]
    assert all(METRIC_KEYS <= r.keys() for r in records)
    assert records[0]["epoch"] == pytest.approx(6 / 8)  # 256 images / 32 = 8 steps per epoch
    assert all(0.0 <= r["test_acc"] <= 1.0 and math.isfinite(r["train_loss"]) for r in records)
    written = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= written.keys() and written == json.loads(json.dumps(summary))
    assert summary["final_test_acc"] == records[-1]["test_acc"]
    assert summary["best_test_acc"] == max(r["test_acc"] for r in records)
    assert summary["steps"] == 12 and summary["skipped_steps"] == 0 and summary["interrupted"] is None
    assert [s for s, _ in list_checkpoints(checkpoint_dir(out))] == [6, 12]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # evaluate() rebuilds the model from the checkpoint and reproduces the final test accuracy.
    result = evaluate(checkpoint_dir(out) / "step_00000012.pt", subset_size=200, device="cpu")
    assert result["accuracy"] == pytest.approx(summary["final_test_acc"])
    assert result["images"] == 200 and result["step"] == 12
    with pytest.raises(CheckpointError):
        evaluate(out / "config.yaml")
    # A checkpoint written on a GPU machine (device and precision absent here) still evaluates.
    state = load_checkpoint(checkpoint_dir(out) / "step_00000012.pt")
    state["config"].update(device="cuda:0", amp="fp16")
    moved = save_checkpoint({k: v for k, v in state.items() if k != "step"}, tmp_path / "gpu", 12, keep=1)
    assert evaluate(moved, subset_size=200, device="cpu")["accuracy"] == result["accuracy"]


def test_epochs_become_iterations(tmp_path):
    summary = train(_config(tmp_path, iterations=None, epochs=1.5, eval_every=0, checkpoint_every=0))
    assert summary["steps"] == 12 and summary["epochs"] == 1.5


def test_existing_run_is_not_overwritten_silently(tmp_path):
    train(_config(tmp_path, iterations=2, eval_every=0))
    with pytest.raises(ConfigError, match="already holds a training run.*--resume.*--overwrite"):
        train(_config(tmp_path, iterations=2))
    summary = train(_config(tmp_path, iterations=3, eval_every=0, overwrite=True))
    assert summary["steps"] == 3
    assert [s for s, _ in list_checkpoints(checkpoint_dir(tmp_path / "run"))] == [3]


class PoisonBatches(Callback):
    """Replace the images of the given steps by NaN and record model state around them."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    def on_train_start(self, trainer):
        self.trainer = trainer

    def on_batch(self, step, images, labels):
        if step in self.steps:
            self.before[step] = {
                **_state_copy(self.trainer.model),
                **{f"opt.{k}": v for k, v in _optimizer_tensors(self.trainer.optimizer).items()},
            }
            return torch.full_like(images, float("nan")), labels
        return None

    def on_step_end(self, step, info):
        if step in self.steps:
            self.after[step] = {
                **_state_copy(self.trainer.model),
                **{f"opt.{k}": v for k, v in _optimizer_tensors(self.trainer.optimizer).items()},
            }
            assert info["skipped"]


def _optimizer_tensors(optimizer):
    return {f"{i}.{k}": v.clone() for i, state in optimizer.state.items() for k, v in state.items()}


def test_nonfinite_step_is_skipped_and_leaves_weights_untouched(tmp_path):
    poison = PoisonBatches({3})
    summary = train(_config(tmp_path), [poison])
    before, after = poison.before[3], poison.after[3]
    assert before.keys() == after.keys() and any("running_mean" in k for k in before)
    for key in before:  # weights, BatchNorm statistics and Adam moments all unchanged
        assert torch.equal(before[key], after[key]), key
    assert summary["skipped_steps"] == 1 and summary["steps"] == 12
    assert math.isfinite(summary["final_test_loss"])
    state = load_checkpoint(checkpoint_dir(tmp_path / "run") / "step_00000012.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_a_skipped_first_step_gives_no_scheduler_warning(tmp_path):
    """The schedule advances on a skipped step; torch's "scheduler before optimizer" warning, which
    a skipped first step would raise, is not the user's mistake and must not reach them."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = train(_config(tmp_path), [PoisonBatches({1})])
    assert summary["skipped_steps"] == 1 and summary["steps"] == 12


def test_persistent_nonfinite_steps_stop_with_a_clear_message(tmp_path):
    with pytest.raises(TrainingDivergedError) as info:
        train(_config(tmp_path, max_nonfinite_steps=3), [PoisonBatches(range(8, 13))])
    message = str(info.value)
    assert "diverged at step 10" in message and "3 consecutive steps" in message
    assert "lr=0.001" in message and "step_00000006.pt" in message and "\n" not in message
    # The last good checkpoint is the newest and loads with finite weights.
    steps = [s for s, _ in list_checkpoints(checkpoint_dir(tmp_path / "run"))]
    assert steps == [6]
    state = load_checkpoint(checkpoint_dir(tmp_path / "run") / "step_00000006.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


class SendSignal(Callback):
    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_step_end(self, step, info):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_checkpoints_and_resume_finishes_identically(tmp_path, signum):
    reference = train(_config(tmp_path / "reference"))
    previous = signal.getsignal(signum)
    interrupted = train(_config(tmp_path), [SendSignal(3, signum)])
    assert signal.getsignal(signum) is previous  # handlers restored
    assert interrupted["interrupted"] == signal.Signals(signum).name
    stopped = interrupted["steps"]
    assert 3 <= stopped < 12
    out = tmp_path / "run"
    assert [s for s, _ in list_checkpoints(checkpoint_dir(out))] == [stopped]
    assert not (out / "summary.json").exists()
    resumed = train(_config(tmp_path, resume=True))
    assert resumed["steps"] == 12 and resumed["final_test_acc"] == reference["final_test_acc"]
    expected = load_checkpoint(checkpoint_dir(tmp_path / "reference" / "run") / "step_00000012.pt")["model"]
    actual = load_checkpoint(checkpoint_dir(out) / "step_00000012.pt")["model"]
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_resume_of_a_different_model_is_refused(tmp_path):
    train(_config(tmp_path, iterations=6))
    with pytest.raises(CheckpointError) as info:
        train(_config(tmp_path, iterations=6, resume=True, width_mult=0.125, operator="linear"))
    message = str(info.value)
    assert "different model" in message and "width_mult=0.0625 there but 0.125 here" in message
    assert "\n" not in message


def test_image_folder_changed_after_training_is_refused_naming_the_difference(tmp_path):
    """The classes and image size of a folder come from its contents: a checkpoint records them, so a
    renamed class (same count: labels would silently mean other classes) or a new image size is a
    one-line error in eval, export and resume instead of a wrong result or a shape mismatch."""
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "images"
    rng = torch.Generator().manual_seed(0)
    for name in ("cat", "dog"):
        for split, count in (("train", 4), ("test", 2)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=rng).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    overrides = dict(dataset="folder", data_dir=str(root), train_subset=None, test_subset=None, batch_size=4)
    train(load_config(None, tiny_overrides(tmp_path / "run", **overrides, iterations=2, eval_every=0)))
    checkpoint = list_checkpoints(checkpoint_dir(tmp_path / "run"))[-1][1]
    assert evaluate(checkpoint, device="cpu")["images"] == 4
    for split in ("train", "test"):
        (root / split / "dog").rename(root / split / "fox")
    with pytest.raises(CheckpointError, match="other data.*class 1 'dog' there but 'fox' here"):
        evaluate(checkpoint, device="cpu")
    resumed = tiny_overrides(tmp_path / "run", **overrides, iterations=4, eval_every=0, resume=True)
    with pytest.raises(CheckpointError, match="class 1 'dog' there but 'fox' here"):
        train(load_config(None, resumed))
    for split in ("train", "test"):
        (root / split / "fox").rename(root / split / "dog")
    Image.fromarray(torch.zeros(12, 12, 3, dtype=torch.uint8).numpy()).save(root / "train" / "cat" / "big.png")
    with pytest.raises(CheckpointError, match="image_size=8 there but 32 here"):
        evaluate(checkpoint, device="cpu")


def test_lengthened_resume_is_unfinished_until_it_completes(tmp_path):
    class CrashAtStep(Callback):
        def on_step_end(self, step, info):
            if step == 6:
                raise RuntimeError("crash at step 6")

    summary_path = tmp_path / "run" / "summary.json"
    train(_config(tmp_path, iterations=4, eval_every=2, checkpoint_every=2))
    assert json.loads(summary_path.read_text())["steps"] == 4
    # Lengthened and stopped halfway: the 4-step summary no longer describes the run.
    with pytest.raises(RuntimeError, match="crash at step 6"):
        train(_config(tmp_path, iterations=8, eval_every=2, checkpoint_every=2, resume=True), [CrashAtStep()])
    assert not summary_path.exists()
    train(_config(tmp_path, iterations=8, eval_every=2, checkpoint_every=2, resume=True))
    assert json.loads(summary_path.read_text())["steps"] == 8
    # A resume of the finished run (nothing left to train) rewrites the summary.
    assert train(_config(tmp_path, iterations=8, eval_every=2, checkpoint_every=2, resume=True))["steps"] == 8
    assert json.loads(summary_path.read_text())["steps"] == 8


def test_resume_without_checkpoint_starts_at_zero(tmp_path, caplog):
    summary = train(_config(tmp_path, iterations=3, eval_every=0, resume=True))
    assert summary["steps"] == 3
    assert "no checkpoint" in caplog.text


def test_out_of_memory_names_the_batch_size(tmp_path):
    class ExhaustMemory(Callback):
        def on_train_start(self, trainer):
            def forward(images):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

            trainer.model.forward = forward

    with pytest.raises(SphereconvError) as info:
        train(_config(tmp_path), [ExhaustMemory()])
    message = str(info.value)
    assert "out of memory during training with batch size 32" in message
    assert "--batch-size" in message and "--amp bf16" in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


class RecordSetup(Callback):
    """What the trainer built, and the precision and layout its convolutions ran in."""

    def on_train_start(self, trainer):
        self.trainer = trainer
        self.convolutions = []
        for layer in trainer.model.modules():
            if isinstance(layer, torch.nn.Conv2d):
                layer.register_forward_pre_hook(self._record)

    def _record(self, layer, args):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self.convolutions.append(dtype)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            {"amp": "bf16", "channels_last": True, "loss": "cosface", "optimizer": "adamw", "schedule": "cosine"},
            ("CosFaceLoss", torch.optim.AdamW, torch.optim.lr_scheduler.CosineAnnealingLR, torch.bfloat16, True),
        ),
        (
            {
                "operator": "none",
                "loss": "a_softmax",
                "optimizer": "sgd",
                "lr": 0.01,
                "schedule": "onecycle",
                "augment": "flip",
                "grad_clip": 1.0,
                "label_smoothing": 0.1,
            },
            ("ASoftmaxLoss", torch.optim.SGD, torch.optim.lr_scheduler.OneCycleLR, None, False),
        ),
    ],
)
def test_options_train_to_finite_results(tmp_path, overrides, expected):
    loss_name, optimizer_type, scheduler_type, amp_dtype, channels_last = expected
    setup = RecordSetup()
    summary = train(_config(tmp_path, iterations=4, eval_every=0, **overrides), [setup])
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert math.isfinite(summary["final_test_loss"]) and math.isfinite(summary["final_train_loss"])
    # The options reached the run: loss, optimizer, schedule, precision and memory layout.
    trainer = setup.trainer
    assert type(trainer.loss_module).__name__ == loss_name
    assert type(trainer.optimizer) is optimizer_type and type(trainer.scheduler) is scheduler_type
    assert setup.convolutions and set(setup.convolutions) == {amp_dtype}  # training steps and evaluation
    wide = [m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert wide and all(w.is_contiguous(memory_format=torch.channels_last) is channels_last for w in wide)


def test_bad_model_options_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="cannot build model='spherenet9'.*no_such_option"):
        train(_config(tmp_path, model_kwargs={"no_such_option": 1}))
    with pytest.raises(ConfigError, match="cannot build loss='ga_softmax'.*wings"):
        train(_config(tmp_path, loss="ga_softmax", loss_kwargs={"wings": 2}))
    with pytest.raises(ConfigError, match="train_subset=70000 exceeds the 60000"):
        train(_config(tmp_path, train_subset=70000))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_one_image_per_process_with_batch_norm_is_refused_before_any_work(tmp_path, monkeypatch):
    # Two data-parallel processes as torchrun would set them up (rank 0 of 2; no process group is
    # needed for the check): a global batch of 2 leaves one image per process, which BatchNorm
    # cannot train on.
    monkeypatch.setattr(trainer_module, "setup_distributed", lambda device: DistributedContext(world_size=2))
    with pytest.raises(ConfigError, match=r"batch_size=2 leaves 1 image per process over the 2 data-parallel") as error:
        train(_config(tmp_path, batch_size=2))
    assert "raise batch_size to at least 4" in str(error.value)
    assert not (tmp_path / "run").exists()


def test_resume_on_another_number_of_processes_names_the_number_to_use(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(_config(tmp_path, iterations=4, eval_every=0, checkpoint_every=2))
    before = sorted(p.name for p in out.rglob("*"))
    # Rank 0 of two processes as torchrun would start them (no process group needed to get there).
    monkeypatch.setattr(trainer_module, "setup_distributed", lambda device: DistributedContext(world_size=2))
    with pytest.raises(CheckpointError, match=r"step_00000004\.pt' was written by a run of 1 data-parallel") as info:
        train(_config(tmp_path, iterations=6, eval_every=0, checkpoint_every=2, resume=True))
    assert "resume it with 1 (torchrun --nproc_per_node 1, or without torchrun)" in str(info.value)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.parametrize("bn_momentum, warned", [(0.001, True), (None, False)])
def test_short_run_with_reference_batch_norm_momentum_warns(tmp_path, caplog, bn_momentum, warned):
    kwargs = {} if bn_momentum is None else {"bn_momentum": bn_momentum}
    train(_config(tmp_path, iterations=2, eval_every=0, **kwargs))
    assert ("BatchNorm momentum" in caplog.text) is warned
