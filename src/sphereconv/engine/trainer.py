"""The training loop: :func:`train` runs one :class:`~sphereconv.engine.config.TrainConfig`.

The loop follows the reference recipe of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017,
Sec. 5; wy1iu/SphereNet): it counts optimizer steps (iterations), evaluates the test set every
``eval_every`` steps and at the end, and reports the best and the final test accuracy. Around it:

- data stay on the device (:class:`~sphereconv.data.DeviceLoader`), sharded per data-parallel rank;
- parameter groups with and without weight decay, the learning-rate schedule (:mod:`.optim`) and
  the orthogonality penalty on SphereConv filters;
- autocast (bf16, or fp16 with a gradient scaler), ``torch.compile``, channels-last;
- checkpoints every ``checkpoint_every`` steps and at the end; ``resume`` continues the newest
  intact one with identical model, optimizer, scheduler, RNG and data-order state, under the
  run folder's ownership, lock and resume contract (:mod:`.run_dir`), all checked before any
  file is written;
- a step whose loss or gradient is not finite is skipped (weights, BatchNorm statistics and
  optimizer state untouched) and counted; ``max_nonfinite_steps`` consecutive ones stop the run
  with :class:`~sphereconv.errors.TrainingDivergedError`, leaving the last good checkpoint as the
  newest;
- SIGINT / SIGTERM finish the current step, write a checkpoint and return (``interrupted`` in the
  returned summary); a second signal aborts at once;
- CUDA out-of-memory becomes a :class:`~sphereconv.errors.SphereconvError` naming the batch size.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import signal
import threading
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import DeviceLoader, dataset_info, load_dataset, subset
from ..errors import CheckpointError, ConfigError, SphereconvError, TrainingDivergedError
from ..losses import orthogonality_penalty
from ..models import BN_MOMENTUM
from .checkpoint import (
    EXCERPT_CHARS,
    capture_rng_state,
    check_config_compatible,
    find_latest_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from .config import TrainConfig, config_to_dict
from .distributed import DistributedContext, is_peer_failure, setup_distributed
from .objective import TrainingModule, autocast, build_loss_module, build_model, evaluate_batches
from .optim import build_optimizer, build_scheduler, parameter_groups
from .run_dir import RunDirectory

# A run should last several BatchNorm memories (1/momentum steps) for its running statistics to settle.
BN_SETTLE_MEMORIES = 5

logger = logging.getLogger(__name__)

# Training subsets are drawn (stratified) with a fixed seed so that runs with different training
# seeds see the same images and differ only in initialisation, order and augmentation.
SUBSET_SEED = 0
# Steps between refreshes of the progress bar's loss / accuracy / images-per-second.
PROGRESS_REFRESH_STEPS = 10
# Signals that ask a run to checkpoint and stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Schedules whose shape is defined by the run's length: a resume cannot change that length.
LENGTH_DEFINED_SCHEDULES = ("cosine", "onecycle")


class Callback:
    """Hooks into :func:`train`; override any subset of the methods (all no-ops here).

    ``on_batch`` may return a replacement ``(images, labels)`` for the step about to run.
    """

    def on_train_start(self, trainer: "Trainer") -> None:
        """Called once the model, optimizer and data are ready (and state is resumed)."""

    def on_batch(self, step: int, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor] | None:
        """Called before step ``step`` (1-based) with its batch."""
        return None

    def on_step_end(self, step: int, info: dict[str, Any]) -> None:
        """Called after step ``step`` with ``loss``, ``skipped`` and ``lr``."""

    def on_evaluate(self, step: int, record: dict[str, Any]) -> None:
        """Called after each evaluation with the record written to ``metrics.jsonl``."""

    def on_checkpoint(self, step: int, path: Any) -> None:
        """Called after a checkpoint was written (rank 0) or would have been (other ranks: ``None``)."""

    def on_train_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None:
        """Called with the summary when the run ends (completed or interrupted)."""


class StopSignals:
    """Context manager: the first SIGINT/SIGTERM sets :attr:`received`; a second aborts at once.

    Handlers are installed only in the main thread (Python allows no other) and restored on exit.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            self.__exit__(None, None, None)
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")
        self.received = signum
        logger.warning("received %s: finishing the current step, writing a checkpoint and stopping "
                       "(send it again to abort at once)", signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fresh_progress() -> dict[str, Any]:
    # Counters a resumed run continues; plain Python numbers so they survive weights_only loading.
    return {
        "skipped_steps": 0,          # steps skipped for a non-finite loss or gradient, in total
        "consecutive_nonfinite": 0,  # length of the current run of skipped steps
        "window_loss": 0.0,          # sum over the evaluation window of loss * images
        "window_correct": 0.0,       # correct training predictions in the window
        "window_images": 0.0,        # images of the non-skipped steps in the window
        "window_seconds": 0.0,       # training time (no evaluation) of the window
        "window_steps_images": 0.0,  # images of all steps in the window (for images/s)
        "seconds": 0.0,              # wall time of the run so far
        "train_seconds": 0.0,        # time in training steps so far
        "images_seen": 0.0,          # images of all steps so far
        "best_test_acc": None,
        "best_step": None,
        "last_eval": None,           # the latest metrics record
    }


class Trainer:
    """One training run; see :func:`train`. Attributes are available to callbacks."""

    def __init__(self, config: TrainConfig, callbacks: Sequence[Callback] = ()) -> None:
        self.config = config
        self.callbacks = list(callbacks)
        if config.layer_stats_every:
            from .layer_stats import LayerStatsRecorder

            self.callbacks.append(LayerStatsRecorder(config.layer_stats_every))
        self.ctx: DistributedContext | None = None
        self.model: nn.Module | None = None
        self.loss_module: nn.Module | None = None
        self.module: TrainingModule | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.scaler: torch.GradScaler | None = None
        self.train_loader: DeviceLoader | None = None
        self.test_loader: DeviceLoader | None = None
        self.step = 0
        self.total_steps = 0
        self.steps_per_epoch = 1
        self.num_classes = 0
        self.progress = _fresh_progress()
        self.last_checkpoint: Any = None
        self.phase = "setup"
        self._signals = StopSignals()
        self._bar = None
        self._run_dir: RunDirectory | None = None

    # -- public --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Set up, train, evaluate; return the summary. Always releases the process group."""
        try:
            self.ctx = setup_distributed(self.config.device)
            with self._signals:
                return self._run()
        except torch.OutOfMemoryError as exc:
            raise SphereconvError(self._oom_message()) from exc
        except Exception as exc:
            if self.ctx is not None and self.ctx.enabled and is_peer_failure(exc):
                first_line = " ".join(str(exc).split())[:EXCERPT_CHARS]
                raise SphereconvError(
                    f"rank {self.ctx.rank} lost contact with another data-parallel rank during {self.phase} "
                    f"({first_line}); another process probably died: check its log") from exc
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
            if self._run_dir is not None:
                self._run_dir.close()
            if self.ctx is not None:
                self.ctx.close()

    @property
    def per_rank_batch_size(self) -> int:
        world = self.ctx.world_size if self.ctx else 1
        return self.config.batch_size // world

    # -- setup ---------------------------------------------------------------------------------
    def _run(self) -> dict[str, Any]:
        cfg, ctx = self.config, self.ctx
        if cfg.batch_size % ctx.world_size:
            raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the {ctx.world_size} "
                              "data-parallel processes (it is the global batch size)")
        run_dir = self._run_dir = RunDirectory(cfg.out, writable=ctx.is_main)
        # Rank 0 owns the folder: it locks it before checking it. Nothing is written before every
        # check (ownership, resume contract, checkpoint) has passed.
        if ctx.is_main:
            run_dir.lock()
        run_dir.check_start(cfg)
        if cfg.resume:
            run_dir.check_resume(cfg)
        seed_everything(cfg.seed)
        info = dataset_info(cfg.dataset, cfg.data_dir, image_size=cfg.image_size)
        self._build_data()  # first: the run's length (total_steps) sets the loss's annealing
        self._build_model(info)
        self._build_optimization()
        resume_state = self._find_resume_state(run_dir)
        run_dir.begin(cfg, self.step)  # writes on rank 0 only
        if ctx.is_main:
            if cfg.resume:
                run_dir.truncate_metrics(self.step)
            if cfg.tensorboard:
                run_dir.open_tensorboard(self.step)
        ctx.barrier()
        if resume_state is not None:
            restore_rng_state(resume_state["rng"])
        net = self._wrap_for_training()
        for callback in self.callbacks:
            callback.on_train_start(self)
        return self._loop(net, run_dir)

    def _build_model(self, info) -> None:
        cfg, device = self.config, self.ctx.device
        model = build_model(cfg, info.num_classes, info.in_channels, info.image_size)
        loss_module = build_loss_module(cfg, model, info.num_classes, self.total_steps)
        model.to(device)
        if loss_module is not None:
            loss_module.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model, self.loss_module = model, loss_module
        self.module = TrainingModule(model, loss_module, cfg.label_smoothing if loss_module is None else 0.0)
        self.num_classes = info.num_classes

    def _load_split(self, split: str, limit: int | None) -> tuple[Tensor, Tensor]:
        cfg = self.config
        images, labels = load_dataset(cfg.dataset, split, cfg.data_dir, cfg.download, image_size=cfg.image_size,
                                      progress=cfg.progress and self.ctx.is_main)
        if limit is not None:
            if limit > labels.shape[0]:
                key = "train_subset" if split == "train" else "test_subset"
                raise ConfigError(f"{key}={limit} exceeds the {labels.shape[0]} {split} images of {cfg.dataset}")
            images, labels = subset(images, labels, limit, SUBSET_SEED)
        return images, labels

    def _build_data(self) -> None:
        cfg, ctx = self.config, self.ctx
        # Rank 0 reads (and, if allowed, downloads) first; the others wait so that no two processes
        # download the same files at once.
        if ctx.enabled and not ctx.is_main:
            ctx.barrier()
        train_images, train_labels = self._load_split("train", cfg.train_subset)
        test_images, test_labels = self._load_split("test", cfg.test_subset)
        if ctx.enabled and ctx.is_main:
            ctx.barrier()
        needed = self.per_rank_batch_size * ctx.world_size
        if train_labels.shape[0] < needed:
            raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {train_labels.shape[0]} training "
                              f"images; lower batch_size or raise train_subset")
        self.train_loader = DeviceLoader(
            train_images, train_labels, self.per_rank_batch_size, device=ctx.device, shuffle=True,
            augment=cfg.augment, drop_last=True, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
        if test_labels.shape[0] < ctx.world_size:
            raise ConfigError(f"the test set has {test_labels.shape[0]} images, fewer than the {ctx.world_size} processes")
        self.test_loader = DeviceLoader(
            test_images, test_labels, cfg.eval_batch_size, device=ctx.device, shuffle=False, augment="none",
            drop_last=False, seed=0, rank=ctx.rank, world_size=ctx.world_size, even_shards=False)
        self.steps_per_epoch = len(self.train_loader)
        if cfg.iterations is not None:
            self.total_steps = cfg.iterations
        else:
            self.total_steps = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))

    def _warn_if_batch_norm_lags(self) -> None:
        """Warn when BatchNorm's running statistics cannot settle within the run.

        An exponential running average with momentum m remembers about 1/m steps; the reference's
        m = 0.001 (decay 0.999) needs thousands of steps before test-time statistics follow the
        weights, and shorter runs then evaluate near chance although they train well.
        """
        momenta = [m.momentum for m in self.model.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.momentum is not None]
        if momenta and min(momenta) < BN_MOMENTUM and min(momenta) * self.total_steps < BN_SETTLE_MEMORIES:
            logger.warning(
                "BatchNorm momentum %g remembers ~%d steps but the run has %d: test accuracy will lag; "
                "for short runs use --bn-momentum %g (config key bn_momentum)", min(momenta),
                round(1 / min(momenta)), self.total_steps, BN_MOMENTUM)

    def _build_optimization(self) -> None:
        cfg = self.config
        self._warn_if_batch_norm_lags()
        modules = [self.model] + ([self.loss_module] if self.loss_module is not None else [])
        self.optimizer = build_optimizer(cfg, parameter_groups(modules, cfg.weight_decay, cfg.sphere_weight_decay))
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
        self.scaler = torch.GradScaler(self.ctx.device.type) if cfg.amp == "fp16" else None

    def _find_resume_state(self, run_dir: RunDirectory) -> dict[str, Any] | None:
        if not self.config.resume:
            return None
        found = find_latest_checkpoint(run_dir.checkpoints)
        if found is None:
            logger.warning("resume: no checkpoint in %s; starting at step 0", run_dir.checkpoints)
            return None
        path, state = found
        self._check_resumed_length(state, f"checkpoint {str(path)!r}")
        self._restore(state, f"checkpoint {str(path)!r}")
        self.last_checkpoint = path
        logger.info("resumed from %s at step %d", path, self.step)
        return state

    def _check_resumed_length(self, state: dict[str, Any], source: str) -> None:
        """A resume may change the run's length, but not below the steps done, nor under a schedule it defines."""
        cfg, done, planned = self.config, int(state["step"]), state.get("total_steps")
        length = f"iterations={cfg.iterations}" if cfg.iterations is not None else f"epochs={cfg.epochs:g}"
        if self.total_steps < done:
            raise ConfigError(f"{length} gives {self.total_steps} steps, but {source} is already at step {done}; "
                              "a resumed run cannot be shorter than the steps it has done")
        if planned is not None and planned != self.total_steps and cfg.schedule in LENGTH_DEFINED_SCHEDULES:
            raise ConfigError(f"{length} gives {self.total_steps} steps, but schedule={cfg.schedule!r} spans the "
                              f"run's {planned} steps and cannot be stretched on resume; keep the run's length")

    def _restore(self, state: dict[str, Any], source: str) -> None:
        check_config_compatible(state["config"], config_to_dict(self.config), source)
        load_model_state(self.model, state["model"], source)
        try:
            if self.loss_module is not None:
                load_model_state(self.loss_module, state["loss"] or {}, source + " (loss module)")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.train_loader.load_state_dict(state["loader"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{source} cannot be resumed with this configuration: "
                                  f"{' '.join(str(exc).split())[:EXCERPT_CHARS]}") from None
        self.step = int(state["step"])
        self.progress = {**_fresh_progress(), **state.get("progress", {})}

    def _wrap_for_training(self) -> nn.Module:
        cfg, ctx = self.config, self.ctx
        net: nn.Module = self.module
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(
                net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                # Margin losses use model.forward_features only: the model's own head gets no gradient.
                find_unused_parameters=self.loss_module is not None)
        if cfg.compile:
            net = torch.compile(net)
        return net

    # -- loop ----------------------------------------------------------------------------------
    def _loop(self, net: nn.Module, run_dir: RunDirectory) -> dict[str, Any]:
        cfg, ctx, progress = self.config, self.ctx, self.progress
        module = self.module
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]
        buffers = list(module.buffers())
        buffer_backup = [b.detach().clone() for b in buffers]
        stream = self.train_loader.batches_forever()
        self._bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and ctx.is_main),
                         unit="step", dynamic_ncols=True, desc=f"train {cfg.model}/{cfg.operator}")
        started = time.perf_counter()
        seconds_before = progress["seconds"]
        interrupted = None
        while self.step < self.total_steps:
            self.phase = "training"
            step_start = time.perf_counter()
            images, labels = next(stream)
            for callback in self.callbacks:
                replaced = callback.on_batch(self.step + 1, images, labels)
                if replaced is not None:
                    images, labels = replaced
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            lr = self.optimizer.param_groups[0]["lr"]
            bad, stop, loss_sum, correct, count = self._train_step(net, params, buffers, buffer_backup, images, labels)
            self.scheduler.step()
            self.step += 1
            elapsed = time.perf_counter() - step_start
            progress["train_seconds"] += elapsed
            progress["window_seconds"] += elapsed
            progress["images_seen"] += count
            progress["window_steps_images"] += count
            if bad:
                progress["skipped_steps"] += 1
                progress["consecutive_nonfinite"] += 1
            else:
                progress["consecutive_nonfinite"] = 0
                progress["window_loss"] += loss_sum
                progress["window_correct"] += correct
                progress["window_images"] += count
            progress["seconds"] = seconds_before + time.perf_counter() - started
            for callback in self.callbacks:
                callback.on_step_end(self.step, {"loss": loss_sum / count if count else math.nan,
                                                 "skipped": bad, "lr": lr})
            self._update_bar()
            if progress["consecutive_nonfinite"] >= cfg.max_nonfinite_steps:
                raise TrainingDivergedError(self._divergence_message())
            if self._due(cfg.eval_every):
                self._evaluate(lr, run_dir)
                progress["seconds"] = seconds_before + time.perf_counter() - started
            if stop:
                interrupted = signal.Signals(self._signals.received).name if self._signals.received else "signal"
            if stop or (self._due(cfg.checkpoint_every) and progress["consecutive_nonfinite"] == 0):
                self._checkpoint()
            if stop:
                break
        if self._bar is not None:
            self._bar.close()
        self.ctx.broadcast_buffers(self.module)
        return self._finish(run_dir, interrupted)

    def _due(self, every: int) -> bool:
        return self.step == self.total_steps or (every > 0 and self.step % every == 0)

    def _train_step(self, net, params, buffers, buffer_backup, images, labels) -> tuple[bool, bool, float, float, float]:
        cfg, device = self.config, self.ctx.device
        optimizer, scaler = self.optimizer, self.scaler
        optimizer.zero_grad(set_to_none=True)
        # BatchNorm statistics (and a margin loss's iteration counter) change in the forward pass;
        # keep a copy so that a skipped step leaves them untouched too.
        if buffers:
            torch._foreach_copy_(buffer_backup, buffers)
        with autocast(device, cfg.amp):
            loss, logits = net(images, labels)
        objective = loss
        if cfg.orthogonality > 0:
            objective = loss + orthogonality_penalty(self.model, cfg.orthogonality)
        if scaler is not None:
            scaler.scale(objective).backward()
            scaler.unscale_(optimizer)
        else:
            objective.backward()
        bad = ~torch.isfinite(loss.detach())
        grads = [p.grad for p in params if p.grad is not None]
        if cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        elif scaler is None and grads:
            norm = torch.nn.utils.get_total_norm(grads)
        else:
            norm = None
        if norm is not None and scaler is None:
            # With fp16 the gradient scaler owns non-finite gradients (it skips and rescales).
            bad = bad | ~torch.isfinite(norm)
        count = labels.shape[0]
        flags = torch.zeros(5, dtype=torch.float64, device=device)
        flags[0] = bad.double()
        flags[1] = float(self._signals.received is not None)
        flags[2] = loss.detach().double() * count
        flags[3] = (logits.detach().argmax(dim=1) == labels).sum().double()
        flags[4] = count
        # One reduction agrees on skip/stop across ranks and totals the loss and accuracy.
        n_bad, n_stop, loss_sum, correct, total = self.ctx.all_reduce_sum(flags).tolist()
        if n_bad > 0:
            optimizer.zero_grad(set_to_none=True)
            if buffers:
                torch._foreach_copy_(buffers, buffer_backup)
            if scaler is not None:
                scaler.update()
        elif scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return n_bad > 0, n_stop > 0, loss_sum, correct, total

    def _update_bar(self) -> None:
        bar = self._bar
        if bar is None or bar.disable:
            return
        bar.update(1)
        if self.step % PROGRESS_REFRESH_STEPS == 0 or self.step == self.total_steps:
            p = self.progress
            postfix = {}
            if p["window_images"]:
                postfix["loss"] = f"{p['window_loss'] / p['window_images']:.4f}"
                postfix["acc"] = f"{p['window_correct'] / p['window_images']:.3f}"
            if p["window_seconds"] > 0:
                postfix["img/s"] = f"{p['window_steps_images'] / p['window_seconds']:.0f}"
            bar.set_postfix(postfix, refresh=False)

    def _evaluate(self, lr: float, run_dir: RunDirectory) -> dict[str, Any]:
        self.phase = "evaluation"
        cfg, p = self.config, self.progress
        self.ctx.broadcast_buffers(self.module)
        totals = evaluate_batches(self.module, self.test_loader, self.ctx.device, cfg.amp, cfg.channels_last)
        loss_sum, correct, count = self.ctx.all_reduce_sum(totals).tolist()
        test_acc = correct / count
        record = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "train_loss": p["window_loss"] / p["window_images"] if p["window_images"] else None,
            "train_acc": p["window_correct"] / p["window_images"] if p["window_images"] else None,
            "test_loss": loss_sum / count,
            "test_acc": test_acc,
            "lr": lr,
            "seconds": round(p["seconds"], 3),
            "images_per_second": p["window_steps_images"] / p["window_seconds"] if p["window_seconds"] > 0 else None,
            "skipped_steps": p["skipped_steps"],
        }
        if hasattr(self.loss_module, "current_lambda"):
            record["margin_lambda"] = self.loss_module.current_lambda  # margin losses' annealing weight
        if p["best_test_acc"] is None or test_acc > p["best_test_acc"]:
            p["best_test_acc"], p["best_step"] = test_acc, self.step
        p["last_eval"] = record
        for key in ("window_loss", "window_correct", "window_images", "window_seconds", "window_steps_images"):
            p[key] = 0.0
        if self.ctx.is_main:
            run_dir.append_metrics(record)
            if self._bar is not None and not self._bar.disable:
                self._bar.write(f"step {self.step}: test_acc {test_acc:.4f} test_loss {record['test_loss']:.4f}")
        for callback in self.callbacks:
            callback.on_evaluate(self.step, record)
        return record

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "config": config_to_dict(self.config),
            "model": self.model.state_dict(),
            "loss": self.loss_module.state_dict() if self.loss_module is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loader": self.train_loader.state_dict(),
            "rng": capture_rng_state(),
            "progress": copy.deepcopy(self.progress),
            "total_steps": self.total_steps,
        }

    def _checkpoint(self) -> None:
        self.phase = "checkpoint"
        self.ctx.broadcast_buffers(self.module)
        path = None
        if self.ctx.is_main:
            path = save_checkpoint(self._checkpoint_state(), self._run_dir.checkpoints, self.step,
                                   self.config.keep_checkpoints)
            self.last_checkpoint = path
        for callback in self.callbacks:
            callback.on_checkpoint(self.step, path)

    # -- end -----------------------------------------------------------------------------------
    def _summary(self, interrupted: str | None) -> dict[str, Any]:
        cfg, p = self.config, self.progress
        last = p["last_eval"] or {}
        return {
            "final_test_acc": last.get("test_acc"),
            "final_test_loss": last.get("test_loss"),
            "final_train_loss": last.get("train_loss"),
            "final_train_acc": last.get("train_acc"),
            "best_test_acc": p["best_test_acc"],
            "best_step": p["best_step"],
            "steps": self.step,
            "total_steps": self.total_steps,
            "epochs": round(self.step / self.steps_per_epoch, 4),
            "images_per_second": p["images_seen"] / p["train_seconds"] if p["train_seconds"] > 0 else None,
            "seconds": round(p["seconds"], 3),
            "train_seconds": round(p["train_seconds"], 3),
            "skipped_steps": p["skipped_steps"],
            "model": cfg.model,
            "operator": cfg.operator,
            "loss": cfg.loss,
            "dataset": cfg.dataset,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "num_parameters": sum(t.numel() for t in self.module.parameters()),
            "world_size": self.ctx.world_size,
            "device": str(self.ctx.device),
            "amp": cfg.amp,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint is not None else None,
            "interrupted": interrupted,
            "run_id": self._run_dir.run_id,
            "amendments": self._run_dir.all_amendments(),
        }

    def _finish(self, run_dir: RunDirectory, interrupted: str | None) -> dict[str, Any]:
        summary = self._summary(interrupted)
        if interrupted is None and self.ctx.is_main:
            run_dir.write_summary(summary)
        for callback in self.callbacks:
            callback.on_train_end(self, summary)
        return summary

    def _divergence_message(self) -> str:
        cfg = self.config
        causes = [f"a learning rate too high for this model (lr={cfg.lr:g}; try a smaller --lr)"]
        if cfg.amp == "fp16":
            causes.append("fp16 overflow (try --amp bf16)")
        causes.append("non-finite values in the input data")
        where = (f"the last good checkpoint {str(self.last_checkpoint)!r} is intact"
                 if self.last_checkpoint is not None else "no checkpoint had been written yet")
        return (f"training diverged at step {self.step}: {self.progress['consecutive_nonfinite']} consecutive steps "
                f"had a non-finite loss or gradient (all skipped); likely cause: {' or '.join(causes)}; {where}")

    def _oom_message(self) -> str:
        cfg = self.config
        if self.phase == "evaluation":
            return (f"out of memory during evaluation with eval_batch_size={cfg.eval_batch_size}; "
                    f"try a smaller --eval-batch-size (e.g. {max(1, cfg.eval_batch_size // 2)})")
        per_rank = self.per_rank_batch_size
        where = f" ({per_rank} per process)" if self.ctx is not None and self.ctx.world_size > 1 else ""
        hint = " or --amp bf16" if cfg.amp == "none" else ""
        return (f"out of memory during {self.phase} with batch size {cfg.batch_size}{where}; "
                f"try a smaller --batch-size (e.g. {max(1, cfg.batch_size // 2)}){hint}")


def train(config: TrainConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train according to ``config`` and return the run summary (also written to ``summary.json``).

    ``config`` is validated (a copy is used; the argument is not modified). Under ``torchrun``
    every process calls ``train`` with the same config; rank 0 writes the files. Raises
    :class:`~sphereconv.errors.SphereconvError` subclasses for user-facing problems (bad config,
    missing data, unusable checkpoint, divergence, out of memory).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train expects a TrainConfig; got {type(config).__name__}")
    config = copy.deepcopy(config).validate()
    return Trainer(config, callbacks).run()
