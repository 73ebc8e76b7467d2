"""Run ``sphereconv.engine.train`` in a subprocess for the kill/resume and torchrun tests.

Usage: ``python train_script.py '<overrides as JSON>' [options]``. Prints ``STARTED`` when the loop
begins and the summary as JSON at the end. Fault injection:

- ``--kill-at-step N``: SIGKILL itself right after step N;
- ``--kill-in-checkpoint-write N``: SIGKILL itself while the checkpoint of step N is written (the
  temporary file is complete but not yet renamed);
- ``--exit-rank R --exit-at-step N``: rank R exits abruptly (``os._exit``) after step N;
- ``--rank-out R DIR``: rank R trains in DIR instead of the config's ``out`` (a process that does
  not see the run folder the others see);
- ``--starve-gloo-workers``: the gloo worker threads run only while the main thread waits (pinned
  to its CPU, ``SCHED_IDLE``), as on a loaded machine where they get no core for a while: a worker
  still releasing the last collective's tensors when the interpreter exits aborts the process;
- ``--dump-dir DIR``: every rank saves its final model state to ``DIR/rank<R>.pt`` and its summary
  to ``DIR/summary_rank<R>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch

from sphereconv.engine import Callback, load_config, train


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


# Name of the worker threads of torch's gloo process group (ProcessGroupGloo::runLoop).
GLOO_WORKER_THREAD = "pt_gloo_runloop"


def _starve_gloo_workers() -> None:
    """Put the gloo worker threads on the main thread's CPU with the idle scheduling policy."""
    cpu = os.sched_getaffinity(0).pop()
    os.sched_setaffinity(0, {cpu})  # pid 0: the calling (main) thread only
    workers = 0
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as f:
            if f.read().strip() != GLOO_WORKER_THREAD:
                continue
        os.sched_setaffinity(int(task), {cpu})
        os.sched_setscheduler(int(task), os.SCHED_IDLE, os.sched_param(0))
        workers += 1
    if not workers:
        raise RuntimeError(f"no {GLOO_WORKER_THREAD} thread found: the test cannot starve the gloo workers")


class FaultInjection(Callback):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def on_train_start(self, trainer) -> None:
        self.rank = trainer.ctx.rank
        if self.args.starve_gloo_workers:
            _starve_gloo_workers()
        print("STARTED", trainer.step, flush=True)

    def on_step_end(self, step: int, info: dict) -> None:
        if step == self.args.kill_at_step:
            _die()
        if step == self.args.exit_at_step and self.rank == self.args.exit_rank:
            print(f"rank {self.rank} exiting at step {step}", flush=True)
            os._exit(3)

    def on_train_end(self, trainer, summary: dict) -> None:
        if self.args.dump_dir:
            torch.save(trainer.model.state_dict(), os.path.join(self.args.dump_dir, f"rank{trainer.ctx.rank}.pt"))


def _kill_during_write(step: int) -> None:
    """Make the checkpoint write of ``step`` die between fsync and rename."""
    real_replace = os.replace
    name = f"step_{step:08d}.pt"

    def replace(src, dst):
        if os.fspath(dst).endswith(name):
            _die()
        return real_replace(src, dst)

    os.replace = replace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("overrides")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in-checkpoint-write", type=int)
    parser.add_argument("--exit-rank", type=int)
    parser.add_argument("--exit-at-step", type=int)
    parser.add_argument("--rank-out", nargs=2, metavar=("RANK", "DIR"))
    parser.add_argument("--dump-dir")
    parser.add_argument("--starve-gloo-workers", action="store_true")
    args = parser.parse_args()
    overrides = json.loads(args.overrides)
    if args.rank_out is not None and int(os.environ.get("RANK", "0")) == int(args.rank_out[0]):
        overrides["out"] = args.rank_out[1]
    torch.set_num_threads(1)
    if args.kill_in_checkpoint_write is not None:
        _kill_during_write(args.kill_in_checkpoint_write)
    summary = train(load_config(None, overrides), [FaultInjection(args)])
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.dump_dir:
        # Ranks print concurrently and their stdout lines can interleave: keep a file per rank.
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(args.dump_dir, f"summary_rank{rank}.json"), "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
