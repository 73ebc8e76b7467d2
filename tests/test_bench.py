"""``sphereconv.bench`` and the ``sphereconv bench`` subcommand, on tiny CPU workloads."""

from __future__ import annotations

import json
import time

import pytest
import torch

from sphereconv import bench
from sphereconv.cli import bench as bench_cli
from sphereconv.cli.parsing import CommandLineError, OneLineArgumentParser
from sphereconv.errors import SphereconvError

REQUIRED_KEYS = {"operator", "shape", "dtype", "device", "conv_ms", "sphere_ms", "ratio"}
TINY = bench.LayerShape("tiny", 2, 4, 6, 6)


def _parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="sphereconv")
    bench_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_layer_records_cover_every_operator_and_dtype():
    config = bench.BenchConfig(
        device="cpu", dtypes=["fp32", "bf16"], shapes=[TINY], repeats=2, warmup=1, reference=True
    )
    records = bench.run(config)
    assert [(r["operator"], r["dtype"]) for r in records] == [
        (op, dtype) for dtype in ("fp32", "bf16") for op in ("linear", "cosine", "sigmoid", "learnable_sigmoid")
    ]
    for r in records:
        assert REQUIRED_KEYS <= r.keys()
        assert r["kind"] == "layer" and r["shape"] == "2x4x6x6" and r["device"] == "cpu" and r["repeats"] == 2
        assert r["conv_ms"] > 0 and r["sphere_ms"] > 0 and r["reference_ms"] > 0
        assert r["ratio"] == pytest.approx(r["sphere_ms"] / r["conv_ms"], rel=1e-3)
        assert r["threads"] == 1 and "conv_peak_mb" not in r  # peak memory is measured on CUDA only
    table = bench.format_table(records)
    assert table.count("\n") == len(records) + 1 and "reference ms" in table and "learnable_sigmoid" in table


def test_interleaved_medians_rotate_the_order_and_exclude_warmup():
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    medians = bench.interleaved_medians(steps, torch.device("cpu"), repeats=3, warmup=2)
    assert set(medians) == {"a", "b", "c"}
    assert calls[:3] == ["a", "b", "c"] and calls[3:6] == ["b", "c", "a"] and calls[6:9] == ["c", "a", "b"]
    assert len(calls) == 15


def test_wall_and_cpu_clocks():
    steps = {"sleep": lambda: time.sleep(0.02), "spin": lambda: sum(i * i for i in range(20000))}
    wall = bench.interleaved_medians(steps, torch.device("cpu"), repeats=3, warmup=0, timer="wall")
    cpu = bench.interleaved_medians(steps, torch.device("cpu"), repeats=3, warmup=0, timer="cpu")
    assert wall["sleep"] >= 19.0
    assert cpu["sleep"] < 5.0 < wall["sleep"]  # sleeping (like waiting for a core) costs no CPU time
    assert cpu["spin"] > 0.0
    with pytest.raises(ValueError, match="timer must be one of wall, cpu; got 'gpu'"):
        bench.interleaved_medians(steps, torch.device("cpu"), repeats=1, warmup=0, timer="gpu")


def test_cli_writes_valid_json_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "out.json"
    args = _parser().parse_args(
        [
            "bench",
            "--device",
            "cpu",
            "--shape",
            "2x4x6x6",
            "--shape",
            "1x3x5x7",
            "--operators",
            "cosine,lr_sigmoid",
            "--dtypes",
            "fp32",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--timer",
            "cpu",
            "--json",
            str(out),
        ]
    )
    assert args.func(args) == 0
    records = json.loads(out.read_text())
    assert len(records) == 4
    assert {r["shape"] for r in records} == {"2x4x6x6", "1x3x5x7"}
    assert {r["operator"] for r in records} == {"cosine", "learnable_sigmoid"}
    for r in records:
        assert REQUIRED_KEYS <= r.keys() and r["timer"] == "cpu" and r["dtype"] == "fp32"
    printed = capsys.readouterr().out
    assert "sphereconv bench on cpu" in printed and "1x3x5x7" in printed and f"wrote 4 records to {out}" in printed


