// C++ kernels of the fused SphereConv on CPU: see sphereconv/nn/_cpu_kernels.py, which builds this file
// at first use, calls its C entry points through ctypes and the whole layer (sphere_conv, at the end)
// as a PyTorch operator.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

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

// op(s, asin(clamp(c[s]))) for s in one block [start, stop), vectorised (small: as for_each_arcsine_block).
template <typename T, typename Op>
inline void arcsine_block(const T* c, int64_t start, int64_t stop, bool small, Op op) {
  if (small) {
#pragma omp simd
    for (int64_t s = start; s < stop; ++s) op(s, asin_small(c[s]));
  } else {
#pragma omp simd
    for (int64_t s = start; s < stop; ++s) op(s, fast_asin(clamp_unit(c[s])));
  }
}

// op(s, asin(clamp(c[s]))) for s in [0, count), vectorised, block by block.
template <typename T, typename Op>
inline void for_each_arcsine(const T* c, int64_t count, Op op) {
  for_each_arcsine_block(c, count,
                         [&](int64_t start, int64_t stop, bool small) { arcsine_block(c, start, stop, small, op); });
}

// tanh(u) for |u| <= kTanhPolyMaxU: u P(u^2), P of degree 6 the Chebyshev interpolant of
// tanh(sqrt(z)) / sqrt(z) on z in [0, 1] (fitted for this file: largest relative error 1.6e-7 in float32,
// rounding included, as Cephes' exponential), without the exponential and the division of
// 2 sigmoid(2u) - 1; double: the C library.
constexpr double kTanhPolyMaxU = 1.0;

inline float tanh_small(float u) {
  float z = u * u;
  float p = mul_add(mul_add(mul_add(mul_add(mul_add(mul_add(1.03802513e-3f, z, -6.19432470e-3f), z, 2.02797074e-2f), z,
                                            -5.34516461e-2f), z, 1.33250758e-1f), z, -3.33328277e-1f), z,
                    9.99999940e-1f);
  return p * u;
}

inline double tanh_small(double u) { return std::tanh(u); }

// The sigmoid's per-channel constants from its k (Sec. 2.1): 1/k, s_k = 1/tanh(pi/4k), the dg/dk
// coefficient (s_k^2 - 1) pi / (4 k^2), and whether blocks of |c| <= 1/2 take tanh_small: there
// |u| = |asin(c)| / 2k <= (pi/6) / 2k, within kTanhPolyMaxU for k >= pi/12.
template <typename T>
struct SigmoidConsts {
  T inv_k, scale, coef;
  bool tanh_poly;
  explicit SigmoidConsts(T k)
      : inv_k(T(1) / k),
        scale(T(1) / std::tanh(T(kHalfPi / 2) / k)),
        coef((scale * scale - T(1)) * T(kHalfPi / 2) * inv_k * inv_k),
        tanh_poly(T(kHalfPi / 3) * inv_k / T(2) <= T(kTanhPolyMaxU)) {}
};

// The constants of every channel (one entry when k_stride is 0: one k for all), computed once per call
// rather than per sample and channel (a tanh each: tens of microseconds per layer call); empty for the
// other operators.
template <typename T>
std::vector<SigmoidConsts<T>> sigmoid_consts(int op, const T* k, int64_t k_stride, int64_t channels) {
  std::vector<SigmoidConsts<T>> consts;
  if (op != kSigmoid) return consts;
  const int64_t count = k_stride ? channels : 1;
  consts.reserve(count);
  for (int64_t ch = 0; ch < count; ++ch) consts.emplace_back(k[ch * k_stride]);
  return consts;
}

