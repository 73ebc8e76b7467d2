"""The ``train`` flags are generated from the TrainConfig declarations: every key has a flag with the
same type, default and choices; flags parse only their type and the key's own check reports bad
values in one line naming the flag."""

from __future__ import annotations

import argparse

import pytest
import yaml

from cli_helpers import run_cli
from sphereconv.cli import train as train_command
from sphereconv.cli.parsing import Nullable, mapping_text
from sphereconv.engine.config import TrainConfig, key_specs, yaml_text

# Flags of the train command that are not config keys.
OWN_FLAGS = {"-h", "--help", "--config", "--margin", "--dry-run"}


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())
    return parser._subparsers._group_actions[0].choices["train"]


def key_actions() -> dict[str, argparse.Action]:
    return {action.dest: action for action in train_parser()._actions if action.dest in {k.name for k in key_specs()}}


def test_every_key_has_a_flag_with_its_type_default_and_choices():
    actions = key_actions()
    assert set(actions) == {key.name for key in key_specs()}
    for key in key_specs():
        action = actions[key.name]
        assert key.flag in action.option_strings, key.name
        assert action.default is argparse.SUPPRESS, key.name  # only flags given override the config file
        if key.kind is bool:
            assert isinstance(action, argparse.BooleanOptionalAction), key.name
            assert action.option_strings == [key.flag, "--no-" + key.flag[2:]]
        elif key.kind is dict:
            assert action.type is mapping_text, key.name
        elif key.kind is list:
            assert (action.type, action.nargs) == (key.item_kind, "+"), key.name
        elif key.optional:  # null resets the key
            assert isinstance(action.type, Nullable) and action.type.kind is key.kind, key.name
            assert action.type("null") is None and action.type(" None ") is None, key.name
        else:
            assert action.type is key.kind, key.name
        assert action.choices is None, key.name  # the config's check decides (aliases, case)
        assert f"(default: {yaml_text(key.default)})" in action.help, key.name
        for choice in key.choices() or ():
            assert choice in action.help, (key.name, choice)
    options = {option for action in train_parser()._actions for option in action.option_strings}
    assert options - {o for a in actions.values() for o in a.option_strings} == OWN_FLAGS


def test_every_flag_given_its_default_resolves_to_the_defaults():
    argv = ["train"]
    for key in key_specs():
        if key.default is None:
            continue
        if key.kind is bool:
            argv.append(key.flag if key.default else "--no-" + key.flag[2:])
        elif key.kind is list:
            argv += [key.flag, *map(str, key.default)]
        else:
            argv += [key.flag, yaml_text(key.default)]
    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())
    config = train_command.resolve_config(parser.parse_args(argv))
    assert config == TrainConfig().validate()


def resolve(*argv):
    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())
    return train_command.resolve_config(parser.parse_args(["train", *argv]))


def test_flags_set_every_kind_of_key(tmp_path):
    config = resolve(
        "--eval-every",
        "0",
        "--epochs",
        "1.5",
        "--weight-decay",
        "0",
        "--lr-milestones",
        "0.25",
        "0.5",
        "--no-batch-norm",
        "--channels-last",
        "--no-progress",
        "--operator",
        "LR_SIGMOID",
        "--loss-kwargs",
        "margin=4",
        "--loss-kwargs",
        "{scale: 2.5}",
        "--model-kwargs",
        '{"stem_width": 8}',
    )
    assert (config.eval_every, config.epochs, config.iterations, config.weight_decay) == (0, 1.5, None, 0.0)
    assert config.lr_milestones == [0.25, 0.5]
    assert (config.batch_norm, config.channels_last, config.progress) == (False, True, False)
    assert config.operator == "learnable_sigmoid"
    assert config.loss_kwargs == {"margin": 4, "scale": 2.5} and config.model_kwargs == {"stem_width": 8}
    # --margin is a shortcut of loss_kwargs.margin and keeps the file's other loss options.
    path = tmp_path / "c.yaml"
    path.write_text("loss: cosface\nloss_kwargs: {scale: 30}\nbatch_norm: false\n")
    config = resolve("--config", str(path), "--margin", "0.2", "--batch-norm")
    assert config.loss_kwargs == {"scale": 30, "margin": 0.2} and config.batch_norm is True


