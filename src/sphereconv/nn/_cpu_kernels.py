"""C++ kernels for the fused SphereConv on CPU, compiled at first use (optional).

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Section 2.1; the formulas are those of
:mod:`sphereconv.nn._fused`. There, each layer call runs about 130 small ATen ops, the epilogue alone
sweeping the output about five times (clamp, arcsine, logistic function, bias forward; clamp mask,
arccos derivative, products and reductions backward). These kernels do each step in one pass:

- :func:`filter_unit` / :func:`filter_unit_backward`: ``w_hat = w / |w|_e`` with the filter's
  largest element, and ``dL/dw`` from ``dL/dw_hat`` (projection plus the gradient of the largest
  element), one call each for all filters;
- :func:`sample_stats`: the largest |x| of each sample-group with its sign and ``sum x^2`` over the
  group's channels, one read of the input;
- :func:`input_backward`: ``dL/dx += 2 x share`` with ``share`` the windows' transpose of
  ``dL/dsumsq``, plus the gradient of the largest element, found in the same pass;
- :func:`forward_epilogue`: ``r = 1 / |x_patch|_e`` (the window sums of ``sum x^2`` over the
  convolution's geometry, stride, padding and dilation, 1-d to 3-d, plus ``eps m^2``), then ``c =
  inner * r`` (written over the conv output, which becomes the saved cosine), ``out = g(clamp(c, -1,
  1)) + b`` and, for the sigmoids, ``sigmoid(2u)`` for the backward;
- :func:`backward_epilogue`: ``dL/dinner = g'(c) [|c| <= 1] dL/dout * r``, the patch-norm gradient
  ``-r^2/2 sum_p dL/dc * c`` and per-sample, per-channel partial sums for the bias and a learnable k
  (whose ``dg/dk`` takes the arcsine of the saved cosine again);
- :func:`channel_sq_sum`: ``sum x^2`` over the input channels of each group.

The arcsine (linear and sigmoid operators) runs block by block: a block of cosines all within 1/2,
the usual case for filters not aligned with their patches, skips the square root of the polynomial's
other branch. The sigmoids' constants (``1/k``, ``s_k``, the ``dg/dk`` coefficient) are computed in
the kernels from k.

Inputs that need the power-of-two rescaling (largest values outside the fused path's direct range)
take the ATen filter norm and peak search; the gradients then take the kernels with the scales.

The source below is plain C++ with C entry points, called through :mod:`ctypes` on contiguous
float32/float64 tensors: without PyTorch's headers it builds in a few seconds. It is built once per
source, compiler and flags (which follow PyTorch's CPU capability) into the PyTorch extensions
directory (``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and loaded from there
afterwards. Without a C++ compiler, or if building or loading fails for any reason, :func:`load`
returns None and the fused path keeps its ATen ops (:mod:`sphereconv.nn._fused` warns once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

OPERATOR_CODES = {"cosine": 0, "linear": 1, "sigmoid": 2, "learnable_sigmoid": 2}
# Compiler flags: -fno-math-errno and -fno-trapping-math let the selects and square roots of the
# arcsine vectorise without changing a result (no reassociation, no fast-math); -ffp-contract=off
# rounds every product as ATen's separate ops do (sums of squares agree bit for bit with the ATen
# path, which matters where a cosine rounds to +-1); AVX2/AVX-512 and FMA where PyTorch dispatches
# to them (512-bit vectors: twice the arcsine and exponential throughput of AVX2 on AMD EPYC).
_BASE_FLAGS = (
    "-O3",
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffp-contract=off",
)
_AVX2_FLAGS = ("-mavx2", "-mfma")
_AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mprefer-vector-width=512")
_CXX_ENV = "CXX"
# A build takes a few seconds; a compiler that hangs must not hang the first layer call for good.
_BUILD_TIMEOUT_S = 300

_SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr double kHalfPi = 1.57079632679489661923;
constexpr double kLinearScale = 0.63661977236758134308;  // 2/pi: g = (2/pi) asin(c)

enum Operator : int { kCosine = 0, kLinear = 1, kSigmoid = 2 };

// a * b + c in one rounding where the CPU has FMA (the polynomials below only; products elsewhere
// are rounded as ATen rounds them)
inline float mul_add(float a, float b, float c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// float: the arcsine and the exponential by the polynomials of the Cephes Math Library (S. L. Moshier,
// asinf.c and expf.c; about 2.5e-7 and 1.5e-7 relative error), which vectorise; double: the C library.
inline float fast_asin(float x) {
  // asin(x) = pi/2 - 2 asin(sqrt((1 - |x|)/2)) for |x| > 1/2; every branch evaluated, then selected
  float a = std::fabs(x);
  bool big = a > 0.5f;
  float half = 0.5f * (1.0f - a);
  float z = big ? half : a * a;
  float s = big ? std::sqrt(half) : a;
  float p = mul_add(mul_add(mul_add(mul_add(4.2163199048e-2f, z, 2.4181311049e-2f), z, 4.5470025998e-2f), z,
                            7.4953002686e-2f), z, 1.6666752422e-1f);
  p = mul_add(p * z, s, s);
  float r = big ? static_cast<float>(kHalfPi) - 2.0f * p : p;
  return std::copysign(r, x);
}

inline double fast_asin(double x) { return std::asin(x); }

inline double fast_exp(double x) { return std::exp(x); }

// fast_exp for x in [-87, 88] (no clamp: a fifth of the sigmoid's forward); double: the C library.
inline float fast_exp_in_range(float x) {
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  float z = x * x;
  float p = mul_add(mul_add(mul_add(mul_add(mul_add(1.9875691500e-4f, x, 1.3981999507e-3f), x, 8.3334519073e-3f), x,
                                    4.1665795894e-2f), x, 1.6666665459e-1f), x, 5.0000001201e-1f);
  p = mul_add(p, z, x) + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline double fast_exp_in_range(double x) { return std::exp(x); }

inline float fast_exp(float x) { return fast_exp_in_range(x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x)); }

template <typename T>
inline T clamp_unit(T c) { return c > T(1) ? T(1) : (c < T(-1) ? T(-1) : c); }

// fast_asin for |x| <= 1/2 (the same polynomial and rounding, without the square root of the other
// branch, a third of the sigmoid's forward); double: the C library.
inline float asin_small(float x) {
  float z = x * x;
  float p = mul_add(mul_add(mul_add(mul_add(4.2163199048e-2f, z, 2.4181311049e-2f), z, 4.5470025998e-2f), z,
                            7.4953002686e-2f), z, 1.6666752422e-1f);
  return mul_add(p * z, x, x);
}

inline double asin_small(double x) { return std::asin(x); }

// Cosines are mostly small (|c| ~ 1/sqrt(fan-in) for unaligned filters): blocks of this many values
// whose largest |c| is at most 1/2 take asin_small.
constexpr int64_t kArcsineBlock = 256;

// block(start, stop, small) over the blocks of count values of c; small: every |c| in the block is at
// most 1/2 (a NaN does not count as larger: it takes either branch and stays NaN).
template <typename T, typename Block>
inline void for_each_arcsine_block(const T* c, int64_t count, Block block) {
  for (int64_t start = 0; start < count; start += kArcsineBlock) {
    const int64_t stop = start + kArcsineBlock < count ? start + kArcsineBlock : count;
    T largest = T(0);
#pragma omp simd reduction(max : largest)
    for (int64_t s = start; s < stop; ++s) {
      T a = std::fabs(c[s]);
      largest = a > largest ? a : largest;
    }
    block(start, stop, largest <= T(0.5));
  }
}

// op(s, asin(clamp(c[s]))) for s in [0, count), vectorised, block by block.
template <typename T, typename Op>
inline void for_each_arcsine(const T* c, int64_t count, Op op) {
  for_each_arcsine_block(c, count, [&](int64_t start, int64_t stop, bool small) {
    if (small) {
#pragma omp simd
      for (int64_t s = start; s < stop; ++s) op(s, asin_small(c[s]));
    } else {
#pragma omp simd
      for (int64_t s = start; s < stop; ++s) op(s, fast_asin(clamp_unit(c[s])));
    }
  });
}

// The sigmoid's per-channel constants from its k (Sec. 2.1): 1/k, s_k = 1/tanh(pi/4k) and the
// dg/dk coefficient (s_k^2 - 1) pi / (4 k^2).
template <typename T>
struct SigmoidConsts {
  T inv_k, scale, coef;
  explicit SigmoidConsts(T k)
      : inv_k(T(1) / k),
        scale(T(1) / std::tanh(T(kHalfPi / 2) / k)),
        coef((scale * scale - T(1)) * T(kHalfPi / 2) * inv_k * inv_k) {}
};

// out = g(clamp(c)) + b with c = inner * r written over inner; extra = sigmoid(v) for the sigmoids
template <typename T>
void forward(T* inner, const T* r, const T* k, int64_t k_stride, const T* bias, T* out, T* extra,
             int64_t n_samples, int64_t channels, int64_t groups, int64_t positions, int op, int threads) {
  const int64_t per_group = channels / groups;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t n = 0; n < n_samples; ++n) {
    for (int64_t ch = 0; ch < channels; ++ch) {
      const int64_t row = (n * channels + ch) * positions;
      T* x = inner + row;
      T* o = out + row;
      const T* rr = r + (n * groups + ch / per_group) * positions;
      const T b = bias ? bias[ch] : T(0);
      if (op == kCosine) {
#pragma omp simd
        for (int64_t s = 0; s < positions; ++s) {
          T c = x[s] * rr[s];
          x[s] = c;
          o[s] = clamp_unit(c) + b;
        }
        continue;
      }
#pragma omp simd
      for (int64_t s = 0; s < positions; ++s) x[s] *= rr[s];
      if (op == kLinear) {
        for_each_arcsine(x, positions, [=](int64_t s, T a) { o[s] = T(kLinearScale) * a + b; });
      } else {
        const SigmoidConsts<T> consts(k[ch * k_stride]);
        const T ik = consts.inv_k, sk = consts.scale;
        const T two_s = T(2) * sk, offset = sk - b;
        T* e = extra + row;
        auto sigmoid = [=](auto exp) {
          return [=](int64_t s, T a) {
            T sig = T(1) / (T(1) + exp(-(a * ik)));  // sigmoid(2u), 2u = asin(c) / k
            o[s] = two_s * sig - offset;              // s_k tanh(u) + b
            e[s] = sig;
          };
        };
        if (T(kHalfPi) * ik <= T(87))  // |2u| <= (pi/2) / k: the exponential's argument stays in range
          for_each_arcsine(x, positions, sigmoid([](T v) { return fast_exp_in_range(v); }));
        else
          for_each_arcsine(x, positions, sigmoid([](T v) { return fast_exp(v); }));
      }
    }
  }
}

// One channel's sigmoid backward over positions [start, stop): dL/dinner, the patch-norm term and the
// bias sum; with WithK also dL/dk's sum (SmallArcsine: every |c| in range is at most 1/2).
template <typename T>
struct SigmoidBackward {
  const T *go, *cc, *e, *rr;
  T *acc, *di;
  T ik, ck, factor, floor, cap;

  template <bool WithK, bool SmallArcsine>
  void run(int64_t start, int64_t stop, T& bias_sum, T& k_sum) const {
    T bias_part = T(0), k_part = T(0);
#pragma omp simd reduction(+ : bias_part, k_part)
    for (int64_t s = start; s < stop; ++s) {
      T c = cc[s];
      T q = T(1) - c * c;
      T rho = T(1) / std::sqrt(q > floor ? q : floor);
      rho = rho < cap ? rho : cap;
      T sig = e[s];
      T sech2_4 = sig * (T(1) - sig);  // sech^2(u) / 4
      T d = (c >= T(-1) && c <= T(1)) ? go[s] * rho * sech2_4 * factor : T(0);
      acc[s] += d * c;
      di[s] = d * rr[s];
      bias_part += go[s];
      if constexpr (WithK) {
        T v = (SmallArcsine ? asin_small(c) : fast_asin(clamp_unit(c))) * ik;
        k_part += go[s] * (ck * (T(2) * sig - T(1)) - factor * sech2_4 * v);
      }
    }
    bias_sum += bias_part;
    k_sum += k_part;
  }
};

// d_inner = dL/dc r, d_sq = -r^2/2 sum_{channels of the group} dL/dc c, with dL/dc = g'(c) [|c| <= 1] dL/dout;
// per channel (if the pointers are given): d_bias = sum dL/dout, d_k = sum dL/dout dg/dk (learnable k),
// summed per sample, then over the samples.
template <typename T>
void backward(const T* grad, const T* cos, const T* extra, const T* r, const T* k, int64_t k_stride,
              T* d_inner, T* d_sq, T* d_bias, T* d_k, int64_t n_samples, int64_t channels,
              int64_t groups, int64_t positions, int op, T floor, T cap, int threads) {
  const int64_t per_group = channels / groups;
  std::vector<T> bias_parts(d_bias ? n_samples * channels : 0), k_parts(d_k ? n_samples * channels : 0);
  T* part_bias = d_bias ? bias_parts.data() : nullptr;
  T* part_k = d_k ? k_parts.data() : nullptr;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t n = 0; n < n_samples; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const T* rr = r + (n * groups + g) * positions;
      T* acc = d_sq + (n * groups + g) * positions;
      for (int64_t s = 0; s < positions; ++s) acc[s] = T(0);
      for (int64_t p = 0; p < per_group; ++p) {
        const int64_t ch = g * per_group + p;
        const int64_t row = (n * channels + ch) * positions;
        const T* go = grad + row;
        const T* cc = cos + row;
        T* di = d_inner + row;
        T bias_sum = T(0), k_sum = T(0);
        if (op == kCosine) {
#pragma omp simd reduction(+ : bias_sum)
          for (int64_t s = 0; s < positions; ++s) {
            T c = cc[s];
            T d = (c >= T(-1) && c <= T(1)) ? go[s] : T(0);
            acc[s] += d * c;
            di[s] = d * rr[s];
            bias_sum += go[s];
          }
        } else if (op == kLinear) {
#pragma omp simd reduction(+ : bias_sum)
          for (int64_t s = 0; s < positions; ++s) {
            T c = cc[s];
            T q = T(1) - c * c;
            T rho = T(1) / std::sqrt(q > floor ? q : floor);
            rho = rho < cap ? rho : cap;
            T d = (c >= T(-1) && c <= T(1)) ? go[s] * rho * T(kLinearScale) : T(0);
            acc[s] += d * c;
            di[s] = d * rr[s];
            bias_sum += go[s];
          }
        } else {
          const SigmoidConsts<T> consts(k[ch * k_stride]);
          const T ik = consts.inv_k, sk = consts.scale, ck = consts.coef;
          const T factor = T(2) * sk * ik;  // s_k/(2k) sech^2(u) = (2 s_k / k) sig (1 - sig)
          const T* e = extra + row;  // sigmoid(2u), from the forward
          const SigmoidBackward<T> step{go, cc, e, rr, acc, di, ik, ck, factor, floor, cap};
          if (!part_k) {
            step.template run<false, false>(0, positions, bias_sum, k_sum);
          } else {  // a learnable k: dg/dk needs 2u = asin(c) / k again (the arcsine block by block)
            for_each_arcsine_block(cc, positions, [&](int64_t start, int64_t stop, bool small) {
              if (small)
                step.template run<true, true>(start, stop, bias_sum, k_sum);
              else
                step.template run<true, false>(start, stop, bias_sum, k_sum);
            });
          }
        }
        if (part_bias) part_bias[n * channels + ch] = bias_sum;
        if (part_k) part_k[n * channels + ch] = k_sum;
      }
#pragma omp simd
      for (int64_t s = 0; s < positions; ++s) acc[s] *= T(-0.5) * rr[s] * rr[s];
    }
  }
  for (int64_t ch = 0; ch < channels; ++ch) {
    T bias_total = T(0), k_total = T(0);
    for (int64_t n = 0; n < n_samples; ++n) {
      if (part_bias) bias_total += part_bias[n * channels + ch];
      if (part_k) k_total += part_k[n * channels + ch];
    }
    if (d_bias) d_bias[ch] = bias_total;
    if (d_k) d_k[ch] = k_total;
  }
}

// The convolution's windows over one (D, H, W) plane (1-d and 2-d inputs as D = 1 and H = 1), from
// 18 int64: input extent, output extent, kernel, stride, padding, dilation, 3 each.
struct Windows {
  int64_t in[3], out[3], k[3], s[3], p[3], d[3];
  explicit Windows(const int64_t* g) {
    for (int i = 0; i < 3; ++i) {
      in[i] = g[i], out[i] = g[3 + i], k[i] = g[6 + i], s[i] = g[9 + i], p[i] = g[12 + i], d[i] = g[15 + i];
    }
  }
  int64_t padded(int i) const { return in[i] + 2 * p[i]; }
  int64_t padded_size() const { return padded(0) * padded(1) * padded(2); }
  int64_t in_size() const { return in[0] * in[1] * in[2]; }
  int64_t out_size() const { return out[0] * out[1] * out[2]; }
  // first element of the padded plane's row that window (od, oh, ., kd, kh, .) reads
  int64_t row(int64_t od, int64_t oh, int64_t kd, int64_t kh) const {
    return ((od * s[0] + kd * d[0]) * padded(1) + oh * s[1] + kh * d[1]) * padded(2);
  }
};

// dst (out plane) = sum of src (in plane) over every window; `pad` holds padded_size() values.
template <typename T>
void window_sum(const T* src, T* dst, T* pad, const Windows& w) {
  std::fill(pad, pad + w.padded_size(), T(0));
  for (int64_t i = 0; i < w.in[0]; ++i)
    for (int64_t j = 0; j < w.in[1]; ++j)
      std::memcpy(pad + ((i + w.p[0]) * w.padded(1) + j + w.p[1]) * w.padded(2) + w.p[2],
                  src + (i * w.in[1] + j) * w.in[2], w.in[2] * sizeof(T));
  const int64_t ow_count = w.out[2], step = w.s[2];
  for (int64_t od = 0; od < w.out[0]; ++od) {
    for (int64_t oh = 0; oh < w.out[1]; ++oh) {
      T* o = dst + (od * w.out[1] + oh) * ow_count;
      std::fill(o, o + ow_count, T(0));
      for (int64_t kd = 0; kd < w.k[0]; ++kd) {
        for (int64_t kh = 0; kh < w.k[1]; ++kh) {
          const T* row = pad + w.row(od, oh, kd, kh);
          for (int64_t kw = 0; kw < w.k[2]; ++kw) {
            const T* base = row + kw * w.d[2];
            if (step == 1) {
#pragma omp simd
              for (int64_t ow = 0; ow < ow_count; ++ow) o[ow] += base[ow];
            } else {
              for (int64_t ow = 0; ow < ow_count; ++ow) o[ow] += base[ow * step];
            }
          }
        }
      }
    }
  }
}

// The adjoint: dst (in plane) = every window's src value (out plane) added back onto its inputs.
template <typename T>
void window_sum_transpose(const T* src, T* dst, T* pad, const Windows& w) {
  std::fill(pad, pad + w.padded_size(), T(0));
  const int64_t ow_count = w.out[2], step = w.s[2];
  for (int64_t od = 0; od < w.out[0]; ++od) {
    for (int64_t oh = 0; oh < w.out[1]; ++oh) {
      const T* o = src + (od * w.out[1] + oh) * ow_count;
      for (int64_t kd = 0; kd < w.k[0]; ++kd) {
        for (int64_t kh = 0; kh < w.k[1]; ++kh) {
          T* row = pad + w.row(od, oh, kd, kh);
          for (int64_t kw = 0; kw < w.k[2]; ++kw) {
            T* base = row + kw * w.d[2];
            if (step == 1) {
#pragma omp simd
              for (int64_t ow = 0; ow < ow_count; ++ow) base[ow] += o[ow];
            } else {
              for (int64_t ow = 0; ow < ow_count; ++ow) base[ow * step] += o[ow];
            }
          }
        }
      }
    }
  }
  for (int64_t i = 0; i < w.in[0]; ++i)
    for (int64_t j = 0; j < w.in[1]; ++j)
      std::memcpy(dst + (i * w.in[1] + j) * w.in[2],
                  pad + ((i + w.p[0]) * w.padded(1) + j + w.p[1]) * w.padded(2) + w.p[2], w.in[2] * sizeof(T));
}

// r = 1 / sqrt(max(sum over the window of sq, 0) + eps m^2) per plane (sample-group) of sq (its
// channels' sum of squares) with its largest |x| m: the reciprocal patch norms (N, G, *S_out).
template <typename T>
void patch_rnorm(const T* sq, const T* peak, T* r, int64_t planes, const int64_t* geometry, T eps, int threads) {
  const Windows w(geometry);
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> pad(w.padded_size());
#pragma omp for schedule(static)
    for (int64_t i = 0; i < planes; ++i) {
      T* o = r + i * w.out_size();
      window_sum(sq + i * w.in_size(), o, pad.data(), w);
      const T m = peak[i];
      const T e = (m * m) * eps;
#pragma omp simd
      for (int64_t s = 0; s < w.out_size(); ++s) {
        T v = o[s] < T(0) ? T(0) : o[s];  // (a NaN stays NaN)
        o[s] = T(1) / std::sqrt(v + e);
      }
    }
  }
}

// forward, after computing r (N, G, S_out) with patch_rnorm from sq and peak if sq is given (the patch
// norms and the epilogue in one call); else r is the caller's.
template <typename T>
void normalized_forward(T* inner, T* r, const T* sq, const T* peak, const int64_t* geometry, T eps, const T* k,
                        int64_t k_stride, const T* bias, T* out, T* extra, int64_t n_samples, int64_t channels,
                        int64_t groups, int64_t positions, int op, int threads) {
  if (sq) patch_rnorm<T>(sq, peak, r, n_samples * groups, geometry, eps, threads);
  forward<T>(inner, r, k, k_stride, bias, out, extra, n_samples, channels, groups, positions, op, threads);
}

// sum x^2 over each group's channels: (N, C, S) -> (N, G, S)
template <typename T>
void channel_sq_sum(const T* x, T* out, int64_t n_samples, int64_t channels, int64_t groups, int64_t positions,
                    int threads) {
  const int64_t per_group = channels / groups;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t n = 0; n < n_samples; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      T* o = out + (n * groups + g) * positions;
      for (int64_t s = 0; s < positions; ++s) o[s] = T(0);
      for (int64_t p = 0; p < per_group; ++p) {
        const T* xr = x + (n * channels + g * per_group + p) * positions;
#pragma omp simd
        for (int64_t s = 0; s < positions; ++s) o[s] += xr[s] * xr[s];
      }
    }
  }
}

// Largest magnitude and its sign per row of `rows` values, `peak` and `sign` (+1/-1; 0 for an
// all-zero row) as _fused.abs_max and the masked sign; returns whether every peak lies in [lo, hi].
template <typename T>
inline void row_peak(T hi_v, T lo_v, T* peak, T* sign) {
  T m = hi_v > -lo_v ? hi_v : -lo_v;
  *peak = m;
  *sign = m == T(0) ? T(0) : (hi_v >= -lo_v ? T(1) : T(-1));
}

// Per sample and group of x (N, C, S): sq = sum_c x^2 (N, G, S), the largest |x| and its sign (N, G).
template <typename T>
int sample_stats(const T* x, T* sq, T* peak, T* sign, int64_t n_samples, int64_t channels, int64_t groups,
                 int64_t positions, T lo, T hi, int threads) {
  const int64_t per_group = channels / groups;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t n = 0; n < n_samples; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      T* o = sq + (n * groups + g) * positions;
      T top = -INFINITY, bottom = INFINITY;
      for (int64_t s = 0; s < positions; ++s) o[s] = T(0);
      for (int64_t p = 0; p < per_group; ++p) {
        const T* xr = x + (n * channels + g * per_group + p) * positions;
#pragma omp simd reduction(max : top) reduction(min : bottom)
        for (int64_t s = 0; s < positions; ++s) {
          T v = xr[s];
          o[s] += v * v;
          top = v > top ? v : top;
          bottom = v < bottom ? v : bottom;
        }
      }
      row_peak(top, bottom, peak + n * groups + g, sign + n * groups + g);
    }
  }
  int direct = 1;
  for (int64_t i = 0; i < n_samples * groups; ++i) direct &= (peak[i] >= lo && peak[i] <= hi);
  return direct;
}

// dL/dx (N, C, S_in), in place: += 2 x share, share = the windows' transpose of dL/dsumsq (d_sq:
// N, G, S_out), and at one largest-magnitude element of each sample-group (the first position, then
// the first channel, as _fused._add_at_sample_peaks) += 2 eps m sign sum_positions dL/dsumsq; all
// times the sample-group's power-of-two scale (exact; x is then the rescaled input) if `scale` is
// given. One pass over dL/dx and x, which also finds the peak's position.
template <typename T>
void input_backward(T* dx, const T* x, const T* d_sq, const T* peak, const T* sign, const T* scale, T eps,
                    int64_t n_samples, int64_t channels, int64_t groups, const int64_t* geometry, int threads) {
  const Windows w(geometry);
  const int64_t per_group = channels / groups, positions = w.in_size(), out_positions = w.out_size();
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> pad(w.padded_size()), share(positions);
#pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < n_samples; ++n) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* ds = d_sq + (n * groups + g) * out_positions;
        window_sum_transpose(ds, share.data(), pad.data(), w);
        const T* sh = share.data();
        const T sc = scale ? scale[n * groups + g] : T(1);
        const T sg = sign[n * groups + g];
        const T m = peak[n * groups + g];
        const T target = m * sg;
        int64_t best_s = positions, best_c = -1;
        for (int64_t p = 0; p < per_group; ++p) {
          const int64_t row = (n * channels + g * per_group + p) * positions;
          T* d = dx + row;
          const T* xr = x + row;
          int64_t first = positions;
#pragma omp simd reduction(min : first)
          for (int64_t s = 0; s < positions; ++s) {
            d[s] = (d[s] + T(2) * xr[s] * sh[s]) * sc;
            const int64_t hit = xr[s] == target ? s : positions;
            first = hit < first ? hit : first;
          }
          if (first < best_s) best_s = first, best_c = p;
        }
        T total = T(0);
        for (int64_t s = 0; s < out_positions; ++s) total += ds[s];
        // (an all-zero sample-group has sign 0: no gradient through its peak)
        if (best_c >= 0 && sg != T(0))
          dx[(n * channels + g * per_group + best_c) * positions + best_s] += total * m * sg * (T(2) * eps) * sc;
      }
    }
  }
}

// Per filter (row of w, O x K) with its sum of squares `sum_sq` (from ATen: the same rounding as the
// ATen path, so that the rescaled and the direct evaluation agree bit for bit): w_hat = w / |w|_e,
// |w|_e = sqrt(sum w^2 + eps m^2), signed peak m sign (0 for an all-zero filter); returns whether
// every m lies in [lo, hi] (else the outputs are incomplete).
template <typename T>
int filter_unit(const T* w, const T* sum_sq, T* w_hat, T* norm, T* signed_peak, int64_t rows, int64_t cols, T eps,
                T lo, T hi) {
  int direct = 1;
  for (int64_t o = 0; o < rows && direct; ++o) {
    const T* wr = w + o * cols;
    T top = -INFINITY, bottom = INFINITY;
#pragma omp simd reduction(max : top) reduction(min : bottom)
    for (int64_t i = 0; i < cols; ++i) {
      T v = wr[i];
      top = v > top ? v : top;
      bottom = v < bottom ? v : bottom;
    }
    T m, sg;
    row_peak(top, bottom, &m, &sg);
    direct = m >= lo && m <= hi;
    T nrm = std::sqrt(sum_sq[o] + m * m * eps);
    norm[o] = nrm;
    signed_peak[o] = m * sg;
    for (int64_t i = 0; i < cols; ++i) w_hat[o * cols + i] = wr[i] / nrm;
  }
  return direct;
}

// dL/dw from dL/dw_hat (d, overwritten): (d - w_hat <w_hat, d>) / |w|_e, plus
// -eps <w_hat, d> m sign / |w|_e^2 shared among the elements of w_hat equal to m sign / |w|_e, times
// the filter's power-of-two scale if `scale` is given.
template <typename T>
void filter_unit_backward(T* d, const T* w_hat, const T* norm, const T* signed_peak, const T* scale, int64_t rows,
                          int64_t cols, T eps) {
  for (int64_t o = 0; o < rows; ++o) {
    T* dr = d + o * cols;
    const T* wr = w_hat + o * cols;
    T proj = T(0);
#pragma omp simd reduction(+ : proj)
    for (int64_t i = 0; i < cols; ++i) proj += dr[i] * wr[i];
    const T nrm = norm[o];
    const T target = signed_peak[o] / nrm;
    const T d_peak = proj * signed_peak[o] / (nrm * nrm) * -eps;
    int64_t count = 0;
#pragma omp simd reduction(+ : count)
    for (int64_t i = 0; i < cols; ++i) {
      dr[i] = (dr[i] - wr[i] * proj) / nrm;
      count += wr[i] == target;
    }
    if (count > 0) {
      const T share = d_peak / T(count);
      for (int64_t i = 0; i < cols; ++i)
        if (wr[i] == target) dr[i] += share;
    }
    if (scale)
      for (int64_t i = 0; i < cols; ++i) dr[i] *= scale[o];
  }
}

}  // namespace

#define SPHERECONV_EXPORT(T, suffix)                                                                          \
  extern "C" void sphereconv_backward_##suffix(const T* grad, const T* cos, const T* extra, const T* r,       \
                                               const T* k, int64_t k_stride, T* d_inner,                       \
                                               T* d_sq, T* d_bias, T* d_k, int64_t n, int64_t c,               \
                                               int64_t g, int64_t s, int op, double floor, double cap,         \
                                               int threads) {                                                  \
    backward<T>(grad, cos, extra, r, k, k_stride, d_inner, d_sq, d_bias, d_k, n, c, g, s, op,                 \
                static_cast<T>(floor), static_cast<T>(cap), threads);                                          \
  }                                                                                                            \
  extern "C" void sphereconv_channel_sq_sum_##suffix(const T* x, T* out, int64_t n, int64_t c, int64_t g,     \
                                                     int64_t s, int threads) {                                 \
    channel_sq_sum<T>(x, out, n, c, g, s, threads);                                                            \
  }                                                                                                            \
  extern "C" int sphereconv_sample_stats_##suffix(const T* x, T* sq, T* peak, T* sign, int64_t n, int64_t c,  \
                                                  int64_t g, int64_t s, double lo, double hi, int threads) {   \
    return sample_stats<T>(x, sq, peak, sign, n, c, g, s, static_cast<T>(lo), static_cast<T>(hi), threads);   \
  }                                                                                                            \
  extern "C" void sphereconv_normalized_forward_##suffix(T* inner, T* r, const T* sq, const T* peak,           \
                                                         const int64_t* geometry, double eps, const T* k,       \
                                                         int64_t k_stride, const T* bias, T* out, T* extra,     \
                                                         int64_t n, int64_t c, int64_t g, int64_t s, int op,    \
                                                         int threads) {                                         \
    normalized_forward<T>(inner, r, sq, peak, geometry, static_cast<T>(eps), k, k_stride, bias, out, extra, n, c, g, \
                          s, op, threads);                                                                     \
  }                                                                                                            \
  extern "C" void sphereconv_input_backward_##suffix(T* dx, const T* x, const T* d_sq, const T* peak,          \
                                                     const T* sign, const T* scale, double eps, int64_t n,     \
                                                     int64_t c, int64_t g, const int64_t* geometry,           \
                                                     int threads) {                                            \
    input_backward<T>(dx, x, d_sq, peak, sign, scale, static_cast<T>(eps), n, c, g, geometry, threads);        \
  }                                                                                                            \
  extern "C" int sphereconv_filter_unit_##suffix(const T* w, const T* sum_sq, T* w_hat, T* norm,             \
                                                 T* signed_peak, int64_t rows, int64_t cols, double eps,       \
                                                 double lo, double hi) {                                       \
    return filter_unit<T>(w, sum_sq, w_hat, norm, signed_peak, rows, cols, static_cast<T>(eps),               \
                          static_cast<T>(lo), static_cast<T>(hi));                                             \
  }                                                                                                            \
  extern "C" void sphereconv_filter_unit_backward_##suffix(T* d, const T* w_hat, const T* norm,               \
                                                           const T* signed_peak, const T* scale, int64_t rows, \
                                                           int64_t cols, double eps) {                         \
    filter_unit_backward<T>(d, w_hat, norm, signed_peak, scale, rows, cols, static_cast<T>(eps));             \
  }

SPHERECONV_EXPORT(float, f32)
SPHERECONV_EXPORT(double, f64)
"""