// out = g(clamp(c)) + b with c = inner * r written over inner; extra = sigmoid(2u) for the sigmoids
// (all_consts from sigmoid_consts). Shares its rows among the threads of the enclosing parallel region.
template <typename T>
void forward_rows(T* inner, const T* r, const std::vector<SigmoidConsts<T>>& all_consts, int64_t k_stride,
                  const T* bias, T* out, T* extra, int64_t n_samples, int64_t channels, int64_t groups,
                  int64_t positions, int op) {
  const int64_t per_group = channels / groups;
#pragma omp for collapse(2) schedule(static)
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
        const SigmoidConsts<T>& consts = all_consts[ch * k_stride];
        const T ik = consts.inv_k, sk = consts.scale, half_ik = T(0.5) * ik;
        const T two_s = T(2) * sk, offset = sk - b;
        T* e = extra + row;
        auto sigmoid = [=](auto exp) {
          return [=](int64_t s, T a) {
            T sig = T(1) / (T(1) + exp(-(a * ik)));  // sigmoid(2u), 2u = asin(c) / k
            o[s] = two_s * sig - offset;              // s_k tanh(u) + b
            e[s] = sig;
          };
        };
        auto by_tanh = [=](int64_t s, T a) {
          T t = tanh_small(a * half_ik);
          o[s] = sk * t + b;
          e[s] = T(0.5) * t + T(0.5);  // sigmoid(2u) = (1 + tanh(u)) / 2
        };
        // |2u| <= (pi/2) / k: the exponential's argument stays in range
        const bool exp_in_range = T(kHalfPi) * ik <= T(87);
        for_each_arcsine_block(x, positions, [&](int64_t start, int64_t stop, bool small) {
          if (small && consts.tanh_poly)
            arcsine_block(x, start, stop, true, by_tanh);
          else if (exp_in_range)
            arcsine_block(x, start, stop, small, sigmoid([](T v) { return fast_exp_in_range(v); }));
          else
            arcsine_block(x, start, stop, small, sigmoid([](T v) { return fast_exp(v); }));
        });
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
  const std::vector<SigmoidConsts<T>> all_consts = sigmoid_consts(op, k, k_stride, channels);
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
          const SigmoidConsts<T>& consts = all_consts[ch * k_stride];
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
// channels' sum of squares) with its largest |x| m: the reciprocal patch norms (N, G, *S_out). Shares
// its planes among the threads of the enclosing parallel region.
template <typename T>
void patch_rnorm_planes(const T* sq, const T* peak, T* r, int64_t planes, const Windows& w, T eps) {
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

// The epilogue (forward_rows), after computing r (N, G, S_out) with patch_rnorm_planes from sq and peak
// if sq is given; else r is the caller's. One parallel region for both (one team start per layer).
template <typename T>
void normalized_forward(T* inner, T* r, const T* sq, const T* peak, const int64_t* geometry, T eps, const T* k,
                        int64_t k_stride, const T* bias, T* out, T* extra, int64_t n_samples, int64_t channels,
                        int64_t groups, int64_t positions, int op, int threads) {
  const std::vector<SigmoidConsts<T>> all_consts = sigmoid_consts(op, k, k_stride, channels);
#pragma omp parallel num_threads(threads)
  {
    if (sq) patch_rnorm_planes<T>(sq, peak, r, n_samples * groups, Windows(geometry), eps);  // (then a barrier)
    forward_rows<T>(inner, r, all_consts, k_stride, bias, out, extra, n_samples, channels, groups, positions, op);
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

// The C entry points (ctypes) are all the library exports (built with -fvisibility=hidden: two builds
// loaded in one process keep their own symbols).
#pragma GCC visibility push(default)
SPHERECONV_EXPORT(float, f32)
SPHERECONV_EXPORT(double, f64)
#pragma GCC visibility pop

// ------------------------------------------------------------------------------------------------
// The whole layer as one PyTorch operator with its own autograd node: the path of
// sphereconv.nn._fused._FusedSphereConvFn where every kernel above applies (contiguous float32/float64
// CPU tensors, largest values within the direct range), without a Python call per kernel.
// ------------------------------------------------------------------------------------------------

namespace sphereconv {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Elements below which a kernel runs on one thread: ATen's grain size (as _cpu_kernels._threads).
int threads_for(const at::Tensor& work) {
  return work.numel() < at::internal::GRAIN_SIZE ? 1 : std::max(1, at::get_num_threads());
}

// The windows as Windows reads them: 18 int64, 1-d and 2-d geometries padded in front to 3-d (as
// _cpu_kernels._windows).
std::array<int64_t, 18> window_geometry(at::IntArrayRef in, at::IntArrayRef out, at::IntArrayRef kernel,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  std::array<int64_t, 18> g{};
  const int64_t lead = 3 - static_cast<int64_t>(kernel.size());
  const at::IntArrayRef parts[6] = {in, out, kernel, stride, padding, dilation};
  for (int part = 0; part < 6; ++part) {
    const int64_t fill = part == 4 ? 0 : 1;
    for (int64_t i = 0; i < 3; ++i) g[part * 3 + i] = i < lead ? fill : parts[part][i - lead];
  }
  return g;
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Positions per plane of an (N, C, *S) tensor: the product of S (also for N = 0 or C = 0).
int64_t plane_size(const at::Tensor& t) { return c10::multiply_integers(t.sizes().slice(2)); }

constexpr const char* kTwiceMessage =
    "sphereconv: the fused SphereConv is once differentiable; use impl=\"reference\" (or "
    "sphereconv.nn.functional.use_reference_impl()) for double backward";

// (its autograd node prints as torch::autograd::CppNode<sphereconv::SphereConvFunction>)
struct SphereConvFunction : public torch::autograd::Function<SphereConvFunction> {
  // input (N, C_in, *S), weight (O, C_in/G, *K), bias (O) or undefined, k (1 or O values; undefined for
  // cosine and linear); w_hat, w_norm, w_signed_peak from filter_unit, sq, peak, sign from sample_stats.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias_arg, const c10::optional<at::Tensor>& k_arg,
                            const at::Tensor& w_hat, const at::Tensor& w_norm, const at::Tensor& w_signed_peak,
                            const at::Tensor& sq, const at::Tensor& peak, const at::Tensor& sign,
                            std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                            int64_t groups, int64_t op, double eps, double acos_floor, double acos_cap) {
    // (the kernels read bias and k as contiguous vectors)
    const at::Tensor bias = bias_arg.has_value() ? bias_arg->contiguous() : at::Tensor();
    const at::Tensor k = k_arg.has_value() ? k_arg->contiguous() : at::Tensor();
    const auto kernel = weight.sizes().slice(2);
    const std::vector<int64_t> no_output_padding(kernel.size(), 0);
    const at::Tensor w_conv = w_hat.view(weight.sizes());
    at::Tensor inner = at::convolution(input, w_conv, c10::nullopt, stride, padding, dilation, false,
                                       no_output_padding, groups)
                           .contiguous();
    const int64_t n = inner.size(0), channels = inner.size(1), positions = plane_size(inner);
    std::vector<int64_t> r_shape{n, groups};
    for (int64_t d : inner.sizes().slice(2)) r_shape.push_back(d);
    at::Tensor r = at::empty(r_shape, inner.options());
    at::Tensor out = at::empty_like(inner);
    at::Tensor extra = op == kSigmoid ? at::empty_like(inner) : at::Tensor();
    const auto geometry =
        window_geometry(sq.sizes().slice(2), inner.sizes().slice(2), kernel, stride, padding, dilation);
    AT_DISPATCH_FLOATING_TYPES(inner.scalar_type(), "sphereconv_forward", [&] {
      normalized_forward<scalar_t>(inner.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), sq.data_ptr<scalar_t>(),
                                   peak.data_ptr<scalar_t>(), geometry.data(), static_cast<scalar_t>(eps),
                                   ptr_or_null<scalar_t>(k), k.defined() && k.numel() > 1, ptr_or_null<scalar_t>(bias),
                                   out.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(extra), n, channels, groups,
                                   positions, static_cast<int>(op), threads_for(inner));
    });
    // inner now holds the cosine
    ctx->save_for_backward({input, w_hat, w_norm, w_signed_peak, peak, sign, inner, r, k, extra});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["weight_shape"] = weight.sizes().vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["op"] = op;
    ctx->saved_data["has_bias"] = bias.defined();  // (then the edge of k is the 4th, else the 3rd)
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["acos_floor"] = acos_floor;
    ctx->saved_data["acos_cap"] = acos_cap;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Once differentiable, as the Python path (@once_differentiable): with create_graph the gradients
    // carry a node that raises if they are differentiated again.
    const bool twice = at::GradMode::is_enabled();
    variable_list result;
    {
      at::NoGradGuard no_grad;
      result = gradients(ctx, grads[0]);
    }
    if (!twice) return result;
    for (auto& g : result)
      if (g.defined()) g = g.detach().requires_grad_(true);
    const auto count = static_cast<int64_t>(result.size());
    return std::make_shared<torch::autograd::DelayedError>(kTwiceMessage, count)->apply(std::move(result));
  }

  static variable_list gradients(AutogradContext* ctx, const at::Tensor& grad) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &w_hat = saved[1], &w_norm = saved[2], &w_signed_peak = saved[3],
                     &peak = saved[4], &sign = saved[5], &cos = saved[6], &r = saved[7], &k = saved[8],
                     &extra = saved[9];
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const auto weight_shape = ctx->saved_data["weight_shape"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const int op = static_cast<int>(ctx->saved_data["op"].toInt());
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    // needs_input_grad counts the tensor arguments given: bias and k only where defined
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const bool need_k = k.defined() && ctx->needs_input_grad(has_bias ? 3 : 2);
    const at::Tensor grad_out = grad.contiguous().to(cos.scalar_type());
    const int64_t n = cos.size(0), channels = cos.size(1), positions = plane_size(cos);
    at::Tensor d_inner = at::empty_like(cos);
    at::Tensor d_sq = at::empty_like(r);
    at::Tensor d_bias = need_b ? at::empty({channels}, cos.options()) : at::Tensor();
    at::Tensor d_k = need_k ? at::empty({channels}, cos.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(cos.scalar_type(), "sphereconv_backward", [&] {
      ::backward<scalar_t>(grad_out.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(extra),
                         r.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(k), k.defined() && k.numel() > 1,
                         d_inner.data_ptr<scalar_t>(), d_sq.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(d_bias),
                         ptr_or_null<scalar_t>(d_k), n, channels, groups, positions, op,
                         static_cast<scalar_t>(ctx->saved_data["acos_floor"].toDouble()),
                         static_cast<scalar_t>(ctx->saved_data["acos_cap"].toDouble()), threads_for(cos));
    });
    if (need_k && k.numel() == 1) d_k = d_k.sum().reshape(k.sizes());
    at::Tensor grad_input, grad_weight;
    if (need_x || need_w) {
      const std::vector<int64_t> no_output_padding(stride.size(), 0);
      auto conv_grads =
          at::convolution_backward(d_inner, input, w_hat.view(weight_shape), c10::nullopt, stride, padding, dilation,
                                   false, no_output_padding, groups, {need_x, need_w, false});
      grad_input = std::get<0>(conv_grads);
      grad_weight = std::get<1>(conv_grads);
    }
    if (need_x) {
      grad_input = grad_input.contiguous();
      const at::Tensor x = input.contiguous();
      const auto geometry = window_geometry(grad_input.sizes().slice(2), d_sq.sizes().slice(2),
                                            at::IntArrayRef(weight_shape).slice(2), stride, padding, dilation);
      AT_DISPATCH_FLOATING_TYPES(grad_input.scalar_type(), "sphereconv_input_backward", [&] {
        input_backward<scalar_t>(grad_input.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), d_sq.data_ptr<scalar_t>(),
                                 peak.data_ptr<scalar_t>(), sign.data_ptr<scalar_t>(), nullptr,
                                 static_cast<scalar_t>(eps), n, grad_input.size(1), groups, geometry.data(),
                                 threads_for(grad_input));
      });
    }
    if (need_w) {
      at::Tensor d_hat = grad_weight.flatten(1).contiguous();
      AT_DISPATCH_FLOATING_TYPES(d_hat.scalar_type(), "sphereconv_filter_backward", [&] {
        filter_unit_backward<scalar_t>(d_hat.data_ptr<scalar_t>(), w_hat.data_ptr<scalar_t>(),
                                       w_norm.data_ptr<scalar_t>(), w_signed_peak.data_ptr<scalar_t>(), nullptr,
                                       d_hat.size(0), d_hat.size(1), static_cast<scalar_t>(eps));
      });
      grad_weight = d_hat.view(weight_shape);
    }
    // one entry per forward argument (18)
    variable_list result(18);
    result[0] = grad_input;
    result[1] = grad_weight;
    result[2] = d_bias;
    result[3] = d_k;
    return result;
  }
};

// The layer's output, or an undefined tensor (None in Python) when a filter's or a sample-group's
// largest |value| lies outside [lo, hi]: those need the power-of-two rescaling of the Python path.
// Contiguous float32/float64 CPU input, weight of the same dtype (see _cpu_kernels.sphere_conv).
at::Tensor sphere_conv(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& k, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, int64_t op, double eps, double acos_floor,
                       double acos_cap, double lo, double hi) {
  at::Tensor w_hat, w_norm, w_signed_peak, sq, peak, sign;
  bool direct = true;
  {
    at::NoGradGuard no_grad;
    const at::Tensor w = weight.detach().flatten(1).contiguous();
    const at::Tensor x = input.detach().contiguous();
    const at::Tensor sum_sq = at::mul(w, w).sum(1);  // as the ATen path sums (see filter_unit)
    w_hat = at::empty_like(w);
    w_norm = at::empty({w.size(0)}, w.options());
    w_signed_peak = at::empty({w.size(0)}, w.options());
    const int64_t n = x.size(0), channels = x.size(1), positions = plane_size(x);
    std::vector<int64_t> sq_shape{n, groups};
    for (int64_t d : x.sizes().slice(2)) sq_shape.push_back(d);
    sq = at::empty(sq_shape, x.options());
    peak = at::empty({n, groups}, x.options());
    sign = at::empty({n, groups}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sphereconv_norms", [&] {
      direct = filter_unit<scalar_t>(w.data_ptr<scalar_t>(), sum_sq.data_ptr<scalar_t>(), w_hat.data_ptr<scalar_t>(),
                                     w_norm.data_ptr<scalar_t>(), w_signed_peak.data_ptr<scalar_t>(), w.size(0),
                                     w.size(1), static_cast<scalar_t>(eps), static_cast<scalar_t>(lo),
                                     static_cast<scalar_t>(hi)) &&
               sample_stats<scalar_t>(x.data_ptr<scalar_t>(), sq.data_ptr<scalar_t>(), peak.data_ptr<scalar_t>(),
                                      sign.data_ptr<scalar_t>(), n, channels, groups, positions,
                                      static_cast<scalar_t>(lo), static_cast<scalar_t>(hi), threads_for(x));
    });
  }
  if (!direct) return at::Tensor();
  return SphereConvFunction::apply(input, weight, bias, k, w_hat, w_norm, w_signed_peak, sq, peak, sign, stride.vec(),
                                   padding.vec(), dilation.vec(), groups, op, eps, acos_floor, acos_cap);
}

}  // namespace sphereconv

// The namespace is set by the build (one per source and flags: a process may load two builds).
TORCH_LIBRARY(SPHERECONV_OPS, m) {
  m.def(
      "sphere_conv(Tensor input, Tensor weight, Tensor? bias, Tensor? k, int[] stride, int[] padding, "
      "int[] dilation, int groups, int op, float eps, float acos_floor, float acos_cap, float lo, float hi) -> Tensor",
      &sphereconv::sphere_conv);
}
