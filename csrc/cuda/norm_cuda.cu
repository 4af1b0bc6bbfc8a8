// layer_norm_fwd/_bwd and rms_norm_fwd/_bwd on CUDA tensors.
//
// A row of N elements is served by THREADS threads: one warp (several rows
// per block) for short rows, 128 or 512 threads (one row per block) for
// longer ones. Each thread holds ITEMS 16-byte vectors of the row in
// registers, so the statistics and the normalize (or the backward's two sums
// and dx) come from one read of the row. Rows longer than 512 threads' worth
// of registers (ITEMS = 0) stream: Welford statistics per thread, merged per
// block, then a second read (from L2) to normalize; the backward reads twice.
// The per-row math is csrc/include/pyoptim/layer_norm.h, the code the CPU tests run.
//
// note [deterministic weight grads]: the backward runs a fixed grid (a few
// blocks per SM) that strides over the rows; each row slot of a block sums
// dy * xhat and dy over its rows into its own row of a [P, 2, N] partials
// buffer (in registers, or in place in global memory when streaming), then a
// second kernel adds the P rows column by column in a fixed order. No
// atomics: the same bits on every run of the same shapes on the same GPU.
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <pyoptim/layer_norm.h>

#include "../norm_host.h"
#include "sm_count.cuh"
#include "vec.cuh"

namespace pyoptim::cuda {

namespace {

constexpr int kWarp = 32;
// Rows per block of the warp-per-row configuration: 4 warps, 128 threads.
constexpr int kWarpRows = 4;
// Vectors per thread held in registers: 4 x 16 bytes of x (and of dy in the
// backward), with the backward's dw/db accumulators, stays under ~128
// registers for 16-bit types (8 elements per vector).
constexpr int kItems = 4;
// Threads per row of the streaming configuration, and its blocks' size.
constexpr int kStreamThreads = 512;
// Threads per SM the backward's grid aims at (half an H100 SM's 2048): enough
// to keep loads in flight, few enough blocks to keep the partials small.
constexpr int kBwdThreadsPerSm = 1024;

// K elements of U from p + e0 into S registers; zeros past N. `vec` (N % K
// == 0 and every pointer aligned) allows one K-wide access.
template <typename S, int K, typename U>
__device__ __forceinline__ void load_k(const U* __restrict__ p, int64_t e0, int64_t N, bool vec, S (&out)[K]) {
  if (vec) {
    if (e0 < N) {
      const AlignedVec<U, K> v = *reinterpret_cast<const AlignedVec<U, K>*>(p + e0);
#pragma unroll
      for (int k = 0; k < K; ++k) out[k] = static_cast<S>(v.val[k]);
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) out[k] = S(0);
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = e0 + k < N ? static_cast<S>(p[e0 + k]) : S(0);
  }
}

template <typename S, int K, typename U>
__device__ __forceinline__ void store_k(U* __restrict__ p, int64_t e0, int64_t N, bool vec, const S (&in)[K]) {
  if (vec) {
    if (e0 < N) {
      AlignedVec<U, K> v;
#pragma unroll
      for (int k = 0; k < K; ++k) v.val[k] = static_cast<U>(in[k]);
      *reinterpret_cast<AlignedVec<U, K>*>(p + e0) = v;
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (e0 + k < N) p[e0 + k] = static_cast<U>(in[k]);
    }
  }
}

// Sum over the THREADS threads of a row; every thread gets the same bits
// (xor butterflies add the same pairs on every lane; the per-warp partials
// are added in warp order). `smem` holds THREADS / 32 values per row slot.
template <int THREADS, typename S>
__device__ __forceinline__ S row_sum(S v, S* smem) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if constexpr (THREADS == kWarp) {
    return v;
  } else {
    constexpr int kWarps = THREADS / kWarp;
    __syncthreads();  // smem may still be read from the previous sum
    if (threadIdx.x % kWarp == 0) smem[threadIdx.x / kWarp] = v;
    __syncthreads();
    S total = smem[0];
#pragma unroll
    for (int i = 1; i < kWarps; ++i) total += smem[i];
    return total;
  }
}

// Welford states merged over the block's threads (streaming rows; one row
// per block). Tree order, then broadcast, so every thread gets the same bits.
template <int THREADS, typename S>
__device__ __forceinline__ WelfordState<S> row_welford(WelfordState<S> w, WelfordState<S>* smem) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
    WelfordState<S> other;
    other.mean = __shfl_down_sync(0xffffffffu, w.mean, o);
    other.m2 = __shfl_down_sync(0xffffffffu, w.m2, o);
    other.count = __shfl_down_sync(0xffffffffu, w.count, o);
    welford_merge(w, other);
  }
  constexpr int kWarps = THREADS / kWarp;
  if (threadIdx.x % kWarp == 0) smem[threadIdx.x / kWarp] = w;
  __syncthreads();
  WelfordState<S> total = smem[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) welford_merge(total, smem[i]);
  __syncthreads();
  return total;
}

