// The CPU BatchNorm kernels. setup.py builds this file once per instruction
// set (see adam_cpu_kernel.cpp); batch_norm_cpu.cpp calls the one the running
// CPU supports. The per-element and per-channel math is
// csrc/include/pyoptim/batch_norm.h and welford.h, run on at::vec::Vectorized.
//
// note [batch norm cache reuse]: statistics are taken chunk by chunk, each
// chunk (kChunk elements, in L1) read twice: its sum gives its mean, then
// sum((x - chunk mean)^2) its m2; chunks then merge by Welford's rule
// (welford_merge). DRAM sees each input byte once for the statistics. In
// NCHW one task then normalizes the channel it just reduced (its count
// elements are still in L2, or in L3 once past L2's size), and the
// backward's dx pass follows its two sums the same way, so a training
// forward reads x from DRAM once. The channels-last layout holds every
// channel in each row: the statistics need all rows before any can be
// normalized, so x is read twice there.
//
// note [batch norm shift]: the chunks' states are of d = x - K, K a
// channel's first chunk's mean (the same K for all its blocks). With |mean|
// >> std a float32 chunk mean near 0 keeps the digits that one near 1000
// would round away (and with them, through the merges, a part of m2 in 1e6);
// x - K is exact for x within a factor 2 of K. mean = K + mean(d) at the end.
//
// note [elementwise tails]: every element of y and dx goes through the same
// vector code: a run shorter than a vector is loaded and stored by a partial
// (masked) vector, and a run's last partial step is redone as a whole vector
// ending at its end (or, when streaming, stored masked). So an element's
// value never depends on where a loop's steps fell (a scalar tail compiled
// with FMA contraction could differ by an ulp), neither on alignment nor on
// the block partition.
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <pyoptim/batch_norm.h>
#include <pyoptim/welford.h>

