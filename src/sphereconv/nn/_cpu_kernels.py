"""C++ kernels for the fused SphereConv on CPU, compiled at first use (optional).

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Section 2.1; the formulas are those of
:mod:`sphereconv.nn._fused`. There, each layer call runs about 130 small ATen ops, the epilogue alone
sweeping the output about five times (clamp, arcsine, logistic function, bias forward; clamp mask,
arccos derivative, products and reductions backward). These kernels do each step in one pass:

- :func:`filter_unit` / :func:`filter_unit_backward`: ``w_hat = w / |w|_e`` with the filter's
  largest element, and ``dL/dw`` from ``dL/dw_hat`` (projection plus the gradient of the largest
  element), one call each for all filters;
- :func:`sample_stats`: the largest |x| of each sample-group with its sign and ``sum x^2`` over the
  group's channels, one read of the input; :func:`input_backward`: ``dL/dx += 2 x share`` plus the
  gradient of the largest element;
- :func:`forward_epilogue`: ``c = inner * r`` (written over the conv output, which becomes the saved
  cosine), ``out = g(clamp(c, -1, 1)) + b`` and, for the sigmoids, ``sigmoid(2u)`` (or ``2u`` for a
  learnable k), exactly what the ATen epilogue saves;
- :func:`backward_epilogue`: ``dL/dinner = g'(c) [|c| <= 1] dL/dout * r``, the patch-norm gradient
  ``-r^2/2 sum_p dL/dc * c`` and per-sample, per-channel partial sums for the bias and a learnable k;
- :func:`channel_sq_sum`: ``sum x^2`` over the input channels of each group.

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
#include <cmath>
#include <cstdint>
#include <cstring>

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

inline float fast_exp(float x) {
  x = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  float z = x * x;
  float p = mul_add(mul_add(mul_add(mul_add(mul_add(1.9875691500e-4f, x, 1.3981999507e-3f), x, 8.3334519073e-3f), x,
                                    4.1665795894e-2f), x, 1.6666665459e-1f), x, 5.0000001201e-1f);
  p = mul_add(p, z, x) + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline double fast_exp(double x) { return std::exp(x); }

template <typename T>
inline T clamp_unit(T c) { return c > T(1) ? T(1) : (c < T(-1) ? T(-1) : c); }

// out = g(clamp(c)) + b with c = inner * r written over inner; extra = sigmoid(v) or v (keep_angle)
template <typename T>
void forward(T* inner, const T* r, const T* inv_k, const T* scale, const T* bias, T* out, T* extra,
             int64_t n_samples, int64_t channels, int64_t groups, int64_t positions, int op, int keep_angle,
             int threads) {
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
      } else if (op == kLinear) {
#pragma omp simd
        for (int64_t s = 0; s < positions; ++s) {
          T c = x[s] * rr[s];
          x[s] = c;
          o[s] = T(kLinearScale) * fast_asin(clamp_unit(c)) + b;
        }
      } else {
        const T ik = inv_k[ch], sk = scale[ch];
        const T two_s = T(2) * sk, offset = sk - b;
        T* e = extra + row;
#pragma omp simd
        for (int64_t s = 0; s < positions; ++s) {
          T c = x[s] * rr[s];
          x[s] = c;
          T v = fast_asin(clamp_unit(c)) * ik;  // 2u = asin(c) / k
          T sig = T(1) / (T(1) + fast_exp(-v));
          o[s] = two_s * sig - offset;  // s_k tanh(u) + b
          e[s] = keep_angle ? v : sig;
        }
      }
    }
  }
}

// d_inner = dL/dc r, d_sq = -r^2/2 sum_{channels of the group} dL/dc c, with dL/dc = g'(c) [|c| <= 1] dL/dout;
// per sample and channel: part_bias = sum_s dL/dout, part_k = sum_s dL/dout dg/dk (learnable k).
template <typename T>
void backward(const T* grad, const T* cos, const T* extra, const T* r, const T* inv_k, const T* scale,
              const T* coef, T* d_inner, T* d_sq, T* part_bias, T* part_k, int64_t n_samples, int64_t channels,
              int64_t groups, int64_t positions, int op, int extra_is_angle, T floor, T cap, int threads) {
  const int64_t per_group = channels / groups;
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
          const T ik = inv_k[ch], sk = scale[ch], ck = coef[ch];
          const T factor = T(2) * sk * ik;  // s_k/(2k) sech^2(u) = (2 s_k / k) sig (1 - sig)
          const T* e = extra + row;
          if (extra_is_angle) {  // a learnable k: extra holds 2u, and dg/dk is summed as well
#pragma omp simd reduction(+ : bias_sum, k_sum)
            for (int64_t s = 0; s < positions; ++s) {
              T c = cc[s];
              T q = T(1) - c * c;
              T rho = T(1) / std::sqrt(q > floor ? q : floor);
              rho = rho < cap ? rho : cap;
              T v = e[s];
              T sig = T(1) / (T(1) + fast_exp(-v));
              T sech2_4 = sig * (T(1) - sig);  // sech^2(u) / 4
              T d = (c >= T(-1) && c <= T(1)) ? go[s] * rho * sech2_4 * factor : T(0);
              acc[s] += d * c;
              di[s] = d * rr[s];
              bias_sum += go[s];
              k_sum += go[s] * (ck * (T(2) * sig - T(1)) - factor * sech2_4 * v);
            }
          } else {  // extra holds sigmoid(2u)
#pragma omp simd reduction(+ : bias_sum)
            for (int64_t s = 0; s < positions; ++s) {
              T c = cc[s];
              T q = T(1) - c * c;
              T rho = T(1) / std::sqrt(q > floor ? q : floor);
              rho = rho < cap ? rho : cap;
              T sig = e[s];
              T sech2_4 = sig * (T(1) - sig);
              T d = (c >= T(-1) && c <= T(1)) ? go[s] * rho * sech2_4 * factor : T(0);
              acc[s] += d * c;
              di[s] = d * rr[s];
              bias_sum += go[s];
            }
          }
        }
        if (part_bias) part_bias[n * channels + ch] = bias_sum;
        if (part_k) part_k[n * channels + ch] = k_sum;
      }
#pragma omp simd
      for (int64_t s = 0; s < positions; ++s) acc[s] *= T(-0.5) * rr[s] * rr[s];
    }
  }
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

// dL/dx (N, C, S), in place: += 2 x share (share: N, G, S, the box filter's transpose of dL/dsumsq),
// and at one largest-magnitude element of each sample-group (the first position, then the first
// channel, as _fused._add_at_sample_peaks) += 2 eps m sign sum_positions dL/dsumsq; then times the
// sample-group's power-of-two scale (x is then the rescaled input) if `scale` is given.
template <typename T>
void input_backward(T* dx, const T* x, const T* share, const T* d_sq, const T* peak, const T* sign, const T* scale,
                    T eps, int64_t n_samples, int64_t channels, int64_t groups, int64_t positions,
                    int64_t out_positions, int threads) {
  const int64_t per_group = channels / groups;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t n = 0; n < n_samples; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const T* sh = share + (n * groups + g) * positions;
      for (int64_t p = 0; p < per_group; ++p) {
        const int64_t row = (n * channels + g * per_group + p) * positions;
        T* d = dx + row;
        const T* xr = x + row;
#pragma omp simd
        for (int64_t s = 0; s < positions; ++s) d[s] += T(2) * xr[s] * sh[s];
      }
      const T sg = sign[n * groups + g];
      const T* ds = d_sq + (n * groups + g) * out_positions;
      T total = T(0);
      for (int64_t s = 0; s < out_positions; ++s) total += ds[s];
      const T m = peak[n * groups + g];
      const T d_peak = total * m * sg * (T(2) * eps);
      const T target = m * sg;
      int64_t best_s = positions, best_c = -1;
      for (int64_t p = 0; p < per_group; ++p) {
        const T* xr = x + (n * channels + g * per_group + p) * positions;
        for (int64_t s = 0; s < best_s; ++s) {
          if (xr[s] == target) {
            best_s = s;
            best_c = p;
            break;
          }
        }
      }
      // (an all-zero sample-group has sign 0: no gradient through its peak)
      if (best_c >= 0 && sg != T(0)) dx[(n * channels + g * per_group + best_c) * positions + best_s] += d_peak;
      if (scale) {
        const T sc = scale[n * groups + g];
        for (int64_t p = 0; p < per_group; ++p) {
          T* d = dx + (n * channels + g * per_group + p) * positions;
#pragma omp simd
          for (int64_t s = 0; s < positions; ++s) d[s] *= sc;
        }
      }
    }
  }
}

// Per filter (row of w, O x K) with its sum of squares `sum_sq` (from ATen: the same rounding as the
// ATen path): w_hat = w / |w|_e, |w|_e = sqrt(sum w^2 + eps m^2), signed peak m sign (0 for an all-zero
// filter); returns whether every m lies in [lo, hi] (else the outputs are incomplete).
template <typename T>
int filter_unit(const T* w, const T* sum_sq, T* w_hat, T* norm, T* signed_peak, int64_t rows, int64_t cols, T eps,
                T lo, T hi) {
  int direct = 1;
  for (int64_t o = 0; o < rows && direct; ++o) {
    const T* wr = w + o * cols;
    T top = -INFINITY, bottom = INFINITY;
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
    for (int64_t i = 0; i < cols; ++i) proj += dr[i] * wr[i];
    const T nrm = norm[o];
    const T target = signed_peak[o] / nrm;
    const T d_peak = proj * signed_peak[o] / (nrm * nrm) * -eps;
    int64_t count = 0;
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
  extern "C" void sphereconv_forward_##suffix(T* inner, const T* r, const T* inv_k, const T* scale,            \
                                              const T* bias, T* out, T* extra, int64_t n, int64_t c,           \
                                              int64_t g, int64_t s, int op, int keep_angle, int threads) {     \
    forward<T>(inner, r, inv_k, scale, bias, out, extra, n, c, g, s, op, keep_angle, threads);                \
  }                                                                                                            \
  extern "C" void sphereconv_backward_##suffix(const T* grad, const T* cos, const T* extra, const T* r,       \
                                               const T* inv_k, const T* scale, const T* coef, T* d_inner,      \
                                               T* d_sq, T* part_bias, T* part_k, int64_t n, int64_t c,         \
                                               int64_t g, int64_t s, int op, int extra_is_angle, double floor, \
                                               double cap, int threads) {                                      \
    backward<T>(grad, cos, extra, r, inv_k, scale, coef, d_inner, d_sq, part_bias, part_k, n, c, g, s, op,    \
                extra_is_angle, static_cast<T>(floor), static_cast<T>(cap), threads);                          \
  }                                                                                                            \
  extern "C" void sphereconv_channel_sq_sum_##suffix(const T* x, T* out, int64_t n, int64_t c, int64_t g,     \
                                                     int64_t s, int threads) {                                 \
    channel_sq_sum<T>(x, out, n, c, g, s, threads);                                                            \
  }                                                                                                            \
  extern "C" int sphereconv_sample_stats_##suffix(const T* x, T* sq, T* peak, T* sign, int64_t n, int64_t c,  \
                                                  int64_t g, int64_t s, double lo, double hi, int threads) {   \
    return sample_stats<T>(x, sq, peak, sign, n, c, g, s, static_cast<T>(lo), static_cast<T>(hi), threads);   \
  }                                                                                                            \
  extern "C" void sphereconv_input_backward_##suffix(T* dx, const T* x, const T* share, const T* d_sq,        \
                                                     const T* peak, const T* sign, const T* scale, double eps, \
                                                     int64_t n, int64_t c, int64_t g, int64_t s, int64_t s_out, \
                                                     int threads) {                                            \
    input_backward<T>(dx, x, share, d_sq, peak, sign, scale, static_cast<T>(eps), n, c, g, s, s_out, threads); \
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
        getattr(lib, f"sphereconv_forward_{suffix}").argtypes = [ptr] * 7 + [i64] * 4 + [i32] * 3
        getattr(lib, f"sphereconv_backward_{suffix}").argtypes = [ptr] * 11 + [i64] * 4 + [i32, i32, f64, f64, i32]
        getattr(lib, f"sphereconv_channel_sq_sum_{suffix}").argtypes = [ptr] * 2 + [i64] * 4 + [i32]
        getattr(lib, f"sphereconv_sample_stats_{suffix}").argtypes = [ptr] * 4 + [i64] * 4 + [f64, f64, i32]
        getattr(lib, f"sphereconv_input_backward_{suffix}").argtypes = [ptr] * 7 + [f64] + [i64] * 5 + [i32]
        getattr(lib, f"sphereconv_filter_unit_{suffix}").argtypes = [ptr] * 5 + [i64] * 2 + [f64] * 3
        getattr(lib, f"sphereconv_filter_unit_backward_{suffix}").argtypes = [ptr] * 5 + [i64] * 2 + [f64]
        for name in ("forward", "backward", "channel_sq_sum", "input_backward", "filter_unit_backward"):
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


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _suffix(t: Tensor) -> str:
    return "f64" if t.dtype == torch.float64 else "f32"


# Elements below which a kernel runs on one thread: ATen's grain size for its own parallel loops
# (at::internal::GRAIN_SIZE); waking a team costs more than it saves on less work.
_GRAIN_SIZE = 32768


def _threads(work: Tensor) -> int:
    return 1 if work.numel() < _GRAIN_SIZE else max(1, torch.get_num_threads())


def _channel_consts(
    operator: str, k, channels: int, like: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Per-channel (1/k, s_k = 1/tanh(pi/4k), (s_k^2 - 1) pi/4 / k^2) in the dtype of ``like``."""
    if OPERATOR_CODES[operator] != 2:
        return None, None, None
    if not isinstance(k, Tensor):
        return _fixed_k_consts(float(k), channels, like.dtype)
    return _k_consts(k.detach().to(like.dtype).reshape(-1).expand(channels).contiguous())


