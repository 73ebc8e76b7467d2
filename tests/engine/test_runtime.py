"""The training process's runtime (engine/runtime.py): seeding, stop signals, mixed precision,
placement and the one-line failure messages."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch
from torch import nn

from sphereconv.engine import load_config
from sphereconv.engine.runtime import (
    StopSignals,
    autocast,
    divergence_message,
    grad_scaler,
    oom_message,
    place_on_device,
    seed_everything,
)

CPU = torch.device("cpu")


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seeding_is_reproducible():
    seed_everything(7)
    first = _draws()
    seed_everything(7)
    assert _draws() == first
    seed_everything(8)
    assert _draws() != first


@pytest.mark.parametrize("amp, dtype", [("none", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_and_scaler_follow_amp(amp, dtype):
    with autocast(CPU, amp):
        enabled = torch.is_autocast_enabled("cpu")
        active = torch.get_autocast_dtype("cpu")
    assert enabled is (dtype is not None)
    if dtype is not None:
        assert active == dtype
    scaler = grad_scaler(CPU, amp)
    assert (scaler is not None) is (amp == "fp16")


def test_first_stop_signal_is_recorded_second_aborts_and_handlers_are_restored():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        with StopSignals() as signals:
            assert signals.received is None and signals.name is None
            os.kill(os.getpid(), signal.SIGTERM)
            assert signals.received == signal.SIGTERM and signals.name == "SIGTERM"
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_place_on_device_makes_the_network_channels_last():
    model, loss = nn.Conv2d(2, 3, 3), nn.Linear(3, 2)
    place_on_device(model, loss, CPU, channels_last=True)
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    plain = nn.Conv2d(2, 3, 3)
    place_on_device(plain, None, CPU, channels_last=False)
    assert plain.weight.is_contiguous() and not plain.weight.is_contiguous(memory_format=torch.channels_last)


def test_failure_messages_name_what_to_change():
    config = load_config(None, {"batch_size": 64, "eval_batch_size": 500, "lr": 0.1, "amp": "none"})
    message = oom_message(config, "training", world_size=2)
    assert "batch size 64 (32 per process)" in message and "--batch-size (e.g. 32)" in message
    assert "--amp bf16" in message
    assert "eval_batch_size=500" in oom_message(config, "evaluation", world_size=1)
    message = divergence_message(config, 10, 3, None)
    assert "diverged at step 10: 3 consecutive" in message and "lr=0.1" in message
    assert "no checkpoint had been written yet" in message and "\n" not in message