// Elements of thread t's item i: [(i * THREADS + t) * K, + K).
template <int THREADS, int K>
__device__ __forceinline__ int64_t item_start(int i) {
  return (static_cast<int64_t>(i) * THREADS + threadIdx.x) * K;
}

struct NormFwdArgs {
  const void* x;     // [M, N]
  const void* w;     // [N] or null
  const void* b;     // [N] or null
  void* y;           // [M, N]
  void* mean;        // [M] S, or null (RMS)
  void* rstd;        // [M] S
  int64_t M, N;
  double eps;
  bool vec;
};

template <typename T, typename TW, bool RMS, int THREADS, int ITEMS, int ROWS>
__global__ void __launch_bounds__(THREADS* ROWS) norm_fwd_kernel(const NormFwdArgs a) {
  using S = at::opmath_type<T>;
  constexpr int K = vec_size<T>();
  __shared__ S smem[ROWS][THREADS / kWarp];
  __shared__ WelfordState<S> wsmem[ITEMS == 0 ? THREADS / kWarp : 1];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.y;
  // Whole blocks keep going past M (their threads take part in the sums'
  // __syncthreads); only their loads and stores are skipped.
  const bool live = row < a.M;
  const int64_t N = a.N;
  const T* x = static_cast<const T*>(a.x) + (live ? row : 0) * N;
  T* y = static_cast<T*>(a.y) + row * N;
  const TW* w = static_cast<const TW*>(a.w);
  const TW* b = static_cast<const TW*>(a.b);
  const S eps = static_cast<S>(a.eps);
  S mean = S(0), rstd;
  if constexpr (ITEMS > 0) {
    S v[ITEMS][K];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) load_k<S, K>(x, item_start<THREADS, K>(i), live ? N : 0, a.vec, v[i]);
    if (!RMS) {
      const S x0 = static_cast<S>(x[0]);  // note [shifted mean]: every thread reads the row's first element
      S s = S(0);
#pragma unroll
      for (int i = 0; i < ITEMS; ++i)
#pragma unroll
        for (int k = 0; k < K; ++k) s += item_start<THREADS, K>(i) + k < N ? v[i][k] - x0 : S(0);
      mean = norm_shifted_mean(x0, row_sum<THREADS>(s, smem[threadIdx.y]), N);
    }
    S s = S(0);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const S d = item_start<THREADS, K>(i) + k < N ? v[i][k] - mean : S(0);
        s += d * d;
      }
    rstd = norm_rstd(row_sum<THREADS>(s, smem[threadIdx.y]) / static_cast<S>(N), eps);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t e0 = item_start<THREADS, K>(i);
      S wv[K], bv[K];
      if (w) load_k<S, K>(w, e0, N, a.vec, wv);
      if (b) load_k<S, K>(b, e0, N, a.vec, bv);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        S o = norm_xhat<RMS>(v[i][k], mean, rstd);
        if (w) o = o * wv[k];
        if (b) o = o + bv[k];
        v[i][k] = o;
      }
      if (live) store_k<S, K>(y, e0, N, a.vec, v[i]);
    }
  } else {
    // Streaming: Welford over the thread's elements, merged per block.
    WelfordState<S> ws{S(0), S(0), S(0)};
    S sq = S(0);
    for (int64_t e0 = threadIdx.x * static_cast<int64_t>(K); e0 < N; e0 += static_cast<int64_t>(THREADS) * K) {
      S v[K];
      load_k<S, K>(x, e0, N, a.vec, v);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (e0 + k < N) {
          if (RMS) {
            sq += v[k] * v[k];
          } else {
            welford_push(ws, v[k]);
          }
        }
      }
    }
    if (RMS) {
      rstd = norm_rstd(row_sum<THREADS>(sq, smem[0]) / static_cast<S>(N), eps);
    } else {
      const WelfordState<S> total = row_welford<THREADS>(ws, wsmem);
      mean = total.mean;
      rstd = norm_rstd(total.m2 / static_cast<S>(N), eps);
    }
    for (int64_t e0 = threadIdx.x * static_cast<int64_t>(K); e0 < N; e0 += static_cast<int64_t>(THREADS) * K) {
      S v[K], wv[K], bv[K];
      load_k<S, K>(x, e0, N, a.vec, v);
      if (w) load_k<S, K>(w, e0, N, a.vec, wv);
      if (b) load_k<S, K>(b, e0, N, a.vec, bv);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        S o = norm_xhat<RMS>(v[k], mean, rstd);
        if (w) o = o * wv[k];
        if (b) o = o + bv[k];
        v[k] = o;
      }
      store_k<S, K>(y, e0, N, a.vec, v);
    }
  }
  if (live && threadIdx.x == 0) {
    if (!RMS) static_cast<S*>(a.mean)[row] = mean;
    static_cast<S*>(a.rstd)[row] = rstd;
  }
}