_library: ctypes.CDLL | None = None
_load_error: str | None = None
_tried = False
# How the library was obtained: "built in X s" or "loaded from the cache", for kernel_status().
build_note = ""


def _compiler() -> str | None:
    return os.environ.get(_CXX_ENV) or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _flags() -> tuple[str, ...]:
    capability = torch.backends.cpu.get_cpu_capability()
    return _BASE_FLAGS + {"AVX2": _AVX2_FLAGS, "AVX512": _AVX512_FLAGS}.get(capability, ())


def _build_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR`` (as for PyTorch's own extensions), else PyTorch's default root."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root) / "sphereconv_cpu_kernels"


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for suffix in ("f32", "f64"):
        getattr(lib, f"sphereconv_backward_{suffix}").argtypes = (
            [ptr] * 5
            + [i64]
            + [ptr] * 4
            + [i64] * 4
            + [
                i32,
                f64,
                f64,
                i32,
            ]
        )
        getattr(lib, f"sphereconv_channel_sq_sum_{suffix}").argtypes = [ptr] * 2 + [i64] * 4 + [i32]
        getattr(lib, f"sphereconv_sample_stats_{suffix}").argtypes = [ptr] * 4 + [i64] * 4 + [f64, f64, i32]
        getattr(lib, f"sphereconv_normalized_forward_{suffix}").argtypes = (
            [ptr] * 5 + [f64, ptr, i64] + [ptr] * 3 + [i64] * 4 + [i32] * 2
        )
        getattr(lib, f"sphereconv_input_backward_{suffix}").argtypes = [ptr] * 6 + [f64] + [i64] * 3 + [ptr, i32]
        getattr(lib, f"sphereconv_filter_unit_{suffix}").argtypes = [ptr] * 5 + [i64] * 2 + [f64] * 3
        getattr(lib, f"sphereconv_filter_unit_backward_{suffix}").argtypes = [ptr] * 5 + [i64] * 2 + [f64]
        for name in ("backward", "channel_sq_sum", "normalized_forward", "input_backward", "filter_unit_backward"):
            getattr(lib, f"sphereconv_{name}_{suffix}").restype = None
        for name in ("sample_stats", "filter_unit"):
            getattr(lib, f"sphereconv_{name}_{suffix}").restype = i32


def _build() -> ctypes.CDLL:
    """Compile (or find in the cache) and load the library; raises on any failure."""
    global build_note
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (g++, c++ or clang++ on PATH, or $CXX)")
    flags = _flags()
    key = hashlib.sha256("\n".join([_SOURCE, compiler, *flags]).encode()).hexdigest()[:16]
    root = _build_root()
    path = root / f"sphereconv_epilogue_{key}.so"
    if path.exists():
        build_note = f"loaded from {path}"
    else:
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            source = Path(tmp) / "sphereconv_epilogue.cpp"
            source.write_text(_SOURCE)
            built = Path(tmp) / path.name
            result = subprocess.run(
                [compiler, *flags, str(source), "-o", str(built)],
                capture_output=True,
                text=True,
                timeout=_BUILD_TIMEOUT_S,
            )
            if result.returncode != 0:
                message = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[0]
                raise RuntimeError(f"{Path(compiler).name} failed: {message[:200]}")
            os.replace(built, path)  # atomic: concurrent processes see the whole file or none
        build_note = f"built in {time.perf_counter() - start:.1f} s into {path}"
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernels, built on the first call; None (and :func:`load_error` says why) if they
    cannot be built or loaded. The outcome is kept for the rest of the process."""
    global _library, _load_error, _tried
    if not _tried:
        _tried = True
        try:
            _library = _build()
        except Exception as error:  # noqa: BLE001 - anything at all: the ATen epilogue serves instead
            first_line = str(error).splitlines()[0] if str(error) else ""
            _load_error = f"{type(error).__name__}: {first_line[:200]}"
            _library = None
    return _library


def load_error() -> str | None:
    """Why :func:`load` returned None (None if it has not, or has not been called)."""
    return _load_error


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without the dispatch when ``t`` has that dtype already (a layer call makes about
    twenty such conversions, nearly all no-ops; the fused path uses this too)."""
    return t if t.dtype == dtype else t.to(dtype)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _suffix(t: Tensor) -> str:
    return "f64" if t.dtype == torch.float64 else "f32"


# Values per block of the arcsine (kArcsineBlock in the source), for the tests.
KERNEL_ARCSINE_BLOCK = 256

# Elements below which a kernel runs on one thread: ATen's grain size for its own parallel loops
# (at::internal::GRAIN_SIZE); waking a team costs more than it saves on less work.
_GRAIN_SIZE = 32768


def _threads(work: Tensor) -> int:
    return 1 if work.numel() < _GRAIN_SIZE else max(1, torch.get_num_threads())


def _k_values(operator: str, k, like: Tensor) -> tuple[Tensor | None, int]:
    """The sigmoids' k as the kernels read it: ``(values, stride)``, one value per channel (stride 1)
    or one for all (stride 0), in the dtype of ``like``; ``(None, 0)`` for the other operators."""
    if OPERATOR_CODES[operator] != 2:
        return None, 0
    if not isinstance(k, Tensor):
        return _fixed_k(float(k), like.dtype), 0
    if k.dtype != like.dtype or not k.is_contiguous():
        k = k.detach().to(like.dtype).contiguous()
    return k, int(k.numel() > 1)  # (read through its pointer: no detach needed)


@functools.lru_cache(maxsize=64)
def _fixed_k(k: float, dtype: torch.dtype) -> Tensor:
    """A fixed k as a one-value tensor, made once per (k, dtype) (never written to)."""
    return torch.full((1,), k, dtype=dtype)


def _dims(t: Tensor, groups: int) -> tuple[int, int, int, int]:
    return t.shape[0], t.shape[1], groups, math.prod(t.shape[2:])


def forward_epilogue(
    inner: Tensor,
    r: Tensor | None,
    groups: int,
    operator: str,
    k,
    bias: Tensor | None,
    norms: tuple[Tensor, Tensor, float, tuple[tuple[int, ...], ...]] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(out, extra, r)`` for the contiguous conv output ``inner`` (N, C, *S) of float32/float64,
    which is overwritten with the cosine ``c = inner * r``.

    ``r`` (N, G, *S), the reciprocal patch norms, is given, or ``None`` with ``norms = (sq, peak,
    eps, windows)``: then ``r = 1 / sqrt(sum over each window of sq + eps m^2)`` (a sum below zero
    counts as zero) is computed in the same call from the channels' sum of squares ``sq`` (N, G,
    *S_in, contiguous, the dtype of ``inner``), the largest |x| per sample-group ``peak`` (N, G) and
    the convolution's ``windows`` (kernel, stride, padding, dilation). ``extra`` is
    ``sigmoid(2u)`` for the sigmoids (what :func:`backward_epilogue` reads), else None.
    """
    lib = load()
    n, c, g, s = _dims(inner, groups)
    if norms is None:
        assert r is not None  # given when the norms are not
        r, sq, peak, eps, geometry = r.contiguous(), None, None, 0.0, None
    else:
        sq, peak, eps, windows = norms
        r = torch.empty((n, g, *inner.shape[2:]), dtype=inner.dtype)
        geometry = _windows(tuple(sq.shape[2:]), tuple(inner.shape[2:]), *windows)
        peak = as_dtype(peak, inner.dtype).contiguous()
    op = OPERATOR_CODES[operator]
    out = torch.empty_like(inner)
    extra = torch.empty_like(inner) if op == 2 else None
    k_values, k_stride = _k_values(operator, k, inner)
    if bias is not None:
        bias = as_dtype(bias, inner.dtype).contiguous()
    getattr(lib, f"sphereconv_normalized_forward_{_suffix(inner)}")(
        _ptr(inner),
        _ptr(r),
        _ptr(sq),
        _ptr(peak),
        geometry,
        eps,
        _ptr(k_values),
        k_stride,
        _ptr(bias),
        _ptr(out),
        _ptr(extra),
        n,
        c,
        g,
        s,
        op,
        _threads(inner),
    )
    return out, extra, r


def backward_epilogue(
    grad_out: Tensor,
    cos: Tensor,
    extra: Tensor | None,
    r: Tensor,
    groups: int,
    operator: str,
    k,
    need_k: bool,
    need_bias: bool,
    acos_floor: float,
    acos_cap: float,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(dL/dinner, dL/dsumsq, dL/dk or None, dL/dbias or None)`` from ``dL/dout``, the saved cosine
    ``cos`` (N, C, *S, contiguous) and ``extra`` from :func:`forward_epilogue`; ``dL/dk`` has one
    value per channel (the caller sums a scalar k), ``dL/dbias`` shape (C,)."""
    lib = load()
    n, c, g, s = _dims(cos, groups)
    grad_out = as_dtype(grad_out, cos.dtype).contiguous()
    r = r.contiguous()
    op = OPERATOR_CODES[operator]
    need_k = need_k and op == 2
    d_inner = torch.empty_like(cos)
    d_sq = torch.empty(r.shape, dtype=cos.dtype)
    d_bias = torch.empty(c, dtype=cos.dtype) if need_bias else None
    d_k = torch.empty(c, dtype=cos.dtype) if need_k else None
    k_values, k_stride = _k_values(operator, k, cos)
    getattr(lib, f"sphereconv_backward_{_suffix(cos)}")(
        _ptr(grad_out),
        _ptr(cos),
        _ptr(extra),
        _ptr(r),
        _ptr(k_values),
        k_stride,
        _ptr(d_inner),
        _ptr(d_sq),
        _ptr(d_bias),
        _ptr(d_k),
        n,
        c,
        g,
        s,
        op,
        acos_floor,
        acos_cap,
        _threads(cos),
    )
    return d_inner, d_sq, d_k, d_bias


def channel_sq_sum(input: Tensor, groups: int) -> Tensor:
    """``sum x^2`` over each group's channels of a contiguous float32/float64 (N, C, *S) tensor:
    (N, G, *S), one read of ``x``."""
    lib = load()
    n, c, g, s = _dims(input, groups)
    out = torch.empty((n, groups, *input.shape[2:]), dtype=input.dtype)
    getattr(lib, f"sphereconv_channel_sq_sum_{_suffix(input)}")(_ptr(input), _ptr(out), n, c, g, s, _threads(input))
    return out


def sample_stats(input: Tensor, groups: int, direct_range: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor, bool]:
    """One read of a contiguous float32/float64 input (N, C, *S): ``(sum x^2 over each group's
    channels (N, G, *S), the largest |x| per sample-group (N, G), its sign (+1/-1, 0 for an all-zero
    sample-group), whether every largest |x| lies in direct_range)``."""
    lib = load()
    n, c, g, s = _dims(input, groups)
    sq = torch.empty((n, groups, *input.shape[2:]), dtype=input.dtype)
    peak = torch.empty((n, groups), dtype=input.dtype)
    sign = torch.empty((n, groups), dtype=input.dtype)
    direct = getattr(lib, f"sphereconv_sample_stats_{_suffix(input)}")(
        _ptr(input), _ptr(sq), _ptr(peak), _ptr(sign), n, c, g, s, *direct_range, _threads(input)
    )
    return sq, peak, sign, bool(direct)


@functools.lru_cache(maxsize=256)
def _windows(
    in_spatial: tuple[int, ...],
    out_spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> ctypes.Array:
    """The convolution's windows as the kernels read them: 18 int64 (input and output extents,
    kernel, stride, padding, dilation; 1-d and 2-d geometries padded in front to 3-d)."""
    lead = 3 - len(kernel)
    values: list[int] = []
    for part, fill in ((in_spatial, 1), (out_spatial, 1), (kernel, 1), (stride, 1), (padding, 0), (dilation, 1)):
        values += [fill] * lead + [int(v) for v in part]
    return (ctypes.c_int64 * 18)(*values)


def input_backward(
    d_x: Tensor,
    input: Tensor,
    d_sq: Tensor,
    peak: Tensor,
    sign: Tensor,
    scale: Tensor | None,
    eps: float,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> None:
    """In place on the contiguous ``d_x`` (N, C, *S): ``+= 2 x share`` with ``share`` the windows'
    transpose of ``d_sq`` (N, G, *S_out) and, at one largest element of each sample-group,
    ``+= 2 eps m sign sum_positions d_sq``; then times the power-of-two ``scale`` (N, G) of the (then
    rescaled, contiguous) ``input`` if given."""
    lib = load()
    n, c, g, _ = _dims(d_x, d_sq.shape[1])
    d_sq = d_sq.contiguous()
    geometry = _windows(tuple(d_x.shape[2:]), tuple(d_sq.shape[2:]), kernel, stride, padding, dilation)
    getattr(lib, f"sphereconv_input_backward_{_suffix(d_x)}")(
        _ptr(d_x),
        _ptr(input),
        _ptr(d_sq),
        _ptr(peak.contiguous()),
        _ptr(sign.contiguous()),
        _ptr(None if scale is None else scale.contiguous()),
        eps,
        n,
        c,
        g,
        geometry,
        _threads(d_x),
    )


def filter_unit(weight: Tensor, eps: float, direct_range: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(w_hat, |w|_e, signed largest element)`` per row of the contiguous (O, K) ``weight``, or None
    when some row's largest |w| lies outside ``direct_range`` (then it needs rescaling)."""
    lib = load()
    rows, cols = weight.shape
    sum_sq = torch.mul(weight, weight).sum(1)  # as the ATen path sums (see the source)
    w_hat = torch.empty_like(weight)
    norm = torch.empty(rows, dtype=weight.dtype)
    signed_peak = torch.empty(rows, dtype=weight.dtype)
    direct = getattr(lib, f"sphereconv_filter_unit_{_suffix(weight)}")(
        _ptr(weight), _ptr(sum_sq), _ptr(w_hat), _ptr(norm), _ptr(signed_peak), rows, cols, eps, *direct_range
    )
    return (w_hat, norm, signed_peak) if direct else None


def filter_unit_backward(
    d_hat: Tensor, w_hat: Tensor, norm: Tensor, signed_peak: Tensor, scale: Tensor | None, eps: float
) -> Tensor:
    """``dL/dw`` from the contiguous (O, K) ``dL/dw_hat`` (overwritten and returned), times the
    filters' power-of-two ``scale`` (O,) if given."""
    lib = load()
    rows, cols = d_hat.shape
    getattr(lib, f"sphereconv_filter_unit_backward_{_suffix(d_hat)}")(
        _ptr(d_hat), _ptr(w_hat.contiguous()), _ptr(norm), _ptr(signed_peak), _ptr(scale), rows, cols, eps
    )
    return d_hat
