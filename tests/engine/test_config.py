"""TrainConfig defaults, validation, YAML loading, overrides and a fuzz test of load_config."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sphereconv.engine import TrainConfig, config_to_dict, describe_keys, load_config, save_config
from sphereconv.engine.config import (
    DEFAULT_EPOCHS,
    MODEL_OPERATORS,
    REFERENCE_MILESTONES,
    config_from_dict,
    config_keys,
    format_config,
    key_spec,
    key_specs,
)
from sphereconv.errors import ConfigError, SphereconvError


def test_defaults_are_the_reference_recipe_but_ten_epochs_long():
    config = TrainConfig().validate()
    assert (config.optimizer, config.lr, config.batch_size) == ("adam", 1e-3, 128)
    # lr divided by 10 at iterations 34k and 54k of 64k, as fractions of the run.
    assert [round(f * 64000) for f in config.lr_milestones] == [34000, 54000]
    assert config.lr_gamma == 0.1
    assert (config.weight_decay, config.sphere_weight_decay, config.orthogonality) == (5e-4, 0.0, 1e-4)
    assert config.eval_every == 500
    # The run length serves a first run on any dataset: ten passes, not the reference's 64k steps.
    assert (config.epochs, config.iterations) == (DEFAULT_EPOCHS, None) == (10.0, None)
    # Either length alone replaces that default, from Python as from a file or a flag; both are refused.
    assert (TrainConfig(iterations=300).validate().epochs, TrainConfig(epochs=2).validate().iterations) == (None, None)
    with pytest.raises(ConfigError, match="set at most one of iterations and epochs; got iterations=300, epochs=2"):
        TrainConfig(iterations=300, epochs=2).validate()


def test_every_key_is_documented():
    descriptions = describe_keys()
    assert set(descriptions) == set(config_keys())
    assert all(len(text) > 5 for text in descriptions.values())


def test_choices_are_the_registries_own():
    from sphereconv.data.augment import AUGMENTATIONS
    from sphereconv.data.registry import list_datasets
    from sphereconv.losses.registry import LOSSES, list_losses
    from sphereconv.models import list_models
    from sphereconv.nn import angular

    # The same objects, not copies: registering a loss or an augmentation makes it a config choice.
    assert key_spec("loss").setting.choices is LOSSES and key_spec("loss").choices() == tuple(list_losses())
    assert key_spec("augment").setting.choices is AUGMENTATIONS
    assert key_spec("operator").setting.choices is angular.MODEL_OPERATORS is key_spec("fc_operator").setting.choices
    assert key_spec("model").choices() == tuple(list_models())
    assert key_spec("dataset").choices() == tuple(list_datasets())


def test_defaults_come_from_the_modules_that_own_them():
    from sphereconv.models import BN_MOMENTUM
    from sphereconv.nn.angular import DEFAULT_SIGMOID_K

    config = TrainConfig()
    assert (config.sigmoid_k, config.bn_momentum) == (DEFAULT_SIGMOID_K, BN_MOMENTUM)
    assert tuple(config.lr_milestones) == REFERENCE_MILESTONES


def test_every_key_declares_its_type_default_allowed_values_and_help():
    assert [key.name for key in key_specs()] == [f.name for f in dataclasses.fields(TrainConfig)]
    for key in key_specs():
        assert key.kind in (bool, int, float, str, dict, list), key.name
        assert key.allowed() and len(key.help) > 5, key.name
        assert key.check(key.default) == key.default, key.name  # every default is allowed
        assert key.optional == (key.name in OPTIONAL_KEYS), key.name


def test_errors_say_what_the_declaration_allows():
    for key, value in [
        ("batch_size", 0),
        ("sigmoid_k", 0),
        ("momentum", 1.0),
        ("train_subset", 0),
        ("image_size", 10**6),
        ("device", "tpu"),
        ("lr_milestones", [0.5, 0.5]),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(None, {key: value})
        assert str(info.value).endswith(f"expected {key_spec(key).allowed()}"), str(info.value)


def test_format_config_is_a_config_file_marking_changed_keys(tmp_path):
    awkward_folder = tmp_path / "a: b #c"  # YAML syntax inside a value must survive the round trip
    awkward_folder.mkdir()
    config = load_config(
        None,
        {
            "model": "spherenet18",
            "epochs": 2.5,
            "loss_kwargs": {"margin": 2.0},
            "data_dir": str(awkward_folder),
            "lr_milestones": [0.25, 0.75],
        },
    )
    text = format_config(config)
    assert "model: spherenet18  # default: spherenet9\n" in text and "\nlr: 0.001\n" in text
    assert text.count("\n") == len(key_specs())
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load_config(path, {}) == config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: spherenet18\nlr: 1e-2\nbatch-size: 64\nlr_milestones: [0.5]\n")
    config = load_config(path, {"lr": 0.05, "seed": None, "operator": "lr_sigmoid"})
    assert config.model == "spherenet18"
    assert config.lr == 0.05  # override beats the file
    assert config.batch_size == 64  # dashes are accepted, YAML's string "1e-2" was parsed
    assert config.seed == 0  # None overrides are ignored
    assert config.operator == "learnable_sigmoid"  # alias resolved
    assert config.lr_milestones == [0.5]


def test_epochs_and_iterations_clear_each_other(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("iterations: 500\n")
    assert load_config(path, {"epochs": 3}).iterations is None
    assert load_config(path, {"epochs": 3}).epochs == 3.0
    path.write_text("epochs: 2\n")
    config = load_config(path, {})
    assert (config.epochs, config.iterations) == (2.0, None)
    config = load_config(path, {"iterations": 7})
    assert (config.epochs, config.iterations) == (None, 7)


def test_conflicting_overrides_and_file(tmp_path):
    with pytest.raises(ConfigError, match="epochs.*iterations|iterations.*epochs"):
        load_config(None, {"epochs": 1, "iterations": 10})
    path = tmp_path / "both.yaml"
    path.write_text("epochs: 1\niterations: 10\n")
    with pytest.raises(ConfigError, match="both.yaml"):
        load_config(path, {})


def test_unknown_key_suggests_close_matches(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat'.*") as info:
        load_config(None, {"learning_rat": 0.1})
    assert "allowed keys" in str(info.value) or "did you mean" in str(info.value)
    with pytest.raises(ConfigError, match=r"unknown key 'batchsize'; did you mean batch_size"):
        load_config(None, {"batchsize": 3})
    path = tmp_path / "typo.yaml"
    path.write_text("optimiser: sgd\n")
    with pytest.raises(ConfigError, match=r"typo.yaml.*'optimiser'.*did you mean optimizer"):
        load_config(path, {})


BAD_VALUES = [
    ("lr", 0),
    ("lr", -1.0),
    ("lr", "fast"),
    ("lr", float("nan")),
    ("lr", True),
    ("batch_size", 0),
    ("batch_size", 2.5),
    ("batch_size", "many"),
    ("iterations", -5),
    ("epochs", 0),
    ("width_mult", 0),
    ("momentum", 1.0),
    ("optimizer", "adagrad"),
    ("schedule", "poly"),
    ("amp", "fp8"),
    ("augment", "mixup"),
    ("loss", "triplet"),
    ("operator", "tanh"),
    ("fc_operator", 3),
    ("device", "tpu"),
    ("lr_milestones", [0.8, 0.2]),
    ("lr_milestones", [1.5]),
    ("lr_milestones", "0.5"),
    ("seed", -1),
    ("seed", 2**40),
    ("keep_checkpoints", 0),
    ("label_smoothing", 1.0),
    ("model_kwargs", [1, 2]),
    ("loss_kwargs", {"not an identifier": 1}),
    ("resume", "yes"),
    ("out", ""),
    ("max_nonfinite_steps", 0),
    ("eval_every", -1),
    ("grad_clip", 0),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_values_name_the_key(key, value):
    overrides = {key: value}
    if key == "iterations":
        overrides = {"iterations": value}
    if key == "epochs":
        overrides = {"epochs": value}
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert key in message
    assert "\n" not in message


def test_cross_key_conflicts():
    with pytest.raises(ConfigError, match="amp='fp16' needs a CUDA device"):
        load_config(None, {"amp": "fp16", "device": "cpu"})
    with pytest.raises(ConfigError, match="sphere_norm"):
        load_config(None, {"sphere_norm": True, "operator": "none"})
    with pytest.raises(ConfigError, match="device='cuda'"):
        load_config(None, {"device": "cuda"})
    with pytest.raises(ConfigError, match="batch_size=1.*BatchNorm"):
        load_config(None, {"batch_size": 1})


def test_data_dir_must_exist_unless_downloading(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match=r"data_dir='.*missing' is not an existing folder.*download true"):
        load_config(None, {"data_dir": str(missing)})
    # Downloads go into it (created then); a config saved on another machine is read without the check.
    assert load_config(None, {"data_dir": str(missing), "download": True}).data_dir == str(missing)
    saved = config_to_dict(load_config(None, {"data_dir": str(tmp_path)}))
    saved["data_dir"] = str(missing)
    assert config_from_dict(saved, check_environment=False).data_dir == str(missing)


def test_yaml_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad, {})
    listing = tmp_path / "list.yaml"
    listing.write_text("- lr\n- 0.1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing, {})
    code = tmp_path / "code.yaml"
    code.write_text("lr: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(code, {})


def test_save_and_reload_round_trip(tmp_path):
    config = load_config(
        None,
        {
            "model": "spherenet36",
            "epochs": 2.5,
            "loss": "ga_softmax",
            "loss_kwargs": {"margin": 2.0},
            "lr_milestones": [0.25, 0.75],
        },
    )
    save_config(config, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["loss_kwargs"] == {"margin": 2.0}
    again = load_config(tmp_path / "config.yaml", {})
    assert again == config
    assert config_from_dict(config_to_dict(config)) == config


def test_resume_reads_the_runs_own_config(tmp_path):
    out = tmp_path / "run"
    save_config(load_config(None, {"model": "spherenet18", "lr": 0.01, "out": str(out)}), out / "config.yaml")
    config = load_config(None, {"out": str(out), "resume": True})
    assert (config.model, config.lr, config.resume) == ("spherenet18", 0.01, True)
    # Without resume the defaults apply.
    assert load_config(None, {"out": str(out)}).model == "spherenet9"


def test_validate_normalises_in_place():
    config = TrainConfig(lr="2e-3", batch_size=64.0, operator="COSINE", device="CPU")
    config.validate()
    assert (config.lr, config.batch_size, config.operator, config.device) == (2e-3, 64, "cosine", "cpu")
    assert isinstance(config.batch_size, int)


# Keys that may be null (None).
OPTIONAL_KEYS = (
    "fc_operator",
    "feature_dim",
    "data_dir",
    "train_subset",
    "test_subset",
    "grad_clip",
    "epochs",
    "iterations",
    "image_size",
)


# --- fuzz --------------------------------------------------------------------------------------

_KEYS = list(config_keys())
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(list(MODEL_OPERATORS) + ["adam", "sgd", "step", "bf16", "fp16", "1e-3"]),
    st.lists(st.floats(-2, 2), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_keys = st.one_of(st.sampled_from(_KEYS), st.sampled_from([k.replace("_", "-") for k in _KEYS]), st.text(max_size=10))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.dictionaries(_keys, _values, max_size=6), file_values=st.dictionaries(_keys, _values, max_size=4))
def test_fuzz_load_config_raises_only_config_errors(tmp_path_factory, overrides, file_values):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(yaml.safe_dump(file_values))
    try:
        config = load_config(path, overrides)
    except ConfigError as exc:
        assert isinstance(exc, SphereconvError) and str(exc)
        return
    # Whatever was accepted is a fully valid configuration.
    assert config.validate() == config
    assert (config.epochs is None) != (config.iterations is None)
    for f in dataclasses.fields(config):
        assert getattr(config, f.name) is not None or f.name in OPTIONAL_KEYS


def test_model_and_dataset_names_are_checked():
    with pytest.raises(ConfigError, match=r"invalid model='spherenet10'.*did you mean spherenet18|spherenet9"):
        load_config(None, {"model": "spherenet10"})
    with pytest.raises(ConfigError, match=r"invalid dataset='fashion_mnst'.*fashion-mnist"):
        load_config(None, {"dataset": "fashion_mnst"})
    assert load_config(None, {"model": "Sphere-ResNet32", "dataset": "CIFAR10"}).model == "sphere_resnet32"


def test_config_from_another_machine_can_be_read():
    saved = config_to_dict(TrainConfig())
    saved.update(device="cuda:3", amp="fp16")
    with pytest.raises(ConfigError, match="cuda"):
        config_from_dict(saved)
    config = config_from_dict(saved, check_environment=False)
    assert (config.device, config.amp) == ("cuda:3", "fp16")
