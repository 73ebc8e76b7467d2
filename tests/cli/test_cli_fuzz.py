"""Fuzz the ``train`` parser and config validation with random flag combinations (``--dry-run``)."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sphereconv.cli.main import main

NUMBERS = ["0", "1", "2", "-1", "3.5", "1e-3", "1e9", "nan", "inf", "-inf", "abc", "", "0x10", "1_000"]
FLAG_VALUES = {
    "--model": ["spherenet9", "SphereNet-18", "sphere_resnet32", "nope", ""],
    "--operator": ["cosine", "none", "linear", "sigmoid", "lr_sigmoid", "LEARNABLE_SIGMOID", "square_cosine", "tanh"],
    "--dataset": ["fashion-mnist", "mnist", "cifar10", "cifar100", "folder", "imagenet", ""],
    "--data-dir": ["/nonexistent", ".", ""],
    "--epochs": NUMBERS,
    "--iterations": NUMBERS,
    "--batch-size": NUMBERS,
    "--lr": NUMBERS,
    "--optimizer": ["adam", "adamw", "sgd", "lbfgs", "ADAM"],
    "--schedule": ["step", "cosine", "onecycle", "constant", "linear"],
    "--width-mult": NUMBERS + ["0.0625", "100"],
    "--sigmoid-k": NUMBERS,
    "--loss": ["softmax", "weight_normalized", "ga_softmax", "a_softmax", "cosface", "arcface", "hinge"],
    "--margin": NUMBERS,
    "--train-subset": NUMBERS,
    "--test-subset": NUMBERS,
    "--augment": ["none", "flip", "crop_flip", "mixup"],
    "--eval-every": NUMBERS,
    "--checkpoint-every": NUMBERS,
    "--device": ["cpu", "auto", "cuda", "cuda:3", "mps", "tpu", "CPU"],
    "--amp": ["none", "bf16", "fp16", "fp8"],
    "--seed": NUMBERS + ["4294967296"],
}
SWITCHES = ["--download", "--compile", "--channels-last", "--resume", "--overwrite", "--tensorboard", "--no-progress"]
YAML_TEXTS = [
    "",
    "model: spherenet9\n",
    "lr: 1e-3\nbatch_size: 64\n",
    "iterations: 10\nepochs: 1\n",
    "- a list\n",
    "model: [unclosed\n",
    "nonsense_key: 1\n",
    "loss_kwargs: {margin: 2}\n",
    "lr_milestones: [0.9, 0.5]\n",
    "batch_norm: maybe\n",
    "\t\tbad indentation: :\n",
]


@st.composite
def train_argv(draw):
    flags = draw(st.lists(st.sampled_from(sorted(FLAG_VALUES)), max_size=8, unique=True))
    argv = ["train"]
    for flag in flags:
        value = draw(st.one_of(st.sampled_from(FLAG_VALUES[flag]), st.text(max_size=12)))
        argv.append(f"{flag}={value}")  # '=' keeps values starting with '-' attached to their flag
    argv += draw(st.lists(st.sampled_from(SWITCHES), max_size=3, unique=True))
    if draw(st.booleans()):
        argv.append(draw(st.sampled_from(["stray", "--", "-x", "--config"])))
    yaml_text = draw(st.one_of(st.none(), st.sampled_from(YAML_TEXTS), st.text(max_size=40)))
    return argv, yaml_text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(train_argv())
def test_random_train_flags_exit_0_or_2_without_traceback(case):
    argv, yaml_text = case
    with tempfile.TemporaryDirectory() as tmp:
        argv = [*argv, "--dry-run", f"--out={Path(tmp) / 'run'}"]
        if yaml_text is not None:
            config = Path(tmp) / "config.yaml"
            config.write_text(yaml_text)
            argv.append(f"--config={config}")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    assert rc in (0, 2), (argv, rc, err.getvalue())
    assert "Traceback" not in err.getvalue()
    if rc == 2:
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sphereconv: error: "), (argv, err.getvalue())
    else:
        assert "config is valid" in out.getvalue()