def test_cli_models_only_times_training_steps(tmp_path):
    out = tmp_path / "models.json"
    args = _parser().parse_args(
        [
            "bench",
            "--device",
            "cpu",
            "--models-only",
            "--model-batch",
            "2",
            "--model-width-mult",
            "0.0625",
            "--operators",
            "linear",
            "--dtypes",
            "bf16",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out),
        ]
    )
    assert args.func(args) == 0
    (record,) = json.loads(out.read_text())
    assert REQUIRED_KEYS <= record.keys()
    assert record["kind"] == "model" and record["model"] == "spherenet9" and record["operator"] == "linear"
    assert record["dtype"] == "bf16" and record["batch"] == 2
    assert record["conv_images_per_s"] == pytest.approx(2 / record["conv_ms"] * 1e3, rel=1e-3)
    assert record["images_per_s_ratio"] == pytest.approx(record["conv_ms"] / record["sphere_ms"], rel=1e-3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shape", "2x4x6"], "shape must be NxCinxCoutxHW"),
        (["--shape", "0x4x6x6"], "four positive integers"),
        (["--operators", "cosine,tanh"], "unknown operator tanh"),
        (["--dtypes", "fp16"], "unknown dtype fp16"),
        (["--repeats", "0"], "positive integer"),
        (["--timer", "gpu"], "invalid choice"),
    ],
)
def test_cli_rejects_bad_flags_in_one_line(argv, message):
    with pytest.raises(CommandLineError, match=message):
        _parser().parse_args(["bench", *argv])


def test_bad_device_is_a_user_error():
    args = _parser().parse_args(["bench", "--device", "tpu"])
    with pytest.raises(SphereconvError, match="--device: device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'tpu'"):
        args.func(args)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available; use --device cpu"):
            bench.resolve_device("cuda")


def test_library_config_validation():
    with pytest.raises(ValueError, match="unknown operator 'none'"):
        bench.run(bench.BenchConfig(device="cpu", operators=["none"]))
    with pytest.raises(ValueError, match="nothing to measure"):
        bench.run(bench.BenchConfig(device="cpu", layers=False, models=False))
    assert bench.parse_shape("16x128x128x32") == bench.LayerShape("16x128x128x32", 16, 128, 128, 32)
    assert [s.label for s in bench.CPU_LAYER_SHAPES] == [
        "16x128x128x32",
        "16x192x192x16",
        "16x256x256x8",
        "2x256x256x56",
    ]
    assert [s.label for s in bench.CUDA_LAYER_SHAPES] == [
        "128x128x128x32",
        "128x192x192x16",
        "128x256x256x8",
        "64x256x256x56",
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shape", "100000x3x4x100000"], "shape 100000x3x4x100000 needs about .* GB, more than the limit of"),
        (
            ["--models-only", "--model-batch", "100000000"],
            "--model-batch 100000000 at --model-width-mult 1 needs about",
        ),
        (["--threads", "100000"], "--threads must be at most"),
        (["--seed", str(2**64)], "seed must be between 0 and 18446744073709551615"),
        (["--device", "cuda:99"], "--device: "),
    ],
)
def test_cli_rejects_impossible_workloads_before_allocating(argv, message, tmp_path, monkeypatch):
    allocated = []
    monkeypatch.setattr(bench, "bench_layers", lambda *a, **k: allocated.append(a) or [])
    monkeypatch.setattr(bench, "bench_models", lambda *a, **k: allocated.append(a) or [])
    args = _parser().parse_args(["bench", "--device", "cpu", *argv] if "--device" not in argv else ["bench", *argv])
    with pytest.raises(SphereconvError, match=message) as info:
        args.func(args)
    assert "\n" not in str(info.value) and not allocated


def test_memory_limit_follows_the_free_memory(monkeypatch):
    shape = bench.parse_shape("16x128x128x32")
    need = bench.layer_memory_bytes(shape)
    config = bench.BenchConfig(device="cpu", shapes=[shape])
    monkeypatch.setattr(bench, "available_memory_bytes", lambda device: int(need / bench.MEMORY_FRACTION) + 1)
    bench.validate(config)  # fits
    monkeypatch.setattr(bench, "available_memory_bytes", lambda device: need)
    with pytest.raises(ValueError, match="shape 16x128x128x32 needs about"):
        bench.validate(config)


