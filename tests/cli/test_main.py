"""The command line's boundaries: which errors become one line, what each command imports, presets."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from sphereconv.cli import main as cli_main
from sphereconv.cli import train as train_command
from sphereconv.cli.main import COMMANDS, main
from sphereconv.configs import find_config, find_grid, list_grids, list_presets, preset_path
from sphereconv.errors import ConfigError, DatasetError, InvalidArgumentError, InvalidArgumentTypeError

HEAVY_MODULES = ("torch", "numpy", "matplotlib")


def one_line_error(rc: int, err: str) -> str:
    assert rc == cli_main.EXIT_USER_ERROR, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("sphereconv: error: ")
    return err.strip()


def imported_after(*argv: str) -> set[str]:
    """Top-level packages among :data:`HEAVY_MODULES` imported by ``sphereconv ARGV`` in a fresh interpreter."""
    code = (
        "import contextlib, io, sys\n"
        "from sphereconv.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = main({list(argv)!r})\n"
        "assert rc == 0, rc\n"
        f"print(' '.join(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


# ---------------------------------------------------------------- errors


def raising(exc: BaseException):
    def run(args):
        raise exc

    return run


@pytest.mark.parametrize(
    "exc",
    [
        ConfigError("bad key"),
        DatasetError("no data"),
        InvalidArgumentError("width_mult must be > 0"),
        InvalidArgumentTypeError("width_mult must be a number"),
        FileNotFoundError(errno.ENOENT, "No such file or directory", "runs/x"),
        PermissionError(errno.EACCES, "Permission denied", "/root/out"),
        IsADirectoryError(errno.EISDIR, "Is a directory", "runs"),
        NotADirectoryError(errno.ENOTDIR, "Not a directory", "file/x"),
        FileExistsError(errno.EEXIST, "File exists", "runs/x"),
        OSError(errno.EROFS, "Read-only file system", "/usr/runs"),
        OSError(errno.ENOSPC, "No space left on device", "runs/x"),
    ],
)
def test_package_and_file_system_errors_are_one_line(exc, monkeypatch, capsys):
    monkeypatch.setattr(train_command, "run", raising(exc))
    line = one_line_error(main(["train"]), capsys.readouterr().err)
    assert str(exc.args[-1]) in line  # the message, or the path of a file-system error


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("internal bug"),
        TypeError("internal bug"),
        KeyError("internal bug"),
        RuntimeError("internal bug"),
        OSError(errno.EBADF, "Bad file descriptor"),
        OSError(errno.EIO, "Input/output error"),  # not about a path
    ],
)
def test_other_errors_keep_their_traceback(exc, monkeypatch):
    monkeypatch.setattr(train_command, "run", raising(exc))
    with pytest.raises(type(exc), match="internal bug|Bad file|Input/output"):
        main(["train"])


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--model", "no_such_model", "--dry-run"], "no_such_model"),
        (["train", "--dataset", "no_such_data", "--dry-run"], "no_such_data"),
        (["train", "--loss", "no_such_loss", "--dry-run"], "no_such_loss"),
        (["train", "--operator", "no_such_operator", "--dry-run"], "no_such_operator"),
        (["train", "--width-mult", "0", "--dry-run"], "width"),
        (["eval", "no/such/checkpoint.pt"], "no/such/checkpoint.pt"),
        (["reproduce", "--grid", "no/such/grid.yaml", "--dry-run"], "no/such/grid.yaml"),
        (["reproduce", "operators", "--scale", "smoke", "--dataset", "no_such_data", "--dry-run"], "no_such_data"),
    ],
)
def test_user_mistakes_are_one_line(argv, fragment, capsys):
    assert fragment in one_line_error(main(argv), capsys.readouterr().err)


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """``sphereconv list-models | head -0``: no BrokenPipeError traceback, the shell's SIGPIPE status."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sphereconv.cli.main", "list-models"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # before the command has printed anything
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == cli_main.EXIT_BROKEN_PIPE, stderr.decode()
    assert b"Traceback" not in stderr and b"BrokenPipeError" not in stderr, stderr.decode()


# ---------------------------------------------------------------- imports


def test_top_level_help_imports_no_torch_numpy_or_matplotlib():
    assert imported_after("--help") == set()