@functools.lru_cache(maxsize=64)
def _fixed_k_consts(k: float, channels: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_k_consts` of a fixed k, made once per (k, channels, dtype) (never written to)."""
    return _k_consts(torch.full((channels,), k, dtype=dtype))


def _k_consts(k_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    inv_k = 1.0 / k_t
    scale = 1.0 / torch.tanh(math.pi / (4.0 * k_t))
    coef = (scale * scale - 1.0) * (0.25 * math.pi) * inv_k * inv_k
    return inv_k, scale, coef


def _dims(t: Tensor, groups: int) -> tuple[int, int, int, int]:
    return t.shape[0], t.shape[1], groups, math.prod(t.shape[2:])


def forward_epilogue(
    inner: Tensor, r: Tensor, groups: int, operator: str, k, bias: Tensor | None, keep_angle: bool
) -> tuple[Tensor, Tensor | None]:
    """``(out, extra)`` for the contiguous conv output ``inner`` (N, C, *S), which is overwritten
    with the cosine ``c = inner * r``, and ``r`` (N, G, *S) of the same dtype (float32/float64).

    ``extra`` as :func:`sphereconv.nn._fused.forward_epilogue` returns it: ``sigmoid(2u)``, or ``2u``
    when ``keep_angle``, for the sigmoids; None otherwise.
    """
    lib = load()
    n, c, g, s = _dims(inner, groups)
    r = r.contiguous()
    out = torch.empty_like(inner)
    op = OPERATOR_CODES[operator]
    extra = torch.empty_like(inner) if op == 2 else None
    inv_k, scale, _ = _channel_consts(operator, k, c, inner)
    bias = bias.to(inner.dtype).contiguous() if bias is not None else None
    getattr(lib, f"sphereconv_forward_{_suffix(inner)}")(
        _ptr(inner),
        _ptr(r),
        _ptr(inv_k),
        _ptr(scale),
        _ptr(bias),
        _ptr(out),
        _ptr(extra),
        n,
        c,
        g,
        s,
        op,
        int(keep_angle),
        _threads(inner),
    )
    return out, extra


def backward_epilogue(
    grad_out: Tensor,
    cos: Tensor,
    extra: Tensor | None,
    r: Tensor,
    groups: int,
    operator: str,
    k,
    extra_is_angle: bool,
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
    grad_out = grad_out.to(cos.dtype).contiguous()
    r = r.contiguous()
    op = OPERATOR_CODES[operator]
    need_k = need_k and op == 2
    d_inner = torch.empty_like(cos)
    d_sq = torch.empty(r.shape, dtype=cos.dtype)
    part_bias = torch.empty((n, c), dtype=cos.dtype) if need_bias else None
    part_k = torch.empty((n, c), dtype=cos.dtype) if need_k else None
    inv_k, scale, coef = _channel_consts(operator, k, c, cos)
    getattr(lib, f"sphereconv_backward_{_suffix(cos)}")(
        _ptr(grad_out),
        _ptr(cos),
        _ptr(extra),
        _ptr(r),
        _ptr(inv_k),
        _ptr(scale),
        _ptr(coef),
        _ptr(d_inner),
        _ptr(d_sq),
        _ptr(part_bias),
        _ptr(part_k),
        n,
        c,
        g,
        s,
        op,
        int(extra_is_angle),
        acos_floor,
        acos_cap,
        _threads(cos),
    )
    d_k = part_k.sum(0) if part_k is not None else None
    d_bias = part_bias.sum(0) if part_bias is not None else None
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


def input_backward(
    d_x: Tensor,
    input: Tensor,
    share: Tensor,
    d_sq: Tensor,
    peak: Tensor,
    sign: Tensor,
    scale: Tensor | None,
    eps: float,
) -> None:
    """In place on the contiguous ``d_x`` (N, C, *S): ``+= 2 x share`` (``share`` (N, G, *S)) and, at
    one largest element of each sample-group, ``+= 2 eps m sign sum_positions d_sq``; then times the
    power-of-two ``scale`` (N, G) of the (then rescaled, contiguous) ``input`` if given."""
    lib = load()
    n, c, g, s = _dims(d_x, share.shape[1])
    share, d_sq = share.contiguous(), d_sq.contiguous()
    getattr(lib, f"sphereconv_input_backward_{_suffix(d_x)}")(
        _ptr(d_x),
        _ptr(input),
        _ptr(share),
        _ptr(d_sq),
        _ptr(peak.contiguous()),
        _ptr(sign.contiguous()),
        _ptr(None if scale is None else scale.contiguous()),
        eps,
        n,
        c,
        g,
        s,
        math.prod(d_sq.shape[2:]),
        _threads(d_x),
    )


def filter_unit(weight: Tensor, eps: float, direct_range: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(w_hat, |w|_e, signed largest element)`` per row of the contiguous (O, K) ``weight``, or None
    when some row's largest |w| lies outside ``direct_range`` (then it needs rescaling)."""
    lib = load()
    rows, cols = weight.shape
    sum_sq = torch.mul(weight, weight).sum(1)  # as the ATen path sums (see _BASE_FLAGS)
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