def test_json_path_is_checked_before_the_run(tmp_path):
    # A folder is refused while parsing; a file in a missing folder before anything is timed.
    for path, message in ((tmp_path / "missing" / "x.json", "does not exist"), (tmp_path, "which is a folder")):
        with pytest.raises(CommandLineError, match=message):
            args = _parser().parse_args(["bench", "--device", "cpu", "--shape", "2x4x6x6", "--json", str(path)])
            args.func(args)


def test_cpu_without_fast_bf16_times_fp32_only_and_says_so(monkeypatch):
    monkeypatch.setattr(bench, "cpu_has_fast_bf16", lambda: False)
    notes: list[str] = []
    records = bench.run(
        bench.BenchConfig(device="cpu", shapes=[TINY], operators=["cosine"], repeats=1, warmup=0), notes=notes
    )
    assert [r["dtype"] for r in records] == ["fp32"]
    assert len(notes) == 1 and "bf16 skipped" in notes[0] and "--dtypes fp32,bf16" in notes[0]
    monkeypatch.setattr(bench, "cpu_has_fast_bf16", lambda: True)
    assert bench.default_dtypes(torch.device("cpu")) == (("fp32", "bf16"), None)


def test_default_rounds_shrink_to_the_time_budget(monkeypatch):
    monkeypatch.setattr(bench, "CPU_TIME_BUDGET_S", 1e-6)  # spent at once: the minimum of rounds
    steps = {"slow": lambda: time.sleep(0.01)}
    samples = bench.interleaved_samples(steps, torch.device("cpu"), repeats=20, warmup=1, budget_s=0.05)
    assert bench.MIN_REPEATS <= len(samples["slow"]) < 20
    notes: list[str] = []
    records = bench.run(
        bench.BenchConfig(
            device="cpu", shapes=[bench.parse_shape("2x8x8x16")], dtypes=["fp32"], operators=["cosine"], warmup=1
        ),
        notes=notes,
    )
    assert records[0]["repeats"] == bench.MIN_REPEATS < bench.CPU_REPEATS
    assert "rounds, to stay within the CPU time budget" in notes[0]
    # an explicit --repeats is honoured in full
    records = bench.run(
        bench.BenchConfig(device="cpu", shapes=[TINY], dtypes=["fp32"], operators=["cosine"], repeats=5, warmup=0)
    )
    assert records[0]["repeats"] == 5


def test_a_failed_allocation_during_the_run_is_one_line(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9000000000 bytes.")

    monkeypatch.setattr(bench, "bench_layers", out_of_memory)
    args = _parser().parse_args(["bench", "--device", "cpu", "--shape", "2x4x6x6"])
    with pytest.raises(CommandLineError, match="out of memory on cpu: DefaultCPUAllocator: can't allocate memory"):
        args.func(args)
    monkeypatch.setattr(bench, "bench_layers", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug is not disguised as a user error
        args.func(args)


def test_json_write_is_atomic(tmp_path):
    out = tmp_path / "out.json"
    out.write_text('[{"kept": true}]\n')
    with pytest.raises(TypeError):  # a record that cannot be written: the old file stays whole
        bench.write_json([{"operator": "cosine"}, {"operator": object()}], str(out))
    assert json.loads(out.read_text()) == [{"kept": True}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left behind
    bench.write_json([{"operator": "cosine", "ratio": 1.5}], str(out))
    assert json.loads(out.read_text()) == [{"operator": "cosine", "ratio": 1.5}]


def test_repeated_operators_and_dtypes_are_timed_once():
    args = _parser().parse_args(
        ["bench", "--operators", "cosine,lr_sigmoid,learnable_sigmoid,cosine", "--dtypes", "fp32,fp32"]
    )
    assert args.operators == ["cosine", "learnable_sigmoid"] and args.dtypes == ["fp32"]
