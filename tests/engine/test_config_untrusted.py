"""Config files and values are untrusted: bounded reading, no YAML aliases, no duplicate keys,
bounded error messages, and the ``image_size`` and ``device`` checks."""

from __future__ import annotations

import time

import pytest

from sphereconv.engine import load_config
from sphereconv.engine.config import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_KWARGS_VALUES,
    check_device_name,
    config_to_dict,
    read_yaml_config,
    resolve_device_name,
)
from sphereconv.errors import MAX_REPR_CHARS, ConfigError, short_repr

# Longest one-line message a bad value may produce: the fixed text plus MAX_REPR_CHARS of the value.
MESSAGE_BOUND = 400
# Seconds within which every hostile case below must be refused (they hung before).
FAST_SECONDS = 5.0


def billion_laughs(indent: str) -> str:
    """YAML list items ``a`` .. ``i``, each nine aliases of the previous one: 9**9 values in ~400 bytes."""
    lines = [f"{indent}- &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{indent}- &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def shared_nesting(levels: int = 9, width: int = 9) -> list:
    """A Python list that expands to ``width ** levels`` strings but holds ``levels`` lists."""
    value: list = ["lol"] * width
    for _ in range(levels - 1):
        value = [value] * width
    return value


@pytest.mark.parametrize(
    ("text", "line"),
    [("lr:\n" + billion_laughs("  "), 3), ("model_kwargs:\n  x:\n" + billion_laughs("    "), 4)],
    ids=["lr", "model_kwargs"],
)
def test_yaml_aliases_are_refused_quickly_naming_the_line(tmp_path, text, line):
    path = tmp_path / "laughs.yaml"
    path.write_text(text)
    assert len(text) < 500
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"laughs\.yaml' line {line}: YAML alias \*a is not allowed") as caught:
        load_config(path)
    assert time.perf_counter() - start < FAST_SECONDS
    assert len(str(caught.value).splitlines()) == 1


def test_duplicate_key_is_an_error_naming_the_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("lr: 0.1\nbatch_size: 32\nlr: 0.5\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml' line 3: key 'lr' given twice \(first at line 1\)"):
        load_config(path)
    path.write_text("loss: cosface\nloss_kwargs:\n  margin: 0.2\n  margin: 0.4\n")
    with pytest.raises(ConfigError, match=r"line 4: key 'margin' given twice \(first at line 3\)"):
        load_config(path)
    path.write_text("lr: 0.1\n'lr': 0.5\n")  # the same key, spelled with quotes
    with pytest.raises(ConfigError, match=r"line 2: key 'lr' given twice"):
        load_config(path)
    path.write_text("<<: {lr: 0.5}\nbatch_size: 32\n")  # a merge key without aliases still works
    assert load_config(path).lr == 0.5


def test_oversized_file_and_dev_zero_fail_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"'/dev/zero' is larger than the {MAX_CONFIG_BYTES:,} bytes allowed"):
        read_yaml_config("/dev/zero")
    assert time.perf_counter() - start < FAST_SECONDS
    path = tmp_path / "big.yaml"
    path.write_text("lr: 0.1\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10))
    with pytest.raises(ConfigError, match="is larger than"):
        load_config(path)
    path.write_text("lr: 0.1\n" + "# padding\n" * (MAX_CONFIG_BYTES // 20))  # under the limit: read as usual
    assert load_config(path).lr == 0.1


def test_deep_nesting_and_unreadable_numbers_are_one_line_errors(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("model_kwargs: " + "[" * 100_000)
    with pytest.raises(ConfigError, match=rf"nested more than {MAX_CONFIG_DEPTH} deep"):
        load_config(path)
    path.write_text("seed: " + "9" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=r"holds a value that cannot be read") as caught:
        load_config(path)
    assert len(str(caught.value)) < MESSAGE_BOUND
    path.write_text(b"lr: \xff\xfe\n".decode("latin1"), encoding="latin1")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text"):
        load_config(path)
    path.write_text("lr: 0.1\nmodel: a\x1fb\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line 2: special characters are not allowed"):
        load_config(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lr", shared_nesting()),
        ("lr", "9" * 1_000_000),
        ("seed", 10**5000),
        ("optimizer", "x" * 1_000_000),
        ("device", "cuda:" + "1" * 100_000),
        ("lr_milestones", shared_nesting()),
    ],
    ids=["shared-list", "long-string", "huge-int", "long-choice", "long-device", "milestones"],
)
def test_error_messages_never_print_unbounded_values(key, value):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"invalid {key}=") as caught:
        load_config(None, {key: value})
    assert time.perf_counter() - start < FAST_SECONDS
    assert len(str(caught.value)) < MESSAGE_BOUND


def test_unknown_keys_are_printed_bounded():
    with pytest.raises(ConfigError, match="unknown key") as caught:
        load_config(None, {"k" * 1_000_000: 1})
    assert len(str(caught.value)) < 2 * MESSAGE_BOUND + len(", ".join(config_to_dict(load_config(None, {}))))


def test_kwargs_that_expand_without_bound_are_refused_and_small_ones_round_trip():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"at most {MAX_KWARGS_VALUES} plain values") as caught:
        load_config(None, {"model_kwargs": {"x": shared_nesting()}})
    assert time.perf_counter() - start < FAST_SECONDS and len(str(caught.value)) < MESSAGE_BOUND
    with pytest.raises(ConfigError, match="plain values"):
        load_config(None, {"loss_kwargs": {"margin": object()}})
    config = load_config(None, {"model_kwargs": {"bn_momentum": 0.1, "widths": [1, 2, {"a": None}]}})
    assert config_to_dict(config)["model_kwargs"] == {"bn_momentum": 0.1, "widths": [1, 2, {"a": None}]}


def test_short_repr_is_bounded_for_any_value():
    assert short_repr("tpu") == "'tpu'" and short_repr(2**70) == "1180591620717411303424"
    for value in (shared_nesting(), "y" * 10**6, 10**5000, {"a": shared_nesting()}):
        assert len(short_repr(value)) <= MAX_REPR_CHARS


def test_image_size_key():
    assert load_config(None, {}).image_size is None
    assert load_config(None, {"image_size": 64, "dataset": "folder"}).image_size == 64
    assert load_config(None, {"image_size": "48"}).image_size == 48
    for bad in (0, -1, 2.5, "big", 100_000, True):
        with pytest.raises(ConfigError, match=r"invalid image_size=.*expected an integer in \[1, 512\] or null"):
            load_config(None, {"image_size": bad})


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "cuda:-1", "", "cpu0", "cuda:\u0661"])
def test_device_names_are_checked_before_use(name):
    with pytest.raises(ConfigError, match=r"invalid device=.*expected auto, cpu, cuda, cuda:N or mps"):
        check_device_name(name)
    with pytest.raises(ConfigError, match=r"invalid device="):
        resolve_device_name(name)
    assert check_device_name(" CPU ") == "cpu" and resolve_device_name("cpu") == "cpu"