struct NormBwdArgs {
  const void* dy;    // [M, N]
  const void* x;     // [M, N]
  const void* w;     // [N] or null
  const void* mean;  // [M] S, or null (RMS)
  const void* rstd;  // [M] S
  void* dx;          // [M, N]
  void* partial;     // [P, 2, N] S (P = gridDim.x * ROWS), or null: no weight/bias grads
  int64_t M, N;
  bool vec;
};

template <typename T, typename TW, bool RMS, int THREADS, int ITEMS, int ROWS>
__global__ void __launch_bounds__(THREADS* ROWS) norm_bwd_kernel(const NormBwdArgs a) {
  using S = at::opmath_type<T>;
  constexpr int K = vec_size<T>();
  __shared__ S smem[ROWS][THREADS / kWarp];
  const int64_t N = a.N;
  const TW* w = static_cast<const TW*>(a.w);
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.y;  // partials row
  S* pdw = a.partial ? static_cast<S*>(a.partial) + slot * 2 * N : nullptr;
  S* pdb = pdw ? pdw + N : nullptr;
  const S inv_n = S(1) / static_cast<S>(N);
  // Rows of this slot: slot, slot + P, ...; every thread of a block runs the
  // same number of iterations (the sums' __syncthreads), rows past M idle.
  const int64_t stride = static_cast<int64_t>(gridDim.x) * ROWS;
  const int64_t iters = (a.M + stride - 1) / stride;
  if constexpr (ITEMS > 0) {
    S dw_acc[ITEMS][K], db_acc[ITEMS][K], wv[ITEMS][K];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (w) load_k<S, K>(w, item_start<THREADS, K>(i), N, a.vec, wv[i]);
#pragma unroll
      for (int k = 0; k < K; ++k) dw_acc[i][k] = db_acc[i][k] = S(0);
    }
    for (int64_t it = 0; it < iters; ++it) {
      const int64_t row = slot + it * stride;
      const bool live = row < a.M;
      const int64_t n_live = live ? N : 0;
      const T* x = static_cast<const T*>(a.x) + (live ? row : 0) * N;
      const T* dy = static_cast<const T*>(a.dy) + (live ? row : 0) * N;
      const S mean = RMS || !live ? S(0) : static_cast<const S*>(a.mean)[row];
      const S rstd = live ? static_cast<const S*>(a.rstd)[row] : S(0);
      S xh[ITEMS][K], g[ITEMS][K];
      S sg = S(0), sgx = S(0);
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int64_t e0 = item_start<THREADS, K>(i);
        load_k<S, K>(x, e0, n_live, a.vec, xh[i]);
        load_k<S, K>(dy, e0, n_live, a.vec, g[i]);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const bool in = e0 + k < n_live;
          xh[i][k] = in ? norm_xhat<RMS>(xh[i][k], mean, rstd) : S(0);
          dw_acc[i][k] += g[i][k] * xh[i][k];
          db_acc[i][k] += g[i][k];
          if (w) g[i][k] = g[i][k] * wv[i][k];
          sg += g[i][k];
          sgx += g[i][k] * xh[i][k];
        }
      }
      const S c1 = RMS ? S(0) : row_sum<THREADS>(sg, smem[threadIdx.y]) * inv_n;
      const S c2 = row_sum<THREADS>(sgx, smem[threadIdx.y]) * inv_n;
      if (live) {
        T* dx = static_cast<T*>(a.dx) + row * N;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
          for (int k = 0; k < K; ++k) g[i][k] = norm_dx<RMS>(g[i][k], xh[i][k], rstd, c1, c2);
          store_k<S, K>(dx, item_start<THREADS, K>(i), N, a.vec, g[i]);
        }
      }
    }
    if (pdw) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        store_k<S, K>(pdw, item_start<THREADS, K>(i), N, a.vec, dw_acc[i]);
        store_k<S, K>(pdb, item_start<THREADS, K>(i), N, a.vec, db_acc[i]);
      }
    }
  } else {
    // Streaming: pass 1 sums (and adds to this slot's own partials row, which
    // no other thread touches: each column belongs to one thread), pass 2 dx.
    const int64_t step = static_cast<int64_t>(THREADS) * K;
    for (int64_t it = 0; it < iters; ++it) {
      const int64_t row = slot + it * stride;
      const bool live = row < a.M;
      const int64_t n_live = live ? N : 0;
      const T* x = static_cast<const T*>(a.x) + (live ? row : 0) * N;
      const T* dy = static_cast<const T*>(a.dy) + (live ? row : 0) * N;
      const S mean = RMS || !live ? S(0) : static_cast<const S*>(a.mean)[row];
      const S rstd = live ? static_cast<const S*>(a.rstd)[row] : S(0);
      S sg = S(0), sgx = S(0);
      for (int64_t e0 = threadIdx.x * static_cast<int64_t>(K); e0 < n_live; e0 += step) {
        S xv[K], dv[K], wk[K];
        load_k<S, K>(x, e0, N, a.vec, xv);
        load_k<S, K>(dy, e0, N, a.vec, dv);
        if (w) load_k<S, K>(w, e0, N, a.vec, wk);
        S pw[K] = {}, pb[K] = {};
        if (pdw) {
          load_k<S, K>(pdw, e0, N, a.vec, pw);
          load_k<S, K>(pdb, e0, N, a.vec, pb);
        }
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const S xhat = e0 + k < N ? norm_xhat<RMS>(xv[k], mean, rstd) : S(0);
          pw[k] += dv[k] * xhat;
          pb[k] += dv[k];
          const S gk = w ? dv[k] * wk[k] : dv[k];
          sg += gk;
          sgx += gk * xhat;
        }
        if (pdw) {
          store_k<S, K>(pdw, e0, N, a.vec, pw);
          store_k<S, K>(pdb, e0, N, a.vec, pb);
        }
      }
      const S c1 = RMS ? S(0) : row_sum<THREADS>(sg, smem[0]) * inv_n;
      const S c2 = row_sum<THREADS>(sgx, smem[0]) * inv_n;
      T* dx = static_cast<T*>(a.dx) + (live ? row : 0) * N;
      for (int64_t e0 = threadIdx.x * static_cast<int64_t>(K); e0 < n_live; e0 += step) {
        S xv[K], dv[K], wk[K];
        load_k<S, K>(x, e0, N, a.vec, xv);
        load_k<S, K>(dy, e0, N, a.vec, dv);
        if (w) load_k<S, K>(w, e0, N, a.vec, wk);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const S gk = w ? dv[k] * wk[k] : dv[k];
          xv[k] = norm_dx<RMS>(gk, norm_xhat<RMS>(xv[k], mean, rstd), rstd, c1, c2);
        }
        store_k<S, K>(dx, e0, N, a.vec, xv);
      }
    }
  }
}