def test_null_resets_an_optional_key_a_config_file_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grad_clip: 1.0\ntest_subset: 500\nfc_operator: linear\n")
    assert (resolve("--config", str(path)).grad_clip, resolve("--config", str(path)).test_subset) == (1.0, 500)
    config = resolve("--config", str(path), "--grad-clip", "null", "--test-subset", "None", "--fc-operator", "~")
    assert (config.grad_clip, config.test_subset, config.fc_operator) == (None, None, None)
    # a key that may not be null still refuses it, naming the flag
    code, _, err = run_cli("train", "--batch-size", "null", "--dry-run")
    assert code == 2 and "--batch-size" in err and "null" in err


def test_dry_run_prints_a_config_file_marking_the_changed_keys(tmp_path):
    code, out, err = run_cli("train", "--batch-size", "64", "--eval-every", "0", "--dry-run")
    assert code == 0, err
    text = out.split("config is valid")[0]
    assert "batch_size: 64  # default: 128\n" in text and "eval_every: 0  # default: 500\n" in text
    assert "\nlr: 0.001\n" in text  # unchanged keys carry no comment
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    code, again, err = run_cli("train", "--config", path, "--dry-run")
    assert code == 0 and again == out, err


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--batch-size", "0"], ["argument --batch-size", "batch_size=0", "a positive integer"]),
        (["--epochs", "-1"], ["argument --epochs", "epochs=-1.0", "a number > 0"]),
        (["--epochs", "two"], ["argument --epochs", "'two'"]),
        (["--eval-every", "-1"], ["argument --eval-every", "eval_every=-1", "an integer >= 0"]),
        (["--lr", "nan"], ["argument --lr", "lr=nan", "a number > 0"]),
        (["--loss", "triplet"], ["argument --loss", "'triplet'", "arcface"]),
        (["--augment", "mixup"], ["argument --augment", "'mixup'", "crop_flip"]),
        (["--lr-milestones", "0.8", "0.2"], ["argument --lr-milestones", "increasing"]),
        (["--loss-kwargs", "[1, 2]"], ["argument --loss-kwargs", "YAML mapping"]),
        (["--loss-kwargs", "{a: *b}"], ["argument --loss-kwargs", "alias"]),
        (["--model-kwargs", "{1: 2}"], ["argument --model-kwargs", "keyword-argument names"]),
        (["--seed", str(2**32)], ["argument --seed", "[0, 2**32)"]),
        # Model and loss options: the dry run builds the network and its loss on the meta device (it
        # said "config is valid" for options the run then refused).
        (["--loss", "arcface", "--loss-kwargs", "margin=99"], ["loss='arcface'", "margin=99", "[0, 1.5708]"]),
        (["--loss", "cosface", "--loss-kwargs", "radius=2"], ["does not accept option(s) radius"]),
        (["--model-kwargs", "stages=4"], ["model='spherenet9'", "stages"]),
    ],
)
def test_bad_flag_values_are_one_line_naming_the_flag(argv, fragments):
    code, out, err = run_cli("train", *argv, "--dry-run")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sphereconv: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_mapping_text_reads_yaml_json_and_key_value():
    assert mapping_text("margin=4") == {"margin": 4}
    assert mapping_text("name=x=y") == {"name": "x=y"}
    assert mapping_text('{"margin": 0.35, "scale": 30}') == {"margin": 0.35, "scale": 30}
    assert mapping_text("{margin: [1, 2]}") == {"margin": [1, 2]}
    for bad in ("4", "[1]", "{a: 1, a: 2}", "{a: !!python/object:os.system x}"):
        with pytest.raises(argparse.ArgumentTypeError):
            mapping_text(bad)
    assert yaml.safe_load(yaml_text({"margin": 4})) == {"margin": 4}
