"""CUDA checks of the fused SphereConv (run by benchmarks/gpu_check.sh on a machine with a GPU).

1. The Triton epilogue kernels run (and are the ones used) and agree with the ATen epilogue on
   float32, bfloat16 and float16 storage.
2. Fused vs reference, forward and every gradient, for every operator and several geometries:
   float32 with TF32 off (relative error < 1e-5), and float32 with TF32 on, bf16 and fp16 autocast,
   each compared against a float64 ground truth (the fused error must not exceed the reference
   path's by more than the dtype's rounding).
3. ``torch.compile`` (inductor) of a small SphereNet block agrees with eager mode, forward and
   backward.
4. Peak memory of one layer's forward+backward, fused vs reference vs nn.Conv2d.

Prints one line per check and exits non-zero if any failed. ``--cpu-interpret`` runs checks 1-3 on
CPU tensors through Triton's interpreter instead (set ``TRITON_INTERPRET=1``; slow, small shapes):
a dry run of this script on a machine without a GPU.
"""

from __future__ import annotations

import os
import sys
import time

import torch

import sphereconv.nn.functional as SF
from sphereconv.nn import SphereConv2d, _fused, _triton

OPERATORS = ("cosine", "linear", "sigmoid", "learnable_sigmoid")
GEOMETRIES = {
    "2d-pad1": (2, 32, 48, 3, dict(padding=1)),
    "2d-stride2-dil2-groups2": (2, 32, 48, 3, dict(stride=2, padding=2, dilation=2, groups=2)),
    "2d-fc6-4x4": (2, 64, 32, 4, dict()),
    "1d": (1, 16, 24, 3, dict(padding=1)),
    "3d": (3, 8, 12, 3, dict(padding=1)),
}
# Allowed relative error (max abs difference / max abs value) of each precision mode against the
# float64 truth: TF32 and bf16 keep 10 and 8 mantissa bits, fp16 keeps 10.
TRUTH_TOL = {"tf32": 2e-2, "bf16": 6e-2, "fp16": 2e-2}
FP32_TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


FAILURES: list[str] = []