// out[which][j] = sum over p of partial[p][which][j], p in order (note
// [deterministic weight grads]). Block (32, 8): 32 columns, 8 row lanes.
template <typename S, typename TW>
__global__ void __launch_bounds__(256) reduce_partials_kernel(const S* __restrict__ partial, int64_t P, int64_t N,
                                                              TW* __restrict__ dw, TW* __restrict__ db) {
  __shared__ S smem[8][kWarp + 1];
  const int which = blockIdx.y;
  TW* out = which == 0 ? dw : db;
  if (out == nullptr) return;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  S s = S(0);
  if (j < N) {
    for (int64_t p = threadIdx.y; p < P; p += 8) s += partial[(p * 2 + which) * N + j];
  }
  smem[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < N) {
    S total = smem[0][threadIdx.x];
#pragma unroll
    for (int r = 1; r < 8; ++r) total += smem[r][threadIdx.x];
    out[j] = static_cast<TW>(total);
  }
}

// The launch configuration for rows of n elements of T: the smallest whose
// registers hold a row, else streaming. `items512` is the 512-thread
// configuration's vectors per thread (kBwdItems512 in the backward).
enum class Config { kWarp1, kBlock128, kBlock512, kStream };

template <typename T>
Config pick_config(int64_t n, int items512 = kItems) {
  constexpr int64_t K = vec_size<T>();
  if (n <= kWarp * kItems * K) return Config::kWarp1;
  if (n <= 128 * kItems * K) return Config::kBlock128;
  if (n <= 512 * items512 * K) return Config::kBlock512;
  return Config::kStream;
}

