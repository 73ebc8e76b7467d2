"""The training loop: :func:`train` runs one :class:`~sphereconv.engine.config.TrainConfig`.

The loop follows the reference recipe of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017,
Sec. 5; wy1iu/SphereNet): it counts optimizer steps (iterations), evaluates the test set every
``eval_every`` steps and at the end, and reports the best and the final test accuracy. The
:class:`Trainer` orchestrates: build, resume, loop, evaluation and checkpoint cadence, finish. The
pieces live next to it: :mod:`.loaders` (both splits on the device, sharded per data-parallel rank,
and the run's length), :mod:`.step` (one optimizer step, skipped when its loss or gradient is not
finite), :mod:`.progress` (the counters a resumed run continues, the progress bar), :mod:`.runtime`
(seeding, stop signals, mixed precision, placement, failure messages), :mod:`.optim` (parameter
groups, optimizer, schedule) and :mod:`.callbacks` (hooks for the caller).

``max_nonfinite_steps`` consecutive skipped steps stop the run with
:class:`~sphereconv.errors.TrainingDivergedError`, leaving the last good checkpoint the newest.
SIGINT / SIGTERM finish the current step, write a checkpoint and return (``interrupted`` in the
summary); a second signal aborts at once. CUDA out-of-memory becomes a
:class:`~sphereconv.errors.SphereconvError` naming the batch size. Checkpoints are written every
``checkpoint_every`` steps and at the end; ``resume`` continues the newest intact one with identical
model, optimizer, scheduler, RNG and data-order state, under the run folder's ownership, lock and
resume contract (:mod:`.run_dir`), all checked before any file is written.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data import DatasetInfo, DeviceLoader, dataset_info
from ..errors import CheckpointError, ConfigError, SphereconvError, TrainingDivergedError
from ..models import MIN_BATCH_NORM_BATCH
from .callbacks import Callback
from .checkpoint import (
    EXCERPT_CHARS,
    capture_rng_state,
    check_config_compatible,
    check_dataset_compatible,
    dataset_record,
    find_latest_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from .config import TrainConfig, config_to_dict
from .distributed import DistributedContext, is_peer_failure, setup_distributed
from .loaders import build_run_data, check_resumed_length, warn_if_batch_norm_lags
from .objective import TrainingModule, build_loss_module, build_model, evaluate_batches
from .optim import build_optimizer, build_scheduler, parameter_groups
from .progress import ProgressBar, RunProgress
from .run_dir import RunDirectory
from .runtime import (
    StopSignals,
    divergence_message,
    grad_scaler,
    oom_message,
    peer_failure_message,
    place_on_device,
    seed_everything,
    wrap_for_training,
)
from .step import TrainStep

logger = logging.getLogger(__name__)
# Start of the warning torch.optim.lr_scheduler gives when the scheduler steps before the optimizer.
SCHEDULER_BEFORE_OPTIMIZER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


class Trainer:
    """One training run; see :func:`train`. Callbacks may read every attribute.

    The attributes annotated on the class are set during setup, before ``on_train_start``.
    """

    ctx: DistributedContext
    model: nn.Module
    loss_module: nn.Module | None
    module: TrainingModule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.GradScaler | None
    train_loader: DeviceLoader
    test_loader: DeviceLoader
    num_classes: int
    info: DatasetInfo

    def __init__(self, config: TrainConfig, callbacks: Sequence[Callback] = ()) -> None:
        self.config = config
        self.callbacks = list(callbacks)
        if config.layer_stats_every:
            from .layer_stats import LayerStatsRecorder

            self.callbacks.append(LayerStatsRecorder(config.layer_stats_every))
        self.step = 0
        self.total_steps = 0
        self.steps_per_epoch = 1
        self.progress = RunProgress()
        self.last_checkpoint: Any = None
        self.phase = "setup"
        self._signals = StopSignals()
        self._bar: ProgressBar | None = None
        self._run_dir: RunDirectory | None = None

    def run(self) -> dict[str, Any]:
        """Set up, train, evaluate; return the summary. Always releases the process group."""
        ctx = None
        try:
            ctx = self.ctx = setup_distributed(self.config.device)
            with self._signals:
                summary = self._run()
            # Every rank waits here before leaving the group (why: engine.distributed's docstring).
            ctx.barrier()
            return summary
        except torch.OutOfMemoryError as exc:
            world_size = ctx.world_size if ctx is not None else 1
            raise SphereconvError(oom_message(self.config, self.phase, world_size)) from exc
        except Exception as exc:
            if ctx is not None and ctx.enabled and is_peer_failure(exc):
                raise SphereconvError(peer_failure_message(ctx.rank, self.phase, exc)) from exc
            raise
        finally:
            for resource in (self._bar, self._run_dir, ctx):
                if resource is not None:
                    resource.close()

    # -- setup ---------------------------------------------------------------------------------
    def _run(self) -> dict[str, Any]:
        cfg, ctx = self.config, self.ctx
        if cfg.batch_size % ctx.world_size:
            raise ConfigError(
                f"batch_size={cfg.batch_size} must be divisible by the {ctx.world_size} "
                "data-parallel processes (it is the global batch size)"
            )
        if cfg.batch_norm and cfg.batch_size // ctx.world_size < MIN_BATCH_NORM_BATCH:
            raise ConfigError(
                f"batch_size={cfg.batch_size} leaves {cfg.batch_size // ctx.world_size} image per process over the "
                f"{ctx.world_size} data-parallel processes, too few for BatchNorm (needs >= {MIN_BATCH_NORM_BATCH} "
                f"per process); raise batch_size to at least {MIN_BATCH_NORM_BATCH * ctx.world_size} or set "
                "batch_norm false"
            )
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
        # Data first: the run's length (total_steps) sets the loss's annealing.
        data = build_run_data(cfg, ctx)
        self.train_loader, self.test_loader = data.train_loader, data.test_loader
        self.steps_per_epoch, self.total_steps = data.steps_per_epoch, data.total_steps
        self._build_model(info)
        self._build_optimization()
        resume_state = self._resume(run_dir)
        if cfg.resume:
            self._check_ranks_resume_together(run_dir)
        run_dir.begin(cfg, self.step)  # writes on rank 0 only
        if ctx.is_main:
            if cfg.resume:
                run_dir.truncate_metrics(self.step)
                if self.step < self.total_steps:
                    run_dir.discard_summary()
            if cfg.tensorboard:
                run_dir.open_tensorboard(self.step)
        ctx.barrier()
        if resume_state is not None:
            restore_rng_state(resume_state["rng"])
        # Margin losses use model.forward_features only: the model's own head gets no gradient.
        net = wrap_for_training(self.module, ctx, cfg.compile, find_unused_parameters=self.loss_module is not None)
        for callback in self.callbacks:
            callback.on_train_start(self)
        return self._loop(net, run_dir)

    def _build_model(self, info) -> None:
        cfg = self.config
        model = build_model(cfg, info.num_classes, info.in_channels, info.image_size)
        loss_module = build_loss_module(cfg, model, info.num_classes, self.total_steps)
        place_on_device(model, loss_module, self.ctx.device, cfg.channels_last)
        self.model, self.loss_module = model, loss_module
        self.module = TrainingModule(model, loss_module, cfg.label_smoothing if loss_module is None else 0.0)
        self.num_classes = info.num_classes
        self.info = info

    def _build_optimization(self) -> None:
        cfg = self.config
        warn_if_batch_norm_lags(self.model, self.total_steps)
        modules = [self.model] + ([self.loss_module] if self.loss_module is not None else [])
        self.optimizer = build_optimizer(cfg, parameter_groups(modules, cfg.weight_decay, cfg.sphere_weight_decay))
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
        self.scaler = grad_scaler(self.ctx.device, cfg.amp)

    def _resume(self, run_dir: RunDirectory) -> dict[str, Any] | None:
        """With ``resume``, restore the newest intact checkpoint; return its state (for the RNG)."""
        if not self.config.resume:
            return None
        found = find_latest_checkpoint(run_dir.checkpoints)
        if found is None:
            logger.warning("resume: no checkpoint in %s; starting at step 0", run_dir.checkpoints)
            return None
        path, state = found
        source = f"checkpoint {str(path)!r}"
        check_resumed_length(self.config, self.total_steps, state, source)
        check_config_compatible(state["config"], config_to_dict(self.config), source)
        check_dataset_compatible(state.get("dataset_info"), self.info, source)
        saved_loader = state.get("loader")
        saved_processes = saved_loader.get("world_size") if isinstance(saved_loader, dict) else None
        if isinstance(saved_processes, int) and saved_processes != self.ctx.world_size:
            raise CheckpointError(
                f"{source} was written by a run of {saved_processes} data-parallel process(es), but this one has "
                f"{self.ctx.world_size}: each process's share of the data depends on their number, so resume it "
                f"with {saved_processes} (torchrun --nproc_per_node {saved_processes}"
                f"{'' if saved_processes > 1 else ', or without torchrun'})"
            )
        load_model_state(self.model, state["model"], source)
        try:
            if self.loss_module is not None:
                load_model_state(self.loss_module, state["loss"] or {}, source + " (loss module)")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.train_loader.load_state_dict(state["loader"])
            self.progress = RunProgress.from_state(state.get("progress", {}))
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(
                f"{source} cannot be resumed with this configuration: {' '.join(str(exc).split())[:EXCERPT_CHARS]}"
            ) from None
        self.step = int(state["step"])
        self.last_checkpoint = path
        logger.info("resumed from %s at step %d", path, self.step)
        return state

    def _check_ranks_resume_together(self, run_dir: RunDirectory) -> None:
        """Every data-parallel rank must resume from the same step (each reads the run folder itself).

        A rank that sees another folder (a node without the shared file system, a stale copy)
        would otherwise start elsewhere with a fresh optimizer and train diverging weights in
        silence until the ranks' step counts part.
        """
        steps = self.ctx.gather_int(self.step)
        if len(set(steps)) > 1:
            found = ", ".join(f"rank {rank}: step {step}" for rank, step in enumerate(steps))
            raise CheckpointError(
                f"the data-parallel processes found different checkpoints to resume from in "
                f"{str(run_dir.checkpoints)!r} ({found}); every process must see the same run folder, "
                "on a file system they all share"
            )

    # -- loop ----------------------------------------------------------------------------------
    def _loop(self, net: nn.Module, run_dir: RunDirectory) -> dict[str, Any]:
        cfg, ctx, progress = self.config, self.ctx, self.progress
        self.module.train()
        train_step = TrainStep(
            self.module,
            self.optimizer,
            net=net,
            scaler=self.scaler,
            amp=cfg.amp,
            grad_clip=cfg.grad_clip,
            orthogonality=cfg.orthogonality,
            channels_last=cfg.channels_last,
            all_reduce_sum=ctx.all_reduce_sum,
        )
        stream = self.train_loader.batches_forever()
        self._bar = ProgressBar(
            self.total_steps, self.step, cfg.progress and ctx.is_main, f"train {cfg.model}/{cfg.operator}"
        )
        progress.start_clock()
        interrupted = None
        while self.step < self.total_steps:
            self.phase = "training"
            step_start = time.perf_counter()
            images, labels = next(stream)
            for callback in self.callbacks:
                replaced = callback.on_batch(self.step + 1, images, labels)
                if replaced is not None:
                    images, labels = replaced
            lr = self.optimizer.param_groups[0]["lr"]
            result = train_step(images, labels, stop_requested=self._signals.received is not None)
            if result.skipped:
                # The schedule follows the step count, skipped steps included; torch warns when the
                # first optimizer step was one of them, which here is expected, not a misuse. (Only
                # here: entering catch_warnings resets every "show once" registry.)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=SCHEDULER_BEFORE_OPTIMIZER_WARNING)
                    self.scheduler.step()
            else:
                self.scheduler.step()
            self.step += 1
            progress.record_step(result, time.perf_counter() - step_start)
            for callback in self.callbacks:
                callback.on_step_end(self.step, {"loss": result.loss, "skipped": result.skipped, "lr": lr})
            self._bar.advance(self.step, self.total_steps, progress.window)
            if progress.consecutive_nonfinite >= cfg.max_nonfinite_steps:
                raise TrainingDivergedError(
                    divergence_message(cfg, self.step, progress.consecutive_nonfinite, self.last_checkpoint)
                )
            if self._due(cfg.eval_every):
                self._evaluate(lr, run_dir)
                progress.tick()
            if result.stop_requested:
                # Another rank may have received the signal: this one then names none.
                interrupted = self._signals.name or "signal"
            if interrupted or (self._due(cfg.checkpoint_every) and progress.consecutive_nonfinite == 0):
                self._checkpoint(run_dir)
            if interrupted:
                break
        self._bar.close()
        ctx.broadcast_buffers(self.module)
        return self._finish(run_dir, interrupted)

    def _due(self, every: int) -> bool:
        return self.step == self.total_steps or (every > 0 and self.step % every == 0)

    def _evaluate(self, lr: float, run_dir: RunDirectory) -> dict[str, Any]:
        self.phase = "evaluation"
        cfg, progress, window = self.config, self.progress, self.progress.window
        self.ctx.broadcast_buffers(self.module)
        totals = evaluate_batches(self.module, self.test_loader, self.ctx.device, cfg.amp, cfg.channels_last)
        loss_sum, correct, count = self.ctx.all_reduce_sum(totals).tolist()
        record = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "train_loss": window.train_loss,
            "train_acc": window.train_accuracy,
            "test_loss": loss_sum / count,
            "test_acc": correct / count,
            "lr": lr,
            "seconds": round(progress.seconds, 3),
            "images_per_second": window.images_per_second,
            "skipped_steps": progress.skipped_steps,
        }
        margin_lambda = getattr(self.loss_module, "current_lambda", None)  # margin losses' annealing weight
        if margin_lambda is not None:
            record["margin_lambda"] = margin_lambda
        progress.record_evaluation(record)
        if self.ctx.is_main:
            run_dir.append_metrics(record)
            if self._bar is not None:
                self._bar.write(
                    f"step {self.step}: test_acc {record['test_acc']:.4f} test_loss {record['test_loss']:.4f}"
                )
        for callback in self.callbacks:
            callback.on_evaluate(self.step, record)
        return record

    def _checkpoint(self, run_dir: RunDirectory) -> None:
        self.phase = "checkpoint"
        self.ctx.broadcast_buffers(self.module)
        path = None
        if self.ctx.is_main:
            state = {
                "config": config_to_dict(self.config),
                "model": self.model.state_dict(),
                "loss": self.loss_module.state_dict() if self.loss_module is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "loader": self.train_loader.state_dict(),
                "rng": capture_rng_state(),
                "progress": self.progress.to_state(),
                "total_steps": self.total_steps,
                "dataset_info": dataset_record(self.info),
            }
            path = save_checkpoint(state, run_dir.checkpoints, self.step, self.config.keep_checkpoints)
            self.last_checkpoint = path
        for callback in self.callbacks:
            callback.on_checkpoint(self.step, path)

    # -- end -----------------------------------------------------------------------------------
    def _summary(self, run_dir: RunDirectory, interrupted: str | None) -> dict[str, Any]:
        cfg, progress = self.config, self.progress
        last = progress.last_eval or {}
        return {
            "final_test_acc": last.get("test_acc"),
            "final_test_loss": last.get("test_loss"),
            "final_train_loss": last.get("train_loss"),
            "final_train_acc": last.get("train_acc"),
            "best_test_acc": progress.best_test_acc,
            "best_step": progress.best_step,
            "steps": self.step,
            "total_steps": self.total_steps,
            "epochs": round(self.step / self.steps_per_epoch, 4),
            "images_per_second": progress.images_per_second,
            "seconds": round(progress.seconds, 3),
            "train_seconds": round(progress.train_seconds, 3),
            "skipped_steps": progress.skipped_steps,
            **{key: getattr(cfg, key) for key in ("model", "operator", "loss", "dataset", "seed", "batch_size")},
            "num_parameters": sum(t.numel() for t in self.module.parameters()),
            "world_size": self.ctx.world_size,
            "device": str(self.ctx.device),
            "amp": cfg.amp,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint is not None else None,
            "interrupted": interrupted,
            "run_id": run_dir.run_id,
            "amendments": run_dir.all_amendments(),
        }

    def _finish(self, run_dir: RunDirectory, interrupted: str | None) -> dict[str, Any]:
        summary = self._summary(run_dir, interrupted)
        if interrupted is None and self.ctx.is_main:
            run_dir.write_summary(summary)
        for callback in self.callbacks:
            callback.on_train_end(self, summary)
        return summary


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
