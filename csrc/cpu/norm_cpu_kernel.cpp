// The CPU LayerNorm/RMSNorm kernels. setup.py builds this file once per
// instruction set (see adam_cpu_kernel.cpp); norm_cpu.cpp calls the one the
// running CPU supports. The per-row math is csrc/include/pyoptim/layer_norm.h, run
// on at::vec::Vectorized for whole vectors and on scalars for a row's tail.
//
// A row is read from L1/L2 several times (statistics, then normalize; in the
// backward the two sums, then dx): rows of up to 64K fp32 elements fit in L2,
// so DRAM sees each byte once.
#include <algorithm>
#include <type_traits>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <pyoptim/layer_norm.h>

#include "norm_cpu.h"
#include "vec_io.h"
#include "vec_math.h"

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace pyoptim::cpu::CPU_CAPABILITY {

namespace {

// Steps per inner sum of row_sum and the backward's sums: each lane adds at
// most 64 terms before they join the row's total, so the rounding error grows
// with 64 + N / 64 terms rather than N (torch's cascade sum does alike).
constexpr int64_t kSumSteps = 64;

// Independent accumulators per sum: an add's latency is 4 cycles, so one
// chain would hold a row's sum to a quarter of the adder's throughput.
constexpr int kAccs = 4;

// How far ahead of its reads the forward's normalize pass prefetches, in
// elements of T (note [row prefetch]): a row, but at least 8 KB, and at most a
// quarter of L2 (256 KB), so that this row and the next share L2 with room to spare.
constexpr int64_t kRowPrefetchMinBytes = 8192;
constexpr int64_t kRowPrefetchMaxBytes = int64_t(256) << 10;

template <typename T>
PYOPTIM_INLINE int64_t row_prefetch_distance(int64_t N) {
  constexpr int64_t size = static_cast<int64_t>(sizeof(T));
  return std::clamp<int64_t>(N, kRowPrefetchMinBytes / size, kRowPrefetchMaxBytes / size);
}

// sum(f(x)) over one row; f is a generic callable run on vectors and scalars.
template <typename T, typename F>
PYOPTIM_INLINE at::opmath_type<T> row_sum(const T* x, int64_t N, F f) {
  using L = Lanes<T>;
  using V = typename L::V;
  V total(0);
  int64_t j = 0;
  while (j + L::K <= N) {
    V acc[kAccs];
    for (int u = 0; u < kAccs; ++u) {
      acc[u] = V(0);
    }
    const int64_t end = std::min(N, j + kSumSteps * L::K);  // this inner sum's elements
    for (; j + kAccs * L::K <= end; j += kAccs * L::K) {
      for (int u = 0; u < kAccs; ++u) {
        V xv[L::P];
        load<L::P>(x + j + u * L::K, xv);
        for (int k = 0; k < L::P; ++k) {
          acc[u] = acc[u] + f(xv[k]);
        }
      }
    }
    for (; j + L::K <= end; j += L::K) {
      V xv[L::P];
      load<L::P>(x + j, xv);
      for (int k = 0; k < L::P; ++k) {
        acc[0] = acc[0] + f(xv[k]);
      }
    }
    total = total + ((acc[0] + acc[1]) + (acc[2] + acc[3]));
  }
  typename L::S s = lane_sum(total);
  for (; j < N; ++j) {
    s += f(static_cast<typename L::S>(x[j]));
  }
  return s;
}

template <typename T, typename TW, bool RMS>
void fwd_rows(const NormCpuLaunch& L, int64_t r0, int64_t r1) {
  using Ln = Lanes<T>;
  using S = typename Ln::S;
  using V = typename Ln::V;
  constexpr int P = Ln::P;
  const int64_t N = L.N;
  const TW* w = static_cast<const TW*>(L.w);
  const TW* b = static_cast<const TW*>(L.b);
  const S eps = static_cast<S>(L.eps);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(L.x) + r * N;
    T* y = static_cast<T*>(L.out) + r * N;
    S mean = 0;
    if (!RMS) {
      const S x0 = static_cast<S>(x[0]);  // note [shifted mean]
      mean = norm_shifted_mean(x0, row_sum(x, N, [x0](auto v) { return v - decltype(v)(x0); }), N);
    }
    const S var = row_sum(x, N, [mean](auto v) {
                    const auto d = RMS ? v : v - decltype(v)(mean);
                    return d * d;
                  }) / static_cast<S>(N);
    const S rstd = norm_rstd(var, eps);
    if (!RMS) {
      static_cast<S*>(L.mean)[r] = mean;
    }
    static_cast<S*>(L.rstd)[r] = rstd;
    // y = xhat * w + b
    const V mean_v(mean), rstd_v(rstd);
    const bool nt = can_stream(L.stream_out, y);
    // note [row prefetch]: rows are read from DRAM once (the first sum), then
    // from L1; while this row is normalized nothing else is in flight, and
    // the hardware prefetcher (which stops at 4 KB pages: a 1024-float row is
    // one) restarts on every row. So the normalize pass asks for the line
    // row_prefetch_distance ahead of each one it reads, up to the end of this
    // task's rows: for short rows 8 KB (two 1024-float rows), for long ones
    // the next row's line at the same offset, so that the next row's first
    // pass reads from L2. Against the next row's lines for every row (the
    // first version), AMD EPYC, 2 cores: 8192 x 1024 70-73 GB/s instead of
    // 63-65 and 16384 x 768 82-85 instead of 72-74 (in-place bandwidth about
    // 105 GB/s; 16 KB did no better than 8); 4096 x 4096 48-49 instead of
    // 42-43 and 256 x 65536 48-49 instead of 42 (in-place about 65 GB/s). The
    // same in the backward's dx pass (x and dy) was as often slower as faster.
    const T* ahead = x + row_prefetch_distance<T>(N);
    const T* rows_end = static_cast<const T*>(L.x) + r1 * N;
    int64_t j = 0;
    for (; j + Ln::K <= N; j += Ln::K) {
      V xv[P], wv[P], bv[P];
      if (ahead + j < rows_end) {
        __builtin_prefetch(ahead + j, 0, 3);
      }
      load<P>(x + j, xv);
      if (w) {
        load<P>(w + j, wv);
      }
      if (b) {
        load<P>(b + j, bv);
      }
      for (int k = 0; k < P; ++k) {
        xv[k] = norm_xhat<RMS>(xv[k], mean_v, rstd_v);
        if (w) {
          xv[k] = xv[k] * wv[k];
        }
        if (b) {
          xv[k] = xv[k] + bv[k];
        }
      }
      store_out<P>(y + j, xv, nt);
    }
    for (; j < N; ++j) {
      S v = norm_xhat<RMS>(static_cast<S>(x[j]), mean, rstd);
      if (w) {
        v = v * static_cast<S>(w[j]);
      }
      if (b) {
        v = v + static_cast<S>(b[j]);
      }
      y[j] = static_cast<T>(v);
    }
  }
}

// One block of rows of the backward: dx for each row, and the block's
// partial sums of dy * xhat and dy (note [deterministic weight grads]).
template <typename T, typename TW, bool RMS>
void bwd_block(const NormCpuLaunch& L, int64_t blk) {
  using Ln = Lanes<T>;
  using S = typename Ln::S;
  using V = typename Ln::V;
  constexpr int P = Ln::P;
  const int64_t M = L.M, N = L.N;
  const int64_t r0 = blk * M / L.blocks, r1 = (blk + 1) * M / L.blocks;
  const TW* w = static_cast<const TW*>(L.w);
  S* pdw = L.dw ? static_cast<S*>(L.partial) + blk * 2 * N : nullptr;
  S* pdb = L.db ? static_cast<S*>(L.partial) + blk * 2 * N + N : nullptr;
  if (pdw) {
    std::fill(pdw, pdw + N, S(0));
  }
  if (pdb) {
    std::fill(pdb, pdb + N, S(0));
  }
  const S inv_n = S(1) / static_cast<S>(N);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(L.x) + r * N;
    const T* dy = static_cast<const T*>(L.dy) + r * N;
    T* dx = static_cast<T*>(L.out) + r * N;
    const S mean = RMS ? S(0) : static_cast<const S*>(L.mean)[r];
    const S rstd = static_cast<const S*>(L.rstd)[r];
    const V mean_v(mean), rstd_v(rstd);

    // Pass 1: sum(g), sum(g * xhat), and the partial weight/bias grads.
    // Two accumulator pairs (see kAccs), each of inner sums of kSumSteps.
    V sg(0), sgx(0), sg_in[2] = {V(0), V(0)}, sgx_in[2] = {V(0), V(0)};
    auto pass1 = [&](int64_t j, V& sg_acc, V& sgx_acc) {
      V xv[P], gv[P], wv[P];
      load<P>(x + j, xv);
      load<P>(dy + j, gv);
      if (w) {
        load<P>(w + j, wv);
      }
      for (int k = 0; k < P; ++k) {
        const V xhat = norm_xhat<RMS>(xv[k], mean_v, rstd_v);
        const int64_t jk = j + k * V::size();
        if (pdw) {
          (V::loadu(pdw + jk) + gv[k] * xhat).store(pdw + jk);
        }
        if (pdb) {
          (V::loadu(pdb + jk) + gv[k]).store(pdb + jk);
        }
        const V g = w ? gv[k] * wv[k] : gv[k];
        sg_acc = sg_acc + g;
        sgx_acc = sgx_acc + g * xhat;
      }
    };
    int64_t j = 0;
    for (int64_t step = 1; j + 2 * Ln::K <= N; j += 2 * Ln::K, ++step) {
      if (step % (kSumSteps / 2) == 0) {
        sg = sg + (sg_in[0] + sg_in[1]);
        sgx = sgx + (sgx_in[0] + sgx_in[1]);
        sg_in[0] = sg_in[1] = sgx_in[0] = sgx_in[1] = V(0);
      }
      pass1(j, sg_in[0], sgx_in[0]);
      pass1(j + Ln::K, sg_in[1], sgx_in[1]);
    }
    if (j + Ln::K <= N) {
      pass1(j, sg_in[0], sgx_in[0]);
      j += Ln::K;
    }
    sg = sg + (sg_in[0] + sg_in[1]);
    sgx = sgx + (sgx_in[0] + sgx_in[1]);
    S sg_s = lane_sum(sg), sgx_s = lane_sum(sgx);
    for (int64_t t = j; t < N; ++t) {
      const S xhat = norm_xhat<RMS>(static_cast<S>(x[t]), mean, rstd);
      const S d = static_cast<S>(dy[t]);
      if (pdw) {
        pdw[t] += d * xhat;
      }
      if (pdb) {
        pdb[t] += d;
      }
      const S g = w ? d * static_cast<S>(w[t]) : d;
      sg_s += g;
      sgx_s += g * xhat;
    }
    const S c1 = sg_s * inv_n, c2 = sgx_s * inv_n;
    const V c1_v(c1), c2_v(c2);

    // Pass 2: dx = rstd * (g - c1 - xhat * c2)
    const bool nt = can_stream(L.stream_out, dx);
    j = 0;
    for (; j + Ln::K <= N; j += Ln::K) {
      V xv[P], gv[P], wv[P];
      load<P>(x + j, xv);
      load<P>(dy + j, gv);
      if (w) {
        load<P>(w + j, wv);
      }
      for (int k = 0; k < P; ++k) {
        const V g = w ? gv[k] * wv[k] : gv[k];
        xv[k] = norm_dx<RMS>(g, norm_xhat<RMS>(xv[k], mean_v, rstd_v), rstd_v, c1_v, c2_v);
      }
      store_out<P>(dx + j, xv, nt);
    }
    for (; j < N; ++j) {
      const S d = static_cast<S>(dy[j]);
      const S g = w ? d * static_cast<S>(w[j]) : d;
      dx[j] = static_cast<T>(norm_dx<RMS>(g, norm_xhat<RMS>(static_cast<S>(x[j]), mean, rstd), rstd, c1, c2));
    }
  }
}