// The backward holds five arrays per vector slot (xhat, g, w, and the dw/db
// sums); at 512 threads (128 registers each) four 16-byte vectors of a 16-bit
// type spill ~1 KB per thread (ptxas -v), two do not.
template <typename T>
constexpr int bwd_items512() {
  return vec_size<T>() > 4 ? 2 : kItems;
}

// Whether p (or null) is aligned to `bytes`: the x/y/dy/dx vectors are 16
// bytes; a float weight's K elements beside 16-bit input are 32.
bool aligned(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename T, typename TW, bool RMS>
void launch_fwd(const NormFwdArgs& a, cudaStream_t stream) {
#define PYOPTIM_FWD(THREADS, ITEMS, ROWS)                                                              \
  norm_fwd_kernel<T, TW, RMS, THREADS, ITEMS, ROWS>                                                    \
      <<<static_cast<unsigned int>((a.M + (ROWS)-1) / (ROWS)), dim3(THREADS, ROWS), 0, stream>>>(a)
  switch (pick_config<T>(a.N)) {
    case Config::kWarp1: PYOPTIM_FWD(kWarp, kItems, kWarpRows); break;
    case Config::kBlock128: PYOPTIM_FWD(128, kItems, 1); break;
    case Config::kBlock512: PYOPTIM_FWD(512, kItems, 1); break;
    case Config::kStream: PYOPTIM_FWD(kStreamThreads, 0, 1); break;
  }
#undef PYOPTIM_FWD
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the backward; returns P, the partials rows it fills.
template <typename T, typename TW, bool RMS>
int64_t launch_bwd(NormBwdArgs a, const at::Tensor& input, bool partials, at::Tensor& partial,
                   cudaStream_t stream) {
  auto run = [&](auto threads_c, auto items_c, auto rows_c) -> int64_t {
    constexpr int THREADS = decltype(threads_c)::value, ITEMS = decltype(items_c)::value,
                  ROWS = decltype(rows_c)::value;
    const int64_t groups = (a.M + ROWS - 1) / ROWS;
    const int64_t per_sm = std::max(1, kBwdThreadsPerSm / (THREADS * ROWS));
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(groups, sm_count() * per_sm));
    const int64_t P = grid * ROWS;
    if (partials) {
      // Streaming accumulates into the partials in place: they start at 0.
      const auto opts = input.options().dtype(norm_stat_dtype(input.scalar_type()));
      partial = ITEMS == 0 ? at::zeros({P, 2, a.N}, opts) : at::empty({P, 2, a.N}, opts);
      a.partial = partial.data_ptr();
    }
    norm_bwd_kernel<T, TW, RMS, THREADS, ITEMS, ROWS>
        <<<static_cast<unsigned int>(grid), dim3(THREADS, ROWS), 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return P;
  };
  using I = std::integral_constant<int, 0>;
  switch (pick_config<T>(a.N, bwd_items512<T>())) {
    case Config::kWarp1:
      return run(std::integral_constant<int, kWarp>(), std::integral_constant<int, kItems>(),
                 std::integral_constant<int, kWarpRows>());
    case Config::kBlock128:
      return run(std::integral_constant<int, 128>(), std::integral_constant<int, kItems>(),
                 std::integral_constant<int, 1>());
    case Config::kBlock512:
      return run(std::integral_constant<int, 512>(), std::integral_constant<int, bwd_items512<T>()>(),
                 std::integral_constant<int, 1>());
    default:
      return run(std::integral_constant<int, kStreamThreads>(), I(), std::integral_constant<int, 1>());
  }
}

// Calls f(T(), TW(), RMS) for the input's and weight's dtypes: TW is T, or
// float beside half/bfloat16 input.
template <typename F>
void dispatch(at::ScalarType dtype, at::ScalarType wdtype, bool rms, F f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "norm_cuda", [&] {
    auto with_tw = [&](auto tw) {
      rms ? f(scalar_t(), tw, std::true_type()) : f(scalar_t(), tw, std::false_type());
    };
    if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
      if (wdtype == at::kFloat) {
        return with_tw(float());
      }
    }
    with_tw(scalar_t());
  });
}

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_fwd(const char* op, bool rms, const at::Tensor& input,
                                                        at::IntArrayRef normalized_shape,
                                                        const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& bias, double eps) {
  const NormDims d = check_norm_fwd_args(op, rms, input, normalized_shape, weight, bias, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor w = has(weight) ? weight->contiguous() : at::Tensor();
  const at::Tensor b = has(bias) ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  const auto stat_opts = input.options().dtype(norm_stat_dtype(input.scalar_type()));
  at::Tensor mean = rms ? at::Tensor() : at::empty(d.stat_shape, stat_opts);
  at::Tensor rstd = at::empty(d.stat_shape, stat_opts);
  if (d.M == 0 || d.N == 0) {
    return {out, mean, rstd};
  }
  NormFwdArgs a{x.const_data_ptr(), w.defined() ? w.const_data_ptr() : nullptr,
                b.defined() ? b.const_data_ptr() : nullptr, out.data_ptr(), rms ? nullptr : mean.data_ptr(),
                rstd.data_ptr(), d.M, d.N, eps, false};
  const int64_t k = 16 / static_cast<int64_t>(input.element_size());
  const int64_t wbytes = k * static_cast<int64_t>(c10::elementSize(norm_weight_dtype(input, weight, bias)));
  a.vec = d.N % k == 0 && aligned(a.x, 16) && aligned(a.y, 16) && aligned(a.w, wbytes) && aligned(a.b, wbytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(input.scalar_type(), norm_weight_dtype(input, weight, bias), rms, [&](auto t, auto tw, auto r) {
    launch_fwd<decltype(t), decltype(tw), decltype(r)::value>(a, stream);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(const char* op, bool rms, const at::Tensor& grad_out,
                                                        const at::Tensor& input, at::IntArrayRef normalized_shape,
                                                        const at::Tensor& mean, const at::Tensor& rstd,
                                                        const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& bias, bool want_dx,
                                                        bool want_dw, bool want_db) {
  const NormDims d = check_norm_bwd_args(op, rms, grad_out, input, normalized_shape, mean, rstd, weight, bias,
                                         c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(input.device());
  want_dw = want_dw && has(weight);
  want_db = want_db && has(bias);
  const at::ScalarType wdt = norm_weight_dtype(input, weight, bias);
  const auto empty = [&] { return at::empty({0}, input.options()); };
  at::Tensor dx = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dw = want_dw ? at::empty(normalized_shape, input.options().dtype(wdt)) : empty();
  at::Tensor db = want_db ? at::empty(normalized_shape, input.options().dtype(wdt)) : empty();
  if (d.M == 0 || d.N == 0) {
    if (want_dw) dw.zero_();
    if (want_db) db.zero_();
    return {want_dx ? dx : empty(), dw, db};
  }
  const at::Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const at::Tensor w = has(weight) ? weight->contiguous() : at::Tensor();
  const at::Tensor mean_c = rms ? at::Tensor() : mean.contiguous(), rstd_c = rstd.contiguous();
  NormBwdArgs a{dy.const_data_ptr(), x.const_data_ptr(), w.defined() ? w.const_data_ptr() : nullptr,
                rms ? nullptr : mean_c.const_data_ptr(), rstd_c.const_data_ptr(), dx.data_ptr(), nullptr,
                d.M, d.N, false};
  const int64_t k = 16 / static_cast<int64_t>(input.element_size());
  const int64_t wbytes = k * static_cast<int64_t>(c10::elementSize(wdt));
  a.vec = d.N % k == 0 && aligned(a.x, 16) && aligned(a.dy, 16) && aligned(a.dx, 16) && aligned(a.w, wbytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool partials = want_dw || want_db;
  dispatch(input.scalar_type(), wdt, rms, [&](auto t, auto tw, auto r) {
    using T = decltype(t);
    using TW = decltype(tw);
    at::Tensor partial;
    const int64_t P = launch_bwd<T, TW, decltype(r)::value>(a, input, partials, partial, stream);
    if (partials) {
      const dim3 grid(static_cast<unsigned int>((d.N + kWarp - 1) / kWarp), 2);
      using S = at::opmath_type<T>;
      reduce_partials_kernel<S, TW><<<grid, dim3(kWarp, 8), 0, stream>>>(
          partial.const_data_ptr<S>(), P, d.N, want_dw ? static_cast<TW*>(dw.data_ptr()) : nullptr,
          want_db ? static_cast<TW*>(db.data_ptr()) : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {want_dx ? dx : empty(), dw, db};
}

}  // namespace

using NormOpsCUDA = NormOps<norm_fwd, norm_bwd>;

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  using Ops = pyoptim::cuda::NormOpsCUDA;
  m.impl("layer_norm_fwd", &Ops::layer_norm_fwd);
  m.impl("layer_norm_bwd", &Ops::layer_norm_bwd);
  m.impl("rms_norm_fwd", &Ops::rms_norm_fwd);
  m.impl("rms_norm_bwd", &Ops::rms_norm_bwd);
}