def case(geometry: str, operator: str, device: str, batch: int, seed: int = 0):
    dims, cin, cout, kernel, kwargs = GEOMETRIES[geometry]
    gen = torch.Generator().manual_seed(seed)
    size = 4 if geometry == "2d-fc6-4x4" else (12 if dims < 3 else 6)
    x = torch.randn(batch, cin, *([size] * dims), generator=gen)
    w = torch.randn(cout, cin // kwargs.get("groups", 1), *([kernel] * dims), generator=gen)
    b = torch.randn(cout, generator=gen)
    k = torch.rand(cout, generator=gen) + 0.2 if operator == "learnable_sigmoid" else None
    return [t.to(device) if t is not None else None for t in (x, w, b, k)], kwargs


def run(x, w, b, k, kwargs, operator, impl, dtype=torch.float32, autocast=None):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
    kk = k.detach().to(dtype).requires_grad_() if k is not None else 0.3
    inputs = leaves + ([kk] if k is not None else [])
    device = x.device.type
    ctx = torch.autocast(device, dtype=autocast) if autocast is not None else torch.autocast(device, enabled=False)
    with ctx:
        out = SF.sphere_convnd(*leaves, operator=operator, sigmoid_k=kk, impl=impl, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return [out, *grads]


def check(condition: bool, message: str) -> None:
    print(("ok    " if condition else "FAIL  ") + message, flush=True)
    if not condition:
        FAILURES.append(message)


def check_kernels(device: str) -> None:
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        inner = (torch.randn(4, 64, 9, 7, generator=gen) * 0.3).to(device, dtype)
        r = (torch.rand(4, 2, 9, 7, generator=gen) * 0.4).to(device)
        grad = torch.randn(4, 64, 9, 7, generator=gen).to(device)
        k = (torch.rand(64, generator=gen) + 0.2).to(device)
        bias = torch.randn(64, generator=gen).to(device)
        for operator in OPERATORS:
            kk = k if operator == "learnable_sigmoid" else 0.3
            out = _triton.forward_epilogue(inner, r, 2, operator, kk, bias, torch.float32)
            c = inner.float().unflatten(1, (2, 32)) * r.unsqueeze(2)
            k_g = k.reshape(2, 32, 1, 1) if operator == "learnable_sigmoid" else 0.3
            need_k = operator == "learnable_sigmoid"
            expected, extra = _fused.forward_epilogue(c, operator, k_g, bias.reshape(2, 32, 1, 1), keep_angle=need_k)
            check(rel(out, expected.reshape(out.shape)) < 1e-5, f"triton forward {operator} {dtype}: {rel(out, expected.reshape(out.shape)):.1e}")
            d_inner, d_sq, d_k, d_bias = _triton.backward_epilogue(grad, inner, r, 2, operator, kk, need_k, True, dtype)
            d_c, scale, dk, dk_scale = _fused.backward_epilogue(grad.unflatten(1, (2, 32)), c, extra, operator, k_g, need_k)
            want = (d_c * scale * r.unsqueeze(2)).reshape(d_inner.shape)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            check(d_inner.dtype == dtype and rel(d_inner, want) < tol, f"triton backward d_inner {operator} {dtype}: {rel(d_inner, want):.1e}")
            want_sq = (d_c * c).sum(2) * r.square() * (-0.5 * scale)
            check(rel(d_sq, want_sq) < 1e-4, f"triton backward d_sumsq {operator} {dtype}: {rel(d_sq, want_sq):.1e}")
            check(rel(d_bias, grad.sum((0, 2, 3))) < 1e-5, f"triton backward d_bias {operator} {dtype}")
            if need_k:
                want_k = (dk.sum_to_size(2, 32, 1, 1) * dk_scale).reshape(-1)
                check(rel(d_k, want_k) < 1e-4, f"triton backward d_k {dtype}: {rel(d_k, want_k):.1e}")
        sq = _triton.channel_sq_sum(inner, 2)
        check(rel(sq, inner.float().square().unflatten(1, (2, 32)).sum(2)) < 1e-5, f"triton channel_sq_sum {dtype}")


def check_paths(device: str, batch: int) -> None:
    calls = {"n": 0}
    original = _triton.forward_epilogue

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    _triton.forward_epilogue = counted
    try:
        for geometry in GEOMETRIES:
            for operator in OPERATORS:
                (x, w, b, k), kwargs = case(geometry, operator, device, batch)
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
                before = calls["n"]
                fused = run(x, w, b, k, kwargs, operator, "fused")
                check(calls["n"] == before + 1, f"{geometry} {operator}: the Triton epilogue ran")
                ref = run(x, w, b, k, kwargs, operator, "reference")
                errs = [rel(f, r) for f, r in zip(fused, ref)]
                check(max(errs) < FP32_TOL, f"{geometry} {operator} fp32 (TF32 off) fused vs reference: {max(errs):.1e}")
                truth = run(x, w, b, k, kwargs, operator, "reference", dtype=torch.float64)
                modes = {"tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
                if device == "cpu":
                    modes.pop("tf32")  # no TF32 on CPU
                for mode, autocast in modes.items():
                    torch.backends.cudnn.allow_tf32 = mode == "tf32"
                    f_err = max(rel(a, t) for a, t in zip(run(x, w, b, k, kwargs, operator, "fused", autocast=autocast), truth))
                    r_err = max(rel(a, t) for a, t in zip(run(x, w, b, k, kwargs, operator, "reference", autocast=autocast), truth))
                    check(f_err < TRUTH_TOL[mode] and f_err <= 2 * r_err + TRUTH_TOL[mode] / 4,
                          f"{geometry} {operator} {mode}: fused error {f_err:.1e}, reference error {r_err:.1e} (vs float64)")
    finally:
        _triton.forward_epilogue = original
        torch.backends.cudnn.allow_tf32 = True


def check_compile(device: str) -> None:
    torch.manual_seed(0)
    block = torch.nn.Sequential(
        SphereConv2d(16, 32, 3, padding=1, operator="learnable_sigmoid"), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        SphereConv2d(32, 32, 3, padding=1, operator="linear", bias=True),
    ).to(device)
    x = torch.randn(8, 16, 16, 16, device=device, requires_grad=True)
    grad = torch.randn(8, 32, 16, 16, device=device)
    params = [x, *block.parameters()]
    eager = [block(x), *torch.autograd.grad(block(x), params, grad)]
    t0 = time.time()
    compiled = torch.compile(block, backend="inductor" if device == "cuda" else "aot_eager")
    out = compiled(x)
    got = [out, *torch.autograd.grad(compiled(x), params, grad)]
    errs = [rel(a, b) for a, b in zip(got, eager)]
    # 1e-3: the learnable-k gradient behind BatchNorm is a sum that nearly cancels (BatchNorm's
    # input gradient has zero mean per channel), so reordered float32 sums differ more than 1e-5.
    check(max(errs) < 1e-3, f"torch.compile vs eager, forward+backward: max relative error {max(errs):.1e} "
                            f"({time.time() - t0:.0f} s)")


def check_memory(device: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 128, 32, 32, device=device, requires_grad=True)
    grad = torch.randn(64, 128, 32, 32, device=device)
    layers = {"conv": torch.nn.Conv2d(128, 128, 3, padding=1, bias=False).to(device)}
    for op in OPERATORS:
        layers[op] = SphereConv2d(128, 128, 3, padding=1, operator=op).to(device)
    for name, layer in layers.items():
        for impl in (("fused", "reference") if name != "conv" else ("plain",)):
            def step():
                if impl == "reference":
                    with SF.use_reference_impl():
                        out = layer(x)
                else:
                    out = layer(x)
                torch.autograd.grad(out, [x, *layer.parameters()], grad)

            step()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            print(f"info  peak memory of one fwd+bwd, 64x128x128x32 fp32, {name} {impl}: "
                  f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB", flush=True)


def main(argv: list[str]) -> int:
    import triton

    if "--cpu-interpret" in argv:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("FAIL  --cpu-interpret needs TRITON_INTERPRET=1 in the environment", flush=True)
            return 1
        torch.set_num_threads(1)
        _fused._triton_on_cpu = True
        device, batch = "cpu", 2
        print(f"info  dry run on CPU through the Triton interpreter: torch {torch.__version__}, triton {triton.__version__}")
    else:
        if not torch.cuda.is_available():
            print("FAIL  no CUDA device", flush=True)
            return 1
        device, batch = "cuda", 8
        print(f"info  torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}", flush=True)
        check(_triton.available(), "Triton is importable and a CUDA device is present")
    check_kernels(device)
    check_paths(device, batch)
    check_compile(device)
    if device == "cuda":
        check_memory(device)
    if FAILURES:
        print(f"{len(FAILURES)} check(s) FAILED", flush=True)
        return 1
    print("all GPU checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