// dw[j] = sum over blocks k of partial[k][which][j], in block order.
template <typename S, typename TW>
void reduce_partials(const NormCpuLaunch& L, int which, TW* out) {
  const S* partial = static_cast<const S*>(L.partial);
  const int64_t N = L.N;
  at::parallel_for(0, N, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      S s = 0;
      for (int64_t k = 0; k < L.blocks; ++k) {
        s += partial[(k * 2 + which) * N + j];
      }
      out[j] = static_cast<TW>(s);
    }
  });
}

template <typename T, typename TW, bool RMS>
void fwd(const NormCpuLaunch& L) {
  const int64_t grain = std::max<int64_t>(1, kNormCpuGrain / std::max<int64_t>(L.N, 1));
  at::parallel_for(0, L.M, grain, [&](int64_t r0, int64_t r1) {
    fwd_rows<T, TW, RMS>(L, r0, r1);
    stream_fence();
  });
}

template <typename T, typename TW, bool RMS>
void bwd(const NormCpuLaunch& L) {
  using S = at::opmath_type<T>;
  at::parallel_for(0, L.blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      bwd_block<T, TW, RMS>(L, blk);
    }
    stream_fence();
  });
  if (L.dw) {
    reduce_partials<S>(L, 0, static_cast<TW*>(L.dw));
  }
  if (L.db) {
    reduce_partials<S>(L, 1, static_cast<TW*>(L.db));
  }
}