@pytest.mark.parametrize(
    "argv",
    [
        ("train", "--config", "fashion_mnist_quick", "--dry-run"),
        ("reproduce", "operators", "--scale", "smoke", "--dry-run"),
        ("reproduce", "--grid", "quickstart", "--dry-run"),
    ],
    ids=["train", "reproduce", "reproduce-grid"],
)
def test_planning_without_plotting_imports_no_matplotlib(argv):
    assert "matplotlib" not in imported_after(*argv)


def test_import_sphereconv_is_lazy_and_the_public_names_still_work():
    code = (
        "import sys, sphereconv\n"
        "assert 'torch' not in sys.modules\n"
        "from sphereconv import create_model, list_models\n"
        "assert 'spherenet9' in list_models() and callable(create_model)\n"
        "assert sphereconv.nn.SphereConv2d.__name__ == 'SphereConv2d'\n"
        "assert sphereconv.losses.GASoftmaxLoss and sphereconv.models.convert_model\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "package",
    [
        "sphereconv",
        "sphereconv.nn",
        "sphereconv.losses",
        "sphereconv.models",
        "sphereconv.data",
        "sphereconv.engine",
        "sphereconv.experiments",
    ],
)
def test_every_exported_name_exists(package):
    import importlib

    module = importlib.import_module(package)
    assert module.__all__ and all(hasattr(module, name) for name in module.__all__)


def test_every_command_is_listed_with_its_summary_and_has_help(capsys):
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    for command in COMMANDS:
        assert command in listing
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert f"usage: sphereconv {command}" in text
        # docstrings serve as descriptions: their reST markup must not reach the terminal
        assert "``" not in text and ":func:`" not in text and ":mod:`" not in text, text


def test_only_the_requested_command_gets_its_arguments():
    parser = cli_main.build_parser(["eval"])
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    assert isinstance(subcommands, dict) and set(subcommands) == set(COMMANDS)
    assert any(a.dest == "checkpoint" for a in subcommands["eval"]._actions)
    assert not any(a.dest == "dry_run" for a in subcommands["train"]._actions)


# ---------------------------------------------------------------- presets


def test_presets_are_package_data_found_by_name():
    presets = list_presets()
    assert {"spherenet9_cifar10", "fashion_mnist_quick", "sphere_resnet32_cifar10plus"} <= set(presets)
    for name in presets:
        path = preset_path(name)
        assert path.is_file() and path == preset_path(f"{name}.yaml")
        assert Path(cli_main.__file__).parents[1] in path.parents  # inside the package, not the checkout root
    with pytest.raises(ConfigError, match="no_such_preset.*spherenet9_cifar10"):
        preset_path("no_such_preset")


def test_config_is_a_file_or_a_preset_name(tmp_path, monkeypatch, capsys):
    own = tmp_path / "spherenet9_cifar10.yaml"
    own.write_text("model: spherenet18\n")
    monkeypatch.chdir(tmp_path)
    assert find_config("spherenet9_cifar10.yaml") == Path("spherenet9_cifar10.yaml")  # an existing file wins
    assert find_config("spherenet9_cifar10") == preset_path("spherenet9_cifar10")
    assert main(["train", "--config", "fashion_mnist_quick", "--dry-run"]) == 0
    assert "dataset: fashion-mnist" in capsys.readouterr().out
    line = one_line_error(main(["train", "--config", "no_such_preset", "--dry-run"]), capsys.readouterr().err)
    assert "no_such_preset" in line and "does not exist" in line and "spherenet9_cifar10" in line


def test_grid_is_a_file_or_the_name_of_a_shipped_grid(capsys):
    assert {"claims", "quickstart"} <= set(list_grids())
    assert (
        find_grid("claims")
        == find_grid("claims.yaml")
        == preset_path("spherenet9_cifar10").parent / "sweeps" / "claims.yaml"
    )
    assert main(["reproduce", "--grid", "quickstart", "--dry-run", "--out", "unused"]) == 0
    assert "grid quickstart:" in capsys.readouterr().out
    line = one_line_error(main(["reproduce", "--grid", "no_such_grid", "--dry-run"]), capsys.readouterr().err)
    assert "no_such_grid" in line and "claims" in line
