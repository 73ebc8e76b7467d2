"""``torch.compile``, ``torch.export`` and ONNX export of a SphereConv2d agree with eager mode."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sphereconv.nn import DecoupledConv2d, SphereConv2d, SphereNorm2d


def _layer(operator="sigmoid", padding_mode="zeros"):
    torch.manual_seed(0)
    return SphereConv2d(3, 4, 3, padding=1, padding_mode=padding_mode, operator=operator)


def test_torch_compile_inductor_matches_eager():
    # Inductor compiles the forward in about 10 s on two shared cores: forward only here; the
    # backward through a compiled graph is checked with aot_eager below.
    layer = _layer("linear")
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("operator", ["linear", "learnable_sigmoid"])
def test_torch_compile_aot_eager_forward_and_backward_match_eager(operator):
    layer = _layer(operator, padding_mode="reflect")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    _assert_compiled_matches_eager(compiled, layer, x)


def _assert_compiled_matches_eager(compiled, layer, x):
    """Output and the gradients of the input and every parameter agree with the eager layer."""
    out_c = compiled(x)
    grad_out = torch.randn_like(out_c)
    grads_c = torch.autograd.grad(out_c, [x, *layer.parameters()], grad_out)
    out_e = layer(x)
    grads_e = torch.autograd.grad(out_e, [x, *layer.parameters()], grad_out)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


def test_torch_compile_with_dynamic_shapes_matches_eager():
    # dynamic=True traces the sizes and the ints handed across a graph break as symbols: the
    # argument checks must hold for them (Dynamo evaluates ``int in (symbol, ...)`` as False).
    layer = _layer("learnable_sigmoid")
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", dynamic=True)
    for shape in [(2, 3, 8, 8), (3, 3, 6, 7)]:
        _assert_compiled_matches_eager(compiled, layer, torch.randn(shape, requires_grad=True))


@pytest.mark.parametrize(
    "make",
    [
        lambda: _layer("cosine"),
        lambda: _layer("learnable_sigmoid", padding_mode="circular"),
        lambda: SphereNorm2d(3, 4, 3, padding=1, operator="linear"),
        lambda: DecoupledConv2d(3, 4, 3, padding=1, magnitude="tanh", operator="square_cosine", learnable=True),
    ],
    ids=["sphere-cosine", "sphere-lr-sigmoid-circular", "sphere-norm", "decoupled-learnable"],
)
def test_torch_export_matches_eager(make):
    layer = make()
    if isinstance(layer, DecoupledConv2d):
        layer(torch.randn(4, 3, 8, 8))  # a training step fills the running mean used in eval
    layer.eval()
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(layer, (x,))
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-6, atol=1e-6)
        other = torch.randn(2, 3, 8, 8)  # not the example input: the graph is not specialised on values
        torch.testing.assert_close(exported.module()(other), layer(other), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
    reason="ONNX export needs the optional 'onnx' extra (onnx, onnxscript)",
)
def test_onnx_export_runs_in_the_onnx_reference_evaluator():
    import onnx
    from onnx.reference import ReferenceEvaluator

    layer = _layer("sigmoid").eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.onnx.export(layer, (x,), dynamo=True, verbose=False)
    model = program.model_proto
    onnx.checker.check_model(model)
    (out,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), layer(x), rtol=1e-5, atol=1e-5)