#include "batch_norm_cpu.h"
#include "vec_io.h"
#include "vec_math.h"

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace pyoptim::cpu::CPU_CAPABILITY {

namespace {

// Elements of one cache-hot two-pass chunk (note [batch norm cache reuse]):
// 16 KB of fp32, well inside L1, and few enough that each vector lane adds at
// most 64 terms before the chunk's total joins the block's.
constexpr int64_t kChunk = 4096;

// Independent accumulators per sum: an add's latency is 4 cycles.
constexpr int kAccs = 4;

template <typename S>
using Welford = WelfordState<S, int64_t>;

// The k-th of `blocks` equal parts of [0, n) (note [batch norm blocks]).
PYOPTIM_INLINE std::pair<int64_t, int64_t> block_range(int64_t n, int64_t blocks, int64_t k) {
  return {k * n / blocks, (k + 1) * n / blocks};
}

// ------------------------------------------------------------- reduction terms
// Generic callables run on vectors and on scalars: term(a0, a1, x, dy, m, dm)
// adds one element's terms to the accumulators a0 (and a1); m and dm are the
// channel's shift K and chunk mean of x - K (note [batch norm shift]), or
// its mean.
struct SumTerm {  // a0 += x - K
  static constexpr bool kDy = false;
  template <typename M>
  PYOPTIM_INLINE void operator()(M& a0, M&, M x, M, M m, M) const {
    a0 = a0 + (x - m);
  }
};

struct SqDevTerm {  // a0 += ((x - K) - mean(x - K))^2
  static constexpr bool kDy = false;
  template <typename M>
  PYOPTIM_INLINE void operator()(M& a0, M&, M x, M, M m, M dm) const {
    const M d = (x - m) - dm;
    a0 = a0 + d * d;
  }
};

struct GradTerm {  // a0 += dy, a1 += dy * (x - mean)
  static constexpr bool kDy = true;
  template <typename M>
  PYOPTIM_INLINE void operator()(M& a0, M& a1, M x, M dy, M m, M) const {
    a0 = a0 + dy;
    a1 = a1 + dy * (x - m);
  }
};

struct ShiftedSumsTerm {  // a0 += x - K, a1 += (x - K)^2 (note [batch norm sample-major])
  static constexpr bool kDy = false;
  template <typename M>
  PYOPTIM_INLINE void operator()(M& a0, M& a1, M x, M, M m, M) const {
    const M d = x - m;
    a0 = a0 + d;
    a1 = a1 + d * d;
  }
};

// ------------------------------------------------------------------- NCHW
// Channel c's elements n * S + s in [f0, f1), as the contiguous runs
// fn(n, offset of the run in the tensor, length).
template <typename F>
PYOPTIM_INLINE void for_runs(const BatchNormCpuLaunch& L, int64_t c, int64_t f0, int64_t f1, F fn) {
  int64_t n = f0 / L.S, s = f0 % L.S;
  for (int64_t f = f0; f < f1; ++n, s = 0) {
    const int64_t len = std::min(L.S - s, f1 - f);
    fn(n, (n * L.C + c) * L.S + s, len);
    f += len;
  }
}

// note [batch norm prefetch]: a channel's runs lie C * S elements apart, so
// the hardware prefetchers lose the stream at every run's end (and short
// runs, a 14 x 14 image's 784 bytes, end before they have found it): the
// statistics' first pass read at half a plain sum's bandwidth. The first
// pass over a chunk asks for the data kPrefetchBytes ahead in the channel's
// order: short runs a whole run at a time, long ones line by line, reaching
// into the next run near the end of this one.
constexpr int64_t kPrefetchBytes = 4096;

// Runs ahead to prefetch for runs of S elements of T; -1: long runs, prefetched line by line.
template <typename T>
PYOPTIM_INLINE int64_t prefetch_runs(int64_t S) {
  const int64_t bytes = S * static_cast<int64_t>(sizeof(T));
  return bytes >= kPrefetchBytes ? -1 : std::min<int64_t>(32, (kPrefetchBytes + bytes - 1) / bytes);
}

// Prefetches run n + ahead of channel c (up to element f1 of the channel) of x, and of dy when
// given; for writing when WRITE.
template <typename T, bool WRITE = false>
PYOPTIM_INLINE void prefetch_run(const BatchNormCpuLaunch& L, const T* x, const T* dy, int64_t c, int64_t n,
                                 int64_t ahead, int64_t f1) {
  const int64_t n2 = n + ahead, f = n2 * L.S;
  if (f >= f1) {
    return;
  }
  const int64_t off = (n2 * L.C + c) * L.S, bytes = std::min(L.S, f1 - f) * static_cast<int64_t>(sizeof(T));
  const char* px = reinterpret_cast<const char*>(x + off);
  const char* pd = dy ? reinterpret_cast<const char*>(dy + off) : nullptr;
  for (int64_t i = 0; i < bytes + 63; i += 64) {
    __builtin_prefetch(px + std::min(i, bytes - 1), WRITE ? 1 : 0, 3);
    if (pd) {
      __builtin_prefetch(pd + std::min(i, bytes - 1), 0, 3);
    }
  }
}

// One run's terms added to acc[a][*] (vector lanes) and tail[a] (elements past the last whole vector).
// With nx (long runs, note [batch norm prefetch]): prefetches kPrefetchBytes
// ahead, into the next run (nx, nd: its x and dy, nlen elements) past this one's end.
template <typename T, typename Term>
PYOPTIM_INLINE void run_reduce(const T* x, const T* dy, int64_t len, at::opmath_type<T> m, at::opmath_type<T> dm,
                               at::vec::Vectorized<at::opmath_type<T>> (&acc)[2][kAccs], at::opmath_type<T> (&tail)[2],
                               Term term, const T* nx = nullptr, const T* nd = nullptr, int64_t nlen = 0) {
  using Ln = Lanes<T>;
  using S = typename Ln::S;
  using V = typename Ln::V;
  constexpr int P = Ln::P;
  constexpr int64_t K = Ln::K;
  const V mv(m), dmv(dm);
  auto step = [&](int64_t j, int u) {
    V xv[P], gv[P];
    load<P>(x + j, xv);
    if constexpr (Term::kDy) {
      load<P>(dy + j, gv);
    } else {
      for (int k = 0; k < P; ++k) {
        gv[k] = xv[k];
      }
    }
    for (int k = 0; k < P; ++k) {
      term(acc[0][u], acc[1][u], xv[k], gv[k], mv, dmv);
    }
  };
  constexpr int64_t kAhead = kPrefetchBytes / static_cast<int64_t>(sizeof(T));
  int64_t j = 0;
  for (; j + kAccs * K <= len; j += kAccs * K) {
    if (nx) {
      const int64_t t = j + kAhead;
      if (t < len || t - len < nlen) {
        const T* px = t < len ? x + t : nx + (t - len);
        const T* pd = Term::kDy ? (t < len ? dy + t : nd + (t - len)) : nullptr;
        for (int u = 0; u < kAccs; ++u) {
          __builtin_prefetch(px + u * K, 0, 3);
          if constexpr (Term::kDy) {
            __builtin_prefetch(pd + u * K, 0, 3);
          }
        }
      }
    }
    for (int u = 0; u < kAccs; ++u) {
      step(j + u * K, u);
    }
  }
  for (int u = 0; j + K <= len; j += K, ++u) {
    step(j, u);
  }
  for (; j < len; ++j) {
    const S xs = static_cast<S>(x[j]);
    term(tail[0], tail[1], xs, Term::kDy ? static_cast<S>(dy[j]) : xs, m, dm);
  }
}

// The terms' two sums over channel c's elements [g, ge) (one chunk).
template <typename T, typename Term>
PYOPTIM_INLINE void chunk_reduce(const BatchNormCpuLaunch& L, const T* x, const T* dy, int64_t c, int64_t g,
                                 int64_t ge, at::opmath_type<T> m, at::opmath_type<T> dm, at::opmath_type<T> (&out)[2],
                                 Term term, int64_t ahead = 0, int64_t f1 = 0) {
  // ahead: prefetch_runs<T>(S) up to element f1 of the channel, or 0: no prefetching.
  using S = at::opmath_type<T>;
  using V = at::vec::Vectorized<S>;
  V acc[2][kAccs];
  for (int a = 0; a < 2; ++a) {
    for (int u = 0; u < kAccs; ++u) {
      acc[a][u] = V(S(0));
    }
  }
  S tail[2] = {S(0), S(0)};
  for_runs(L, c, g, ge, [&](int64_t n, int64_t off, int64_t len) {
    if (ahead > 0) {
      prefetch_run<T>(L, x, Term::kDy ? dy : nullptr, c, n, ahead, f1);
    } else if (ahead < 0 && (n + 1) * L.S < f1) {
      const int64_t noff = ((n + 1) * L.C + c) * L.S;
      run_reduce<T>(x + off, Term::kDy ? dy + off : nullptr, len, m, dm, acc, tail, term, x + noff,
                    Term::kDy ? dy + noff : nullptr, std::min(L.S, f1 - (n + 1) * L.S));
      return;
    }
    run_reduce<T>(x + off, Term::kDy ? dy + off : nullptr, len, m, dm, acc, tail, term);
  });
  for (int a = 0; a < 2; ++a) {
    out[a] = lane_sum((acc[a][0] + acc[a][1]) + (acc[a][2] + acc[a][3])) + tail[a];
  }
}

// Channel c's shift K: the mean of its first chunk (note [batch norm shift]).
template <typename T>
at::opmath_type<T> nchw_shift(const BatchNormCpuLaunch& L, const T* x, int64_t c) {
  using S = at::opmath_type<T>;
  const int64_t n = std::min(kChunk, L.N * L.S);
  S r[2];
  chunk_reduce<T>(L, x, nullptr, c, 0, n, S(0), S(0), r, SumTerm{}, prefetch_runs<T>(L.S), n);
  return r[0] / static_cast<S>(n);
}

// The mean and m2 of x - K over channel c's elements [f0, f1), chunk by
// chunk (notes [batch norm cache reuse], [batch norm shift]).
template <typename T>
Welford<at::opmath_type<T>> nchw_stats(const BatchNormCpuLaunch& L, const T* x, int64_t c, int64_t f0, int64_t f1,
                                       at::opmath_type<T> K) {
  using S = at::opmath_type<T>;
  Welford<S> st{S(0), S(0), 0};
  const int64_t ahead = prefetch_runs<T>(L.S);
  for (int64_t g = f0; g < f1; g += kChunk) {
    const int64_t ge = std::min(f1, g + kChunk);
    S r[2];
    chunk_reduce<T>(L, x, nullptr, c, g, ge, K, S(0), r, SumTerm{}, ahead, f1);
    const S dmean = r[0] / static_cast<S>(ge - g);
    chunk_reduce<T>(L, x, nullptr, c, g, ge, K, dmean, r, SqDevTerm{});
    welford_merge(st, Welford<S>{dmean, r[0], ge - g});
  }
  return st;
}

// sum(dy) and sum(dy * (x - m)) over channel c's elements [f0, f1).
template <typename T>
void nchw_grad_sums(const BatchNormCpuLaunch& L, const T* x, const T* dy, int64_t c, int64_t f0, int64_t f1,
                    at::opmath_type<T> m, at::opmath_type<T> (&out)[2]) {
  using S = at::opmath_type<T>;
  out[0] = out[1] = S(0);
  const int64_t ahead = prefetch_runs<T>(L.S);
  for (int64_t g = f0; g < f1; g += kChunk) {
    S r[2];
    chunk_reduce<T>(L, x, dy, c, g, std::min(f1, g + kChunk), m, S(0), r, GradTerm{}, ahead, f1);
    out[0] += r[0];
    out[1] += r[1];
  }
}

// ----------------------------------------------------- NCHW, sample-major
// note [batch norm sample-major]: a small NCHW tensor of short runs (ResNet's
// last 32 x 512 x 7 x 7: runs of 196 bytes, 3.2 MB) read channel by channel
// jumps C * S elements between runs, a few lines each: from a cold cache every
// run waits on DRAM (0.55 ms, against 0.21 ms with the tensor in L3), and in
// L3 the per-run work still dominates. Instead each block reads its runs in
// memory order, the tensor streaming at the prefetchers' pace, and adds each
// run to its channel's vector accumulators (2 x C vectors, in L2); their lanes
// are summed once a chunk (chunk_samples samples), not once a run. The
// statistics take two passes: the channel means K, then shifted sums sum(d)
// and sum(d^2) of d = x - K, m2 = sum(d^2) - sum(d)^2 / n a chunk, merged by
// Welford's rule as the chunks of the channel-major path are. With K the mean
// (to float32's rounding, note [batch norm shift]) sum(d) is near 0 and the
// subtraction cancels nothing; K from the first sample alone lost digits in
// proportion to (its mean - the mean)^2 / var (1e-6 of invstd when it sat 3
// std off). The second pass and the elementwise pass read x from L3: the
// launcher takes this path only for tensors that fit it (or for runs shorter
// than a line, which the channel order would read several times over).

// Channels with runs in [a, b) of the run order (run r: sample r / C, channel r % C), and how many.
PYOPTIM_INLINE int64_t runs_of_channel(int64_t C, int64_t c, int64_t a, int64_t b) {
  auto upto = [&](int64_t e) { return e > c ? (e - c + C - 1) / C : 0; };  // runs of c in [0, e)
  return upto(b) - upto(a);
}

// Samples per chunk: about kChunk elements of each channel.
PYOPTIM_INLINE int64_t chunk_samples(int64_t S) { return std::max<int64_t>(1, kChunk / S); }

// One run of len elements added to a channel's two vector accumulators; the
// lanes past len (the last step's) add nothing.
template <typename T, typename Term>
PYOPTIM_INLINE void run_accumulate(const T* x, const T* dy, int64_t len, at::opmath_type<T> m,
                                   at::vec::Vectorized<at::opmath_type<T>>& a0,
                                   at::vec::Vectorized<at::opmath_type<T>>& a1, Term term) {
  using Ln = Lanes<T>;
  using S = typename Ln::S;
  using V = typename Ln::V;
  constexpr int P = Ln::P;
  constexpr int64_t K = Ln::K;
  const V mv(m), zero(S(0));
  int64_t j = 0;
  for (; j + K <= len; j += K) {
    V xv[P], gv[P];
    load<P>(x + j, xv);
    if constexpr (Term::kDy) {
      load<P>(dy + j, gv);
    }
    for (int k = 0; k < P; ++k) {
      term(a0, a1, xv[k], Term::kDy ? gv[k] : xv[k], mv, zero);
    }
  }
  if (j < len) {
    V xv[P], gv[P];
    load_n<P>(x + j, xv, len - j);
    if constexpr (Term::kDy) {
      load_n<P>(dy + j, gv, len - j);
    }
    for (int k = 0; k < P; ++k) {
      const int64_t valid = std::clamp<int64_t>(len - j - k * V::size(), 0, V::size());
      V t0 = zero, t1 = zero;
      term(t0, t1, xv[k], Term::kDy ? gv[k] : xv[k], mv, zero);
      a0 = a0 + V::set(zero, t0, valid);
      a1 = a1 + V::set(zero, t1, valid);
    }
  }
}

// The terms of runs [r0, r1) summed per channel; every chunk (and at r1),
// flush(c, sum0, sum1, n) for each channel with n > 0 elements in it. m[C]:
// each channel's shift or mean.
template <typename T, typename Term, typename Flush>
void sample_major_reduce(const BatchNormCpuLaunch& L, const T* x, const T* dy, int64_t r0, int64_t r1,
                         const at::opmath_type<T>* m, Term term, Flush flush) {
  using S = at::opmath_type<T>;
  using V = at::vec::Vectorized<S>;
  const int64_t C = L.C, S_ = L.S, step = C * chunk_samples(S_);
  std::vector<V> acc(2 * C, V(S(0)));
  for (int64_t g = r0; g < r1; g += step) {
    const int64_t ge = std::min(r1, g + step);
    for (int64_t r = g; r < ge; ++r) {
      const int64_t c = r % C;
      run_accumulate<T>(x + r * S_, Term::kDy ? dy + r * S_ : nullptr, S_, m[c], acc[2 * c], acc[2 * c + 1], term);
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t runs = runs_of_channel(C, c, g, ge);
      if (runs > 0) {
        flush(c, lane_sum(acc[2 * c]), lane_sum(acc[2 * c + 1]), runs * S_);
        acc[2 * c] = acc[2 * c + 1] = V(S(0));
      }
    }
  }
}

// Every channel's shift K[C]: its mean, from a pass of sums over the B blocks
// (part: scratch of [B][C]), added in block order.
template <typename T>
void sample_major_shift(const BatchNormCpuLaunch& L, const T* x, int64_t B, at::opmath_type<T>* part,
                        at::opmath_type<T>* K) {
  using S = at::opmath_type<T>;
  const int64_t C = L.C;
  std::vector<S> zero(C, S(0));
  at::parallel_for(0, B, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const auto [r0, r1] = block_range(L.N * C, B, k);
      S* sum = part + k * C;
      std::fill(sum, sum + C, S(0));
      sample_major_reduce<T>(L, x, nullptr, r0, r1, zero.data(), SumTerm{},
                             [&](int64_t c, S a0, S, int64_t) { sum[c] += a0; });
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    S sum = 0;
    for (int64_t k = 0; k < B; ++k) {
      sum += part[k * C + c];
    }
    K[c] = sum / static_cast<S>(L.N * L.S);
  }
}

// The mean and m2 of x - K, every channel over runs [r0, r1), into mean[C], m2[C] (nhwc_stats's outputs).
template <typename T>
void sample_major_stats(const BatchNormCpuLaunch& L, const T* x, int64_t r0, int64_t r1, const at::opmath_type<T>* K,
                        at::opmath_type<T>* mean, at::opmath_type<T>* m2) {
  using S = at::opmath_type<T>;
  std::vector<int64_t> count(L.C, 0);
  std::fill(mean, mean + L.C, S(0));
  std::fill(m2, m2 + L.C, S(0));
  sample_major_reduce<T>(L, x, nullptr, r0, r1, K, ShiftedSumsTerm{}, [&](int64_t c, S s0, S s1, int64_t n) {
    const S dmean = s0 / static_cast<S>(n);
    S dm2 = s1 - s0 * dmean;
    dm2 = dm2 < S(0) ? S(0) : dm2;  // rounding below 0; a NaN stays NaN
    Welford<S> a{mean[c], m2[c], count[c]};
    welford_merge(a, Welford<S>{dmean, dm2, n});
    mean[c] = a.mean;
    m2[c] = a.m2;
    count[c] = a.count;
  });
}

// sum(dy) and sum(dy * (x - mean)) of every channel over runs [r0, r1), into s0[C], s1[C].
template <typename T>
void sample_major_grad_sums(const BatchNormCpuLaunch& L, const T* x, const T* dy, int64_t r0, int64_t r1,
                            const at::opmath_type<T>* mean, at::opmath_type<T>* s0, at::opmath_type<T>* s1) {
  using S = at::opmath_type<T>;
  std::fill(s0, s0 + L.C, S(0));
  std::fill(s1, s1 + L.C, S(0));
  sample_major_reduce<T>(L, x, dy, r0, r1, mean, GradTerm{}, [&](int64_t c, S a0, S a1, int64_t) {
    s0[c] += a0;
    s1[c] += a1;
  });
}

// ------------------------------------------------------------ elementwise
// Per-channel coefficients of the elementwise passes, from batch_norm.h:
//   forward  (BWD = false): mean, scale, bias       -> y  = batch_norm_fwd_elem
//   backward (BWD = true):  mean, mean_dy, proj, scale -> dx = batch_norm_bwd_elem
// stored coefficient-major: cf[i * stride] for coefficient i of a channel.
template <bool BWD>
constexpr int kCoeffs = BWD ? 4 : 3;

template <typename S>
PYOPTIM_INLINE void put_fwd_coeffs(S* cf, int64_t stride, const BatchNormFwdCoeffs<S>& k) {
  cf[0] = k.mean;
  cf[stride] = k.scale;
  cf[2 * stride] = k.bias;
}

template <typename S>
PYOPTIM_INLINE void put_bwd_coeffs(S* cf, int64_t stride, const BatchNormBwdCoeffs<S>& k) {
  cf[0] = k.mean;
  cf[stride] = k.mean_dy;
  cf[2 * stride] = k.proj;
  cf[3 * stride] = k.scale;
}

template <bool BWD, typename M>
PYOPTIM_INLINE M elem(M x, M dy, const M (&cv)[kCoeffs<BWD>]) {
  if constexpr (BWD) {
    return batch_norm_bwd_elem(dy, x, cv[0], cv[1], cv[2], cv[3]);
  } else {
    return batch_norm_fwd_elem(x, cv[0], cv[1], cv[2]);
  }
}

// Coefficients of one step of K elements: every lane channel c's (NCHW), or
// lane l that of channel j + l, read from coefficient-major [kCoeffs][C] (channels-last).
template <bool BWD, typename T>
struct BroadcastCoeffs {
  using V = at::vec::Vectorized<at::opmath_type<T>>;
  static constexpr bool kBroadcast = true;  // the same for every step: fetched once a run
  V cv[kCoeffs<BWD>];
  PYOPTIM_INLINE void get(int64_t, int64_t, V (&out)[kCoeffs<BWD>][Lanes<T>::P]) const {
    for (int i = 0; i < kCoeffs<BWD>; ++i) {
      for (int k = 0; k < Lanes<T>::P; ++k) {
        out[i][k] = cv[i];
      }
    }
  }
};

template <bool BWD, typename T>
struct ChannelCoeffs {
  using V = at::vec::Vectorized<at::opmath_type<T>>;
  static constexpr bool kBroadcast = false;
  const at::opmath_type<T>* cf;
  int64_t C;
  PYOPTIM_INLINE void get(int64_t j, int64_t n, V (&out)[kCoeffs<BWD>][Lanes<T>::P]) const {
    for (int i = 0; i < kCoeffs<BWD>; ++i) {
      if (n == Lanes<T>::K) {
        load<Lanes<T>::P>(cf + i * C + j, out[i]);
      } else {
        load_n<Lanes<T>::P>(cf + i * C + j, out[i], n);
      }
    }
  }
};

// Whether runs of `len` elements of T take streaming stores (note [streaming
// stores]): only when each run fills whole lines. Runs that share lines with
// their neighbours (196 floats of a 14 x 14 image) ran 4x slower streamed
// than with ordinary stores, their partial lines written the ordinary way.
template <typename T>
PYOPTIM_INLINE bool stream_runs(bool wanted, int64_t len) {
  return wanted && kStreamAlign != 0 && (len * sizeof(T)) % (kStreamAlign ? kStreamAlign : 1) == 0;
}

// out = elem(x, dy) over one contiguous run of len elements (NCHW: of one
// channel; channels-last: one row), note [elementwise tails]. With `stream`
// (note [streaming stores]) the vector-aligned lines inside the run take
// streaming stores and the partial lines at its ends (an unaligned tensor)
// masked ordinary ones: a line is never written both ways.
template <bool BWD, typename T, typename Coeffs>
PYOPTIM_INLINE void run_elem(const T* x, const T* dy, T* out, int64_t len, const Coeffs& coeffs, bool stream) {
  using Ln = Lanes<T>;
  using V = typename Ln::V;
  constexpr int P = Ln::P;
  constexpr int64_t K = Ln::K;
  constexpr int NC = kCoeffs<BWD>;
  V cs_run[NC][P];
  if constexpr (Coeffs::kBroadcast) {
    coeffs.get(0, K, cs_run);
  }
  // Elements [j, j + n) from a load of K (n = K) or of n elements; stores the first `keep`.
  auto step = [&](int64_t j, int64_t n, int64_t keep, bool nt) {
    V xv[P], gv[P], cs[NC][P];
    if (n == K) {
      load<P>(x + j, xv);
      if constexpr (BWD) {
        load<P>(dy + j, gv);
      }
    } else {
      load_n<P>(x + j, xv, n);
      if constexpr (BWD) {
        load_n<P>(dy + j, gv, n);
      }
    }
    if constexpr (!Coeffs::kBroadcast) {
      coeffs.get(j, n, cs);
    }
    for (int k = 0; k < P; ++k) {
      V cv[NC];
      for (int i = 0; i < NC; ++i) {
        cv[i] = Coeffs::kBroadcast ? cs_run[i][k] : cs[i][k];
      }
      if constexpr (BWD) {
        xv[k] = elem<BWD>(xv[k], gv[k], cv);
      } else {
        xv[k] = elem<BWD>(xv[k], xv[k], cv);
      }
    }
    if (keep == K) {
      store_out<P>(out + j, xv, nt);
    } else {
      store_n<P>(out + j, xv, keep);
    }
  };
  if (len < K) {
    if (len > 0) {
      step(0, len, len, false);
    }
    return;
  }
  int64_t j = 0;
  bool nt = false;
  if (stream && kStreamAlign != 0) {
    const uintptr_t mis = reinterpret_cast<uintptr_t>(out) % (kStreamAlign ? kStreamAlign : 1);
    if (mis % sizeof(T) == 0) {
      nt = true;
      if (mis != 0) {
        j = static_cast<int64_t>((kStreamAlign - mis) / sizeof(T));  // < K
        step(0, K, j, false);
      }
    }
  }
  for (; j + K <= len; j += K) {
    step(j, K, K, nt);
  }
  if (j < len) {
    if (nt) {
      step(j, len - j, len - j, false);
    } else {
      step(len - K, K, K, false);  // overlapping the steps before: the same values again
    }
  }
}

// The elementwise pass over channel c's elements [f0, f1); cf its coefficients (stride apart).
template <bool BWD, typename T>
void nchw_elem(const BatchNormCpuLaunch& L, int64_t c, int64_t f0, int64_t f1, const at::opmath_type<T>* cf,
               int64_t stride) {
  using V = at::vec::Vectorized<at::opmath_type<T>>;
  BroadcastCoeffs<BWD, T> coeffs;
  for (int i = 0; i < kCoeffs<BWD>; ++i) {
    coeffs.cv[i] = V(cf[i * stride]);
  }
  const T* x = static_cast<const T*>(L.x);
  const T* dy = static_cast<const T*>(L.dy);
  T* out = static_cast<T*>(L.out);
  const bool stream = stream_runs<T>(L.stream_out, L.S);
  // Short runs take ordinary stores (stream_runs), each line read for
  // ownership first: asking for the lines of the runs ahead keeps those
  // reads in flight together (note [batch norm prefetch]).
  const int64_t ahead = stream ? 0 : prefetch_runs<T>(L.S);
  for_runs(L, c, f0, f1, [&](int64_t n, int64_t off, int64_t len) {
    if (ahead > 0) {
      prefetch_run<T, true>(L, out, nullptr, c, n, ahead, f1);
    }
    run_elem<BWD, T>(x + off, BWD ? dy + off : nullptr, out + off, len, coeffs, stream);
  });
}

// ---------------------------------------------------------- channels-last
// out_a[c] = sum over the nr rows (of C) at x, dy of the terms at channel c,
// for the G vector steps of channels from j; m, dm: per-channel [C] (dm may be null: 0).
template <int G, typename T, typename Term>
PYOPTIM_INLINE void cols_reduce(const T* x, const T* dy, int64_t C, int64_t nr, int64_t j,
                                const at::opmath_type<T>* m, const at::opmath_type<T>* dm, at::opmath_type<T>* out0,
                                at::opmath_type<T>* out1, Term term) {
  using Ln = Lanes<T>;
  using S = typename Ln::S;
  using V = typename Ln::V;
  constexpr int P = Ln::P;
  constexpr int64_t K = Ln::K;
  constexpr int NV = G * P;
  V mv[NV], dmv[NV], a0[NV], a1[NV];
  for (int i = 0; i < NV; ++i) {
    mv[i] = V::loadu(m + j + i * V::size());
    dmv[i] = dm ? V::loadu(dm + j + i * V::size()) : V(S(0));
    a0[i] = a1[i] = V(S(0));
  }
  for (int64_t r = 0; r < nr; ++r) {
    for (int u = 0; u < G; ++u) {
      V xv[P], gv[P];
      load<P>(x + r * C + j + u * K, xv);
      if constexpr (Term::kDy) {
        load<P>(dy + r * C + j + u * K, gv);
      } else {
        for (int k = 0; k < P; ++k) {
          gv[k] = xv[k];
        }
      }
      for (int k = 0; k < P; ++k) {
        term(a0[u * P + k], a1[u * P + k], xv[k], gv[k], mv[u * P + k], dmv[u * P + k]);
      }
    }
  }
  for (int i = 0; i < NV; ++i) {
    a0[i].store(out0 + j + i * V::size());
    if (out1) {
      a1[i].store(out1 + j + i * V::size());
    }
  }
}

// cols_reduce over all C channels: groups of 4 vectors, single steps, then
// the channels past the last whole step one by one.
template <typename T, typename Term>
void rows_reduce(const T* x, const T* dy, int64_t C, int64_t nr, const at::opmath_type<T>* m,
                 const at::opmath_type<T>* dm, at::opmath_type<T>* out0, at::opmath_type<T>* out1, Term term) {
  using Ln = Lanes<T>;
  using S = typename Ln::S;
  constexpr int G = 4 / Ln::P;
  constexpr int64_t K = Ln::K;
  int64_t j = 0;
  for (; j + G * K <= C; j += G * K) {
    cols_reduce<G, T>(x, dy, C, nr, j, m, dm, out0, out1, term);
  }
  for (; j + K <= C; j += K) {
    cols_reduce<1, T>(x, dy, C, nr, j, m, dm, out0, out1, term);
  }
  for (; j < C; ++j) {
    S a0 = 0, a1 = 0;
    const S mj = m[j], dmj = dm ? dm[j] : S(0);
    for (int64_t r = 0; r < nr; ++r) {
      const S xs = static_cast<S>(x[r * C + j]);
      term(a0, a1, xs, Term::kDy ? static_cast<S>(dy[r * C + j]) : xs, mj, dmj);
    }
    out0[j] = a0;
    if (out1) {
      out1[j] = a1;
    }
  }
}

// Rows per chunk of a channels-last block: about kChunk elements.
PYOPTIM_INLINE int64_t chunk_rows(int64_t C) { return std::max<int64_t>(1, kChunk / C); }

// Every channel's shift K[C]: the mean of the first chunk's rows (note [batch norm shift]).
template <typename T>
void nhwc_shift(const BatchNormCpuLaunch& L, const T* x, at::opmath_type<T>* K) {
  using S = at::opmath_type<T>;
  const int64_t nr = std::min(chunk_rows(L.C), L.N * L.S);
  std::vector<S> zero(L.C, S(0));
  rows_reduce<T>(x, nullptr, L.C, nr, zero.data(), nullptr, K, nullptr, SumTerm{});
  for (int64_t c = 0; c < L.C; ++c) {
    K[c] = K[c] / static_cast<S>(nr);
  }
}

// The mean and m2 of x - K, every channel over rows [r0, r1), chunk by
// chunk (notes [batch norm cache reuse], [batch norm shift]), into mean[C], m2[C].
template <typename T>
void nhwc_stats(const BatchNormCpuLaunch& L, const T* x, int64_t r0, int64_t r1, const at::opmath_type<T>* K,
                at::opmath_type<T>* mean, at::opmath_type<T>* m2) {
  using S = at::opmath_type<T>;
  using V = at::vec::Vectorized<S>;
  const int64_t C = L.C, R = chunk_rows(C);
  std::vector<S> scratch(2 * C);
  S* cm = scratch.data();
  S* cm2 = cm + C;
  std::fill(mean, mean + C, S(0));
  std::fill(m2, m2 + C, S(0));
  int64_t count = 0;
  for (int64_t g = r0; g < r1; g += R) {
    const int64_t nr = std::min(r1, g + R) - g;
    rows_reduce<T>(x + g * C, nullptr, C, nr, K, nullptr, cm, nullptr, SumTerm{});
    for (int64_t c = 0; c < C; ++c) {
      cm[c] = cm[c] / static_cast<S>(nr);
    }
    rows_reduce<T>(x + g * C, nullptr, C, nr, K, cm, cm2, nullptr, SqDevTerm{});
    int64_t c = 0;
    for (; c + V::size() <= C; c += V::size()) {
      Welford<V> a{V::loadu(mean + c), V::loadu(m2 + c), count};
      welford_merge(a, Welford<V>{V::loadu(cm + c), V::loadu(cm2 + c), nr});
      a.mean.store(mean + c);
      a.m2.store(m2 + c);
    }
    for (; c < C; ++c) {
      Welford<S> a{mean[c], m2[c], count};
      welford_merge(a, Welford<S>{cm[c], cm2[c], nr});
      mean[c] = a.mean;
      m2[c] = a.m2;
    }
    count += nr;
  }
}

// sum(dy) and sum(dy * (x - mean)) of every channel over rows [r0, r1), into s0[C], s1[C].
template <typename T>
void nhwc_grad_sums(const BatchNormCpuLaunch& L, const T* x, const T* dy, int64_t r0, int64_t r1,
                    const at::opmath_type<T>* mean, at::opmath_type<T>* s0, at::opmath_type<T>* s1) {
  using S = at::opmath_type<T>;
  const int64_t C = L.C, R = chunk_rows(C);
  std::vector<S> scratch(2 * C);
  std::fill(s0, s0 + C, S(0));
  std::fill(s1, s1 + C, S(0));
  for (int64_t g = r0; g < r1; g += R) {
    const int64_t nr = std::min(r1, g + R) - g;
    rows_reduce<T>(x + g * C, dy + g * C, C, nr, mean, nullptr, scratch.data(), scratch.data() + C, GradTerm{});
    for (int64_t c = 0; c < C; ++c) {
      s0[c] += scratch[c];
      s1[c] += scratch[C + c];
    }
  }
}

// The elementwise pass over rows [r0, r1); cf: coefficient-major [kCoeffs][C].
template <bool BWD, typename T>
void nhwc_elem(const BatchNormCpuLaunch& L, int64_t r0, int64_t r1, const at::opmath_type<T>* cf) {
  const int64_t C = L.C;
  const T* x = static_cast<const T*>(L.x);
  const T* dy = static_cast<const T*>(L.dy);
  T* out = static_cast<T*>(L.out);
  const ChannelCoeffs<BWD, T> coeffs{cf, C};
  const bool stream = stream_runs<T>(L.stream_out, C);
  for (int64_t r = r0; r < r1; ++r) {
    run_elem<BWD, T>(x + r * C, BWD ? dy + r * C : nullptr, out + r * C, C, coeffs, stream);
  }
}

// The elementwise pass alone (no reduction before it), parallel over elements.
template <bool BWD, typename T>
void elem_all(const BatchNormCpuLaunch& L, const at::opmath_type<T>* cf) {
  const int64_t C = L.C;
  if (L.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kBatchNormCpuGrain / C);
    at::parallel_for(0, L.N * L.S, grain, [&](int64_t r0, int64_t r1) {
      nhwc_elem<BWD, T>(L, r0, r1, cf);
      stream_fence();
    });
    return;
  }
  // Elements [e0, e1) of the whole tensor, cut where the channel changes;
  // the divisions once a task (one per run cost as much as a short run).
  using V = at::vec::Vectorized<at::opmath_type<T>>;
  const T* x = static_cast<const T*>(L.x);
  const T* dy = static_cast<const T*>(L.dy);
  T* out = static_cast<T*>(L.out);
  const bool stream = stream_runs<T>(L.stream_out, L.S);
  at::parallel_for(0, L.N * C * L.S, kBatchNormCpuGrain, [&](int64_t e0, int64_t e1) {
    int64_t s = e0 % L.S, c = (e0 / L.S) % C;
    for (int64_t e = e0; e < e1;) {
      const int64_t len = std::min(L.S - s, e1 - e);
      BroadcastCoeffs<BWD, T> coeffs;
      for (int i = 0; i < kCoeffs<BWD>; ++i) {
        coeffs.cv[i] = V(cf[i * C + c]);
      }
      run_elem<BWD, T>(x + e, BWD ? dy + e : nullptr, out + e, len, coeffs, stream);
      e += len;
      s = 0;
      c = c + 1 == C ? 0 : c + 1;
    }
    stream_fence();
  });
}

// ------------------------------------------------------------------ kernels
template <typename T>
struct Kernels {
  using S = at::opmath_type<T>;

  static const S* in(const void* p) { return static_cast<const S*>(p); }
  static S* outp(void* p) { return static_cast<S*>(p); }

  // What the blocks of the channels-last and sample-major paths cut: rows
  // of C (N * S of them), or runs of S (N * C).
  static int64_t block_items(const BatchNormCpuLaunch& L) { return L.channels_last ? L.N * L.S : L.N * L.C; }

  // Channel c's elements in block k of B.
  static int64_t block_count(const BatchNormCpuLaunch& L, int64_t B, int64_t k, int64_t c) {
    const auto [r0, r1] = block_range(block_items(L), B, k);
    return L.channels_last ? r1 - r0 : runs_of_channel(L.C, c, r0, r1) * L.S;
  }

  // Their elementwise pass: channels-last by the blocks just reduced (each
  // thread the rows it read), sample-major over the whole tensor.
  template <bool BWD>
  static void items_elem(const BatchNormCpuLaunch& L, int64_t B, const S* cf) {
    if (!L.channels_last) {
      elem_all<BWD, T>(L, cf);
      return;
    }
    at::parallel_for(0, B, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const auto [r0, r1] = block_range(L.N * L.S, B, k);
        nhwc_elem<BWD, T>(L, r0, r1, cf);
      }
      stream_fence();
    });
  }

  // Channel c's statistics st written out; its forward coefficients into cf (stride apart) when cf.
  static void finish_stats(const BatchNormCpuLaunch& L, int64_t c, const Welford<S>& st, S* cf, int64_t stride) {
    outp(L.save_mean)[c] = st.mean;
    if (L.save_m2) {
      outp(L.save_m2)[c] = st.m2;
    }
    if (L.running_mean) {
      const S momentum = static_cast<S>(L.momentum);
      outp(L.new_running_mean)[c] = batch_norm_running(in(L.running_mean)[c], st.mean, momentum);
      outp(L.new_running_var)[c] = batch_norm_running(in(L.running_var)[c], batch_norm_unbiased_var(st), momentum);
    }
    if (L.save_invstd || cf) {
      const S invstd = batch_norm_invstd(st.m2 / static_cast<S>(st.count), static_cast<S>(L.eps));
      if (L.save_invstd) {
        outp(L.save_invstd)[c] = invstd;
      }
      if (cf) {
        put_fwd_coeffs(cf, stride, batch_norm_fwd_coeffs(st.mean, invstd, L.weight ? in(L.weight)[c] : S(1),
                                                         L.bias ? in(L.bias)[c] : S(0)));
      }
    }
  }

  static void stats(const BatchNormCpuLaunch& L) {
    const int64_t C = L.C, count = L.N * L.S, B = L.blocks;
    const T* x = static_cast<const T*>(L.x);
    const bool y = L.out != nullptr;
    S* part = static_cast<S*>(L.partial);
    std::vector<S> cf(y ? kCoeffs<false> * C : 0);
    if (!L.channels_last && !L.sample_major) {
      if (B == 1) {
        // note [batch norm cache reuse]: a channel's statistics, then its y.
        const int64_t grain = std::max<int64_t>(1, kBatchNormCpuGrain / count);
        at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            S k[kCoeffs<false>];
            const S K = nchw_shift<T>(L, x, c);
            Welford<S> st = nchw_stats<T>(L, x, c, 0, count, K);
            st.mean = K + st.mean;
            finish_stats(L, c, st, y ? k : nullptr, 1);
            if (y) {
              nchw_elem<false, T>(L, c, 0, count, k, 1);
            }
          }
          stream_fence();
        });
        return;
      }
      // Block k of channel c is item c * B + k, its (mean, m2, K) in
      // part[3 * item]; every block of a channel finds the same K. The y pass
      // below gives each thread the items it reduced (at::parallel_for splits
      // a range alike).
      at::parallel_for(0, C * B, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const auto [f0, f1] = block_range(count, B, i % B);
          const S K = nchw_shift<T>(L, x, i / B);
          const Welford<S> st = nchw_stats<T>(L, x, i / B, f0, f1, K);
          part[3 * i] = st.mean;
          part[3 * i + 1] = st.m2;
          part[3 * i + 2] = K;
        }
      });
      for (int64_t c = 0; c < C; ++c) {
        Welford<S> st{S(0), S(0), 0};
        for (int64_t k = 0; k < B; ++k) {
          const auto [f0, f1] = block_range(count, B, k);
          welford_merge(st, Welford<S>{part[3 * (c * B + k)], part[3 * (c * B + k) + 1], f1 - f0});
        }
        st.mean = part[3 * c * B + 2] + st.mean;
        finish_stats(L, c, st, y ? cf.data() + c : nullptr, C);
      }
      if (y) {
        at::parallel_for(0, C * B, 1, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const auto [f0, f1] = block_range(count, B, i % B);
            nchw_elem<false, T>(L, i / B, f0, f1, cf.data() + i / B, C);
          }
          stream_fence();
        });
      }
      return;
    }
    // Channels-last, and NCHW sample-major (note [batch norm sample-major]):
    // block k's mean and m2 (of x - K) in part[k][0][:], part[k][1][:].
    std::vector<S> K(C);
    if (L.channels_last) {
      nhwc_shift<T>(L, x, K.data());
    } else {
      sample_major_shift<T>(L, x, B, part, K.data());
    }
    const int64_t items = block_items(L);
    at::parallel_for(0, B, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const auto [r0, r1] = block_range(items, B, k);
        if (L.channels_last) {
          nhwc_stats<T>(L, x, r0, r1, K.data(), part + 2 * k * C, part + (2 * k + 1) * C);
        } else {
          sample_major_stats<T>(L, x, r0, r1, K.data(), part + 2 * k * C, part + (2 * k + 1) * C);
        }
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      Welford<S> st{S(0), S(0), 0};
      for (int64_t k = 0; k < B; ++k) {
        welford_merge(st, Welford<S>{part[2 * k * C + c], part[(2 * k + 1) * C + c], block_count(L, B, k, c)});
      }
      st.mean = K[c] + st.mean;
      finish_stats(L, c, st, y ? cf.data() + c : nullptr, C);
    }
    if (y) {
      items_elem<false>(L, B, cf.data());
    }
  }

  static void elemt(const BatchNormCpuLaunch& L) {
    const int64_t C = L.C;
    std::vector<S> cf(kCoeffs<false> * C);
    for (int64_t c = 0; c < C; ++c) {
      put_fwd_coeffs(cf.data() + c, C,
                     batch_norm_fwd_coeffs(in(L.mean)[c], in(L.invstd)[c], L.weight ? in(L.weight)[c] : S(1),
                                           L.bias ? in(L.bias)[c] : S(0)));
    }
    elem_all<false, T>(L, cf.data());
  }

  // Channel c's sums written out; its dx coefficients into cf (stride apart) when cf.
  static void finish_grad(const BatchNormCpuLaunch& L, int64_t c, S sum_dy, S sum_dy_xmu, S* cf, int64_t stride) {
    if (L.sum_dy) {
      outp(L.sum_dy)[c] = sum_dy;
      outp(L.sum_dy_xmu)[c] = sum_dy_xmu;
      if (L.grad_weight) {
        outp(L.grad_weight)[c] = sum_dy_xmu * in(L.invstd)[c];
      }
    }
    if (cf) {
      const S invstd = in(L.invstd)[c];
      const S w = L.weight ? in(L.weight)[c] : S(1);
      S mean_dy = 0, mean_dy_xmu = 0;
      bool training = L.training;
      if (L.mean_dy) {
        mean_dy = in(L.mean_dy)[c];
        mean_dy_xmu = in(L.mean_dy_xmu)[c];
        training = true;
      } else if (training) {
        const S count = static_cast<S>(L.N * L.S);
        mean_dy = sum_dy / count;
        mean_dy_xmu = sum_dy_xmu / count;
      }
      put_bwd_coeffs(cf, stride, batch_norm_bwd_coeffs(in(L.mean)[c], invstd, w, mean_dy, mean_dy_xmu, training));
    }
  }

  static void bwd(const BatchNormCpuLaunch& L) {
    const int64_t C = L.C, count = L.N * L.S, B = L.blocks;
    const T* x = static_cast<const T*>(L.x);
    const T* dy = static_cast<const T*>(L.dy);
    const S* mean = in(L.mean);
    const bool dx = L.out != nullptr;
    S* part = static_cast<S*>(L.partial);
    std::vector<S> cf(dx ? kCoeffs<true> * C : 0);
    if (!L.sum_dy) {
      for (int64_t c = 0; c < C; ++c) {
        finish_grad(L, c, S(0), S(0), cf.data() + c, C);
      }
      elem_all<true, T>(L, cf.data());
      return;
    }
    if (!L.channels_last && !L.sample_major) {
      if (B == 1) {
        // note [batch norm cache reuse]: a channel's sums, then its dx.
        const int64_t grain = std::max<int64_t>(1, kBatchNormCpuGrain / count);
        at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            S r[2], k[kCoeffs<true>];
            nchw_grad_sums<T>(L, x, dy, c, 0, count, mean[c], r);
            finish_grad(L, c, r[0], r[1], dx ? k : nullptr, 1);
            if (dx) {
              nchw_elem<true, T>(L, c, 0, count, k, 1);
            }
          }
          stream_fence();
        });
        return;
      }
      at::parallel_for(0, C * B, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const auto [f0, f1] = block_range(count, B, i % B);
          S r[2];
          nchw_grad_sums<T>(L, x, dy, i / B, f0, f1, mean[i / B], r);
          part[2 * i] = r[0];
          part[2 * i + 1] = r[1];
        }
      });
      for (int64_t c = 0; c < C; ++c) {
        S s0 = 0, s1 = 0;
        for (int64_t k = 0; k < B; ++k) {
          s0 += part[2 * (c * B + k)];
          s1 += part[2 * (c * B + k) + 1];
        }
        finish_grad(L, c, s0, s1, dx ? cf.data() + c : nullptr, C);
      }
      if (dx) {
        at::parallel_for(0, C * B, 1, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const auto [f0, f1] = block_range(count, B, i % B);
            nchw_elem<true, T>(L, i / B, f0, f1, cf.data() + i / B, C);
          }
          stream_fence();
        });
      }
      return;
    }
    // Channels-last and NCHW sample-major: block k's sums in part[k][0][:], part[k][1][:].
    const int64_t items = block_items(L);
    at::parallel_for(0, B, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const auto [r0, r1] = block_range(items, B, k);
        if (L.channels_last) {
          nhwc_grad_sums<T>(L, x, dy, r0, r1, mean, part + 2 * k * C, part + (2 * k + 1) * C);
        } else {
          sample_major_grad_sums<T>(L, x, dy, r0, r1, mean, part + 2 * k * C, part + (2 * k + 1) * C);
        }
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      S s0 = 0, s1 = 0;
      for (int64_t k = 0; k < B; ++k) {
        s0 += part[2 * k * C + c];
        s1 += part[(2 * k + 1) * C + c];
      }
      finish_grad(L, c, s0, s1, dx ? cf.data() + c : nullptr, C);
    }
    if (dx) {
      items_elem<true>(L, B, cf.data());
    }
  }
};

template <template <typename> class KS, typename F>
void dispatch(const BatchNormCpuLaunch& L, F f) {
  switch (L.dtype) {
    case c10::ScalarType::Float: return f(KS<float>());
    case c10::ScalarType::Double: return f(KS<double>());
    case c10::ScalarType::Half: return f(KS<c10::Half>());
    case c10::ScalarType::BFloat16: return f(KS<c10::BFloat16>());
    default: TORCH_INTERNAL_ASSERT(false, "batch norm cpu kernel: unexpected dtype ", L.dtype);
  }
}

}  // namespace

void batch_norm_stats_kernel(const BatchNormCpuLaunch& L) {
  dispatch<Kernels>(L, [&](auto k) { decltype(k)::stats(L); });
}

void batch_norm_elemt_kernel(const BatchNormCpuLaunch& L) {
  dispatch<Kernels>(L, [&](auto k) { decltype(k)::elemt(L); });
}

void batch_norm_bwd_kernel(const BatchNormCpuLaunch& L) {
  dispatch<Kernels>(L, [&](auto k) { decltype(k)::bwd(L); });
}

}  // namespace pyoptim::cpu::CPU_CAPABILITY