// Calls FN<T, TW, RMS>(L) for the launch's dtypes.
template <template <typename, typename, bool> class FN>
void dispatch(const NormCpuLaunch& L) {
  auto with_t = [&](auto t_tag) {
    using T = decltype(t_tag);
    const bool float_weight = !std::is_same_v<T, float> && !std::is_same_v<T, double> &&
                              L.wdtype == c10::ScalarType::Float;
    auto with_tw = [&](auto tw_tag) {
      using TW = decltype(tw_tag);
      L.rms ? FN<T, TW, true>::run(L) : FN<T, TW, false>::run(L);
    };
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      with_tw(T());
    } else {
      float_weight ? with_tw(float()) : with_tw(T());
    }
  };
  switch (L.dtype) {
    case c10::ScalarType::Float: return with_t(float());
    case c10::ScalarType::Double: return with_t(double());
    case c10::ScalarType::Half: return with_t(c10::Half());
    case c10::ScalarType::BFloat16: return with_t(c10::BFloat16());
    default: TORCH_INTERNAL_ASSERT(false, "norm cpu kernel: unexpected dtype ", L.dtype);
  }
}

template <typename T, typename TW, bool RMS>
struct Fwd {
  static void run(const NormCpuLaunch& L) { fwd<T, TW, RMS>(L); }
};

template <typename T, typename TW, bool RMS>
struct Bwd {
  static void run(const NormCpuLaunch& L) { bwd<T, TW, RMS>(L); }
};

}  // namespace

void norm_fwd_kernel(const NormCpuLaunch& L) { dispatch<Fwd>(L); }

void norm_bwd_kernel(const NormCpuLaunch& L) { dispatch<Bwd>(L); }

}  // namespace pyoptim::cpu::CPU_CAPABILITY
