"""``sphereconv selftest``: passes on this CPU, and catches a broken fused path by name."""

from __future__ import annotations

import re

import pytest
import torch

from sphereconv import selftest
from sphereconv.cli.main import main
from sphereconv.nn import _fused

CPU = torch.device("cpu")


def _rows(text: str) -> dict[tuple[str, str], list[str]]:
    """Table rows of the self-test output keyed by (case, dtype)."""
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 6 and cells[5] in (selftest.PASS, selftest.FAIL, selftest.SKIP):
            rows[(cells[0], cells[1])] = cells
    return rows


def test_selftest_passes_on_cpu_and_covers_every_operator_layer_and_dtype(capsys):
    assert main(["selftest", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    layer_names = {case for case, _ in rows if not case.startswith("spherenet9")}
    for op in ("linear", "cosine", "sigmoid", "learnable_sigmoid"):
        for layer in (
            "conv1d",
            "conv2d",
            "conv3d",
            "linear",
            "conv2d-groups2",
            "conv2d-stride2",
            "conv2d-dilation2",
            "conv2d-reflect",
            "conv2d-replicate",
            "conv2d-circular",
        ):
            assert f"{layer}/{op}" in layer_names
    cpp_built = _fused.kernel_status()["cpu_kernels"] == "cpp"
    if cpp_built:
        assert rows[("conv2d/cosine", "float32")][2] == "fused-cpp"
    dtypes = {dtype for _, dtype in rows}
    assert {"float64", "float32", "autocast-bfloat16"} <= dtypes
    for (case, dtype), cells in rows.items():
        if case.startswith("spherenet9"):
            continue
        # No Triton on a CPU; the C++ kernels serve eager float32/float64 convolutions where they built.
        plain_aten = dtype.startswith("autocast") or case.startswith("linear") or not cpp_built
        assert cells[2] == "fused-aten" if plain_aten else cells[2] in ("fused-cpp", "fused-aten"), (case, dtype)
        assert float(cells[3]) <= float(cells[4]), (case, dtype)
    train = [cells for (case, _), cells in rows.items() if case.startswith("spherenet9")]
    assert len(train) == 1 and train[0][5] == selftest.PASS
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", train[0][6]).groups())
    assert last < first
    assert re.search(r"selftest passed: \d+ checks", out)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient times 1.01 backward: a fused backward that is 1% off."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


def test_a_wrong_fused_forward_fails_the_cli_and_names_the_case(monkeypatch, capsys):
    original = _fused.fused_sphere_convnd

    def broken(input, weight, bias, stride, padding, dilation, groups, operator, *args):
        out = original(input, weight, bias, stride, padding, dilation, groups, operator, *args)
        return out * 1.01 if operator == "sigmoid" else out

    monkeypatch.setattr(_fused, "fused_sphere_convnd", broken)
    assert main(["selftest", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rows[("conv2d/sigmoid", "float32")][5] == selftest.FAIL
    assert rows[("conv2d/cosine", "float32")][5] == selftest.PASS
    assert rows[("linear/sigmoid", "float32")][5] == selftest.PASS  # SphereLinear has its own fused node
    assert "selftest FAILED" in out and "conv1d/sigmoid [float64]" in out


def test_a_wrong_backward_or_a_crash_is_a_failed_check(monkeypatch):
    original = _fused.fused_sphere_linear

    def wrong_backward(*args):
        return _ScaleGradient.apply(original(*args))

    monkeypatch.setattr(_fused, "fused_sphere_linear", wrong_backward)
    case = next(c for c in selftest.layer_cases(["linear"]) if c.name == "linear/linear")
    result = selftest.check_layer(case, "float32", CPU)
    assert result.status == selftest.FAIL and result.error == pytest.approx(0.01, rel=0.05)

    def crash(*args):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(_fused, "fused_sphere_linear", crash)
    result = selftest.check_layer(case, "float32", CPU)
    assert result.status == selftest.FAIL and result.note == "RuntimeError: kernel launch failed"


def test_training_check_fails_when_the_loss_does_not_decrease(monkeypatch):
    monkeypatch.setattr(selftest, "TRAIN_LR", 0.0)  # no update: the same loss at every step
    result, losses = selftest.check_training(CPU)
    assert result.status == selftest.FAIL
    assert len(losses) == selftest.TRAIN_STEPS and losses[-1] == pytest.approx(losses[0])


def test_training_without_fashion_mnist_says_it_used_random_images(monkeypatch):
    from sphereconv import data
    from sphereconv.errors import DatasetError

    def missing(*args, **kwargs):
        raise DatasetError("fashion-mnist not found")

    monkeypatch.setattr(data, "load_dataset", missing)
    result, losses = selftest.check_training(CPU)
    assert "random images" in result.note
    assert result.status == selftest.PASS and losses[-1] < losses[0]


def test_unknown_device_is_a_one_line_error(capsys):
    assert main(["selftest", "--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tpu" in err and "cpu" in err


def _python_node_output(monkeypatch, layer, x):
    """The layer's output through the fused autograd function (as on CUDA), not the C++ operator."""
    monkeypatch.setattr(_fused, "_cpp_layer_selected", lambda *args: False)
    out = layer(x)
    assert out.grad_fn.name() == "_FusedSphereConvFnBackward"
    return out


def test_kernel_path_names_triton_and_a_fallen_back_case(monkeypatch):
    layer = selftest.layer_cases(["cosine"])[1].build()  # conv2d/cosine
    x = torch.randn(2, 3, 7, 7)
    out = layer(x)
    on_cpu = "fused-cpp" if _fused.kernel_status()["cpu_kernels"] == "cpp" else "fused-aten"
    assert selftest.kernel_path(layer, x, out) == on_cpu
    out = _python_node_output(monkeypatch, layer, x)
    monkeypatch.setattr(_fused, "_use_triton", lambda t: True)  # as on a CUDA device with Triton
    monkeypatch.setattr(selftest, "kernel_status", lambda: {"backend": "auto", "triton_installed": True, "cases": []})
    assert selftest.kernel_path(layer, x, out) == "fused-triton"
    fallen = {"operator": "cosine", "dtype": "float32", "device": "cpu", "kernels": "aten", "note": "launch failed"}
    monkeypatch.setattr(
        selftest, "kernel_status", lambda: {"backend": "auto", "triton_installed": True, "cases": [fallen]}
    )
    assert selftest.kernel_path(layer, x, out) == "fused-aten*"
    assert selftest.kernel_summary()[1] == "  fell back: cosine float32 cpu: launch failed"
    monkeypatch.setattr(selftest, "kernel_status", lambda: {"backend": "aten", "triton_installed": True, "cases": []})
    assert selftest.kernel_path(layer, x, out) == "fused-aten"  # forced off by SPHERECONV_KERNELS=aten
    with selftest.use_reference_impl():
        assert selftest.kernel_path(layer, x, layer(x)) == "reference"


def test_kernel_path_under_the_cpp_backend_where_triton_could_run(monkeypatch):
    """SPHERECONV_KERNELS=cpp means ATen on CUDA: the row must not claim the Triton kernels."""
    layer = selftest.layer_cases(["cosine"])[1].build()  # conv2d/cosine
    x = torch.randn(2, 3, 7, 7)
    out = _python_node_output(monkeypatch, layer, x)
    monkeypatch.setattr(_fused, "_use_triton", lambda t: True)  # as on a CUDA device with Triton
    monkeypatch.setattr(selftest, "kernel_status", lambda: {"backend": "cpp", "triton_installed": True, "cases": []})
    assert selftest.kernel_path(layer, x, out) == "fused-aten"


def test_kernel_summary_names_the_cpu_epilogue(monkeypatch):
    status = {"backend": "auto", "triton_installed": False, "cases": [], "cpu_kernels": "cpp", "cpu_note": "built"}
    monkeypatch.setattr(selftest, "kernel_status", lambda: status)
    assert selftest.kernel_summary()[1:] == ["  CPU: C++ kernels: built"]
    status.update(cpu_kernels="aten", cpu_note="not built (no C++ compiler)")
    assert selftest.kernel_summary()[1:] == ["  CPU: ATen epilogue: not built (no C++ compiler)"]
    status.update(cpu_kernels="undecided", cpu_note="")  # no CPU convolution has run: nothing to say
    assert selftest.kernel_summary()[1:] == []
