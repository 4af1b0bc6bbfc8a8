// batch_norm_fwd/_bwd, batch_norm_stats/_elemt and batch_norm_backward_reduce/
// _elemt on CUDA tensors (schemas and semantics in csrc/ops.cpp).
//
// Every op is at most three kernels, each simple on its own:
//   1. a reduction over each channel's count = N * S elements into partial
//      states, a fixed number per channel (Welford states for the statistics,
//      (sum_dy, sum_dy_xmu) pairs for the backward); the input is read in its
//      own layout:
//        NCHW: block (c, split) reduces a rectangle of the channel's N rows of
//          S (a range of rows x a segment of each row); threads (x, y) walk
//          the segment along x (16-byte vector loads when S is a multiple of
//          the vector width and the pointers are aligned) and the rows along y;
//        channels-last: block (channel tile, row block) reduces a range of the
//          N * S rows of C; each thread owns K consecutive channels (K = the
//          vector width when C is a multiple of it, else 1), so a warp reads
//          along C, coalesced;
//      then a tree merge in shared memory, in a fixed order, and one partial
//      state per block, to a workspace ([C, splits] or [row blocks, C]);
//   2. a per-channel kernel (one thread per channel) that merges the partials
//      in split order and applies the per-channel math of
//      csrc/include/pyoptim/batch_norm.h: the saved statistics, the new
//      running statistics, grad_weight and grad_bias, and the coefficients of
//      the elementwise pass ([3, C] forward, [4, C] backward, math type);
//   3. an elementwise pass, flat over the tensor in K-vectors: channel
//      (i / S) % C for NCHW, i % C for channels-last, with magic-number
//      division (32-bit while numel <= INT32_MAX, else plain 64-bit).
// The per-element and per-channel formulas are batch_norm.h's and
// welford.h's, the code the CPU tests exercise; this file only moves data.
//
// note [batch norm determinism]: no atomics. Which elements a thread reduces,
// the order it reduces them in, the shared-memory merge tree and the order
// the partials are merged in depend only on the launch plan, and the plan
// (plan_batch_norm_reduce) only on (N, C, S, layout, vector width, SM count).
// So the same shapes on the same GPU model give the same bits on every run;
// a GPU with a different SM count may split the channels differently and
// round differently in the last bits.
//
// An (N, C) input (S == 1) is NCHW and channels-last at once (element (n, c)
// at n * C + c either way); it takes the channels-last kernels, whose loads
// run along C, instead of NCHW rows of one element.
#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <pyoptim/batch_norm.h>

#include "../batch_norm_host.h"
#include "../message.h"
#include "../norm_host.h"
#include "sm_count.cuh"
#include "vec.cuh"

namespace pyoptim::cuda {

namespace {

using at::cuda::detail::IntDivider;

// Threads per block of every kernel here. The reductions' shared-memory merge
// trees assume exactly this many threads, a power of two.
constexpr int kThreads = 256;
// The reductions' grid aims at this many blocks per SM (half of the 2048
// threads an SM of sm_80/sm_90 holds): enough loads in flight, and few
// enough partials that merging them costs nothing.
constexpr int64_t kBlocksPerSm = 4;
// A split gets at least this many loads per thread, so small inputs do not
// spread over more blocks than their work pays for.
constexpr int64_t kMinLoadsPerThread = 8;
// Channel-last reductions: at most 32 threads (one warp) side by side along C;
// the rest of the block goes down the rows.
constexpr int kClMaxThreadsX = 32;
// Vectors per thread of the elementwise kernels, all loaded before any math.
constexpr int kElemItems = 4;

// ---------------------------------------------------------------------------
// Launch plan (plain C++, host).

// How a reduction is split; see plan_batch_norm_reduce.
struct BatchNormReducePlan {
  int64_t splits;    // partial states per channel (channels-last: row blocks)
  int64_t rows_per;  // rows per split (NCHW: rows n of the channel; channels-last: rows of C)
  int64_t splits_s;  // NCHW: segments per row (split = row range * splits_s + segment)
  int64_t seg;       // NCHW: units per segment
  int64_t tiles;     // channels-last: channel tiles of bx * K channels
  int bx, by;        // block shape; bx * by == kThreads, both powers of two
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The least power of two >= x, at most cap (a power of two).
int pow2_at_least(int64_t x, int cap) {
  int p = 1;
  while (p < cap && p < x) {
    p *= 2;
  }
  return p;
}

// The launch plan of a reduction over each channel's N * S elements, read K
// at a time (K divides S for NCHW, C for channels-last), on a GPU of
// `sm_count` SMs. Deterministic in its inputs (note [batch norm determinism]);
// every split it makes is non-empty. N, C, S >= 1.
//   NCHW: a channel is N rows of L = S / K units. bx threads (a power of two
//     covering L, at most kThreads) walk a row, by = kThreads / bx rows at a
//     time. Splits per channel: enough to give the GPU kBlocksPerSm blocks
//     per SM, no more than kMinLoadsPerThread loads per thread allow; they cut
//     the rows first (at least by rows each), then, for rows longer than a
//     block, each row into segments (at least bx units each).
//   Channels-last: N * S rows of C / K units. bx threads (a power of two
//     covering the units, at most kClMaxThreadsX) take a tile of bx units,
//     by = kThreads / bx rows at a time; row blocks as many as the GPU wants,
//     as above, at most 65535 (the grid's y limit).
BatchNormReducePlan plan_batch_norm_reduce(int64_t N, int64_t C, int64_t S, bool channels_last, int64_t K,
                                           int64_t sm_count) {
  BatchNormReducePlan p{};
  const int64_t want_blocks = std::max<int64_t>(1, sm_count) * kBlocksPerSm;
  if (!channels_last) {
    const int64_t L = S / K;
    p.bx = pow2_at_least(L, kThreads);
    p.by = kThreads / p.bx;
    const int64_t fill = ceil_div(want_blocks, C);
    const int64_t work = N * L / (kThreads * kMinLoadsPerThread);
    const int64_t splits = std::max<int64_t>(1, std::min(fill, work));
    int64_t splits_n = std::min(splits, ceil_div(N, p.by));
    p.rows_per = ceil_div(N, splits_n);
    splits_n = ceil_div(N, p.rows_per);
    p.splits_s = std::max<int64_t>(1, std::min(splits / splits_n, ceil_div(L, p.bx)));
    p.seg = ceil_div(L, p.splits_s);
    p.splits_s = ceil_div(L, p.seg);
    p.splits = splits_n * p.splits_s;
    p.tiles = 0;
  } else {
    const int64_t units = C / K;
    const int64_t R = N * S;
    p.bx = pow2_at_least(units, kClMaxThreadsX);
    p.by = kThreads / p.bx;
    p.tiles = ceil_div(units, p.bx);
    const int64_t fill = ceil_div(want_blocks, p.tiles);
    const int64_t work = R / (p.by * kMinLoadsPerThread);
    const int64_t blocks = std::min<int64_t>(65535, std::max<int64_t>(1, std::min(fill, work)));
    p.rows_per = ceil_div(R, blocks);
    p.splits = ceil_div(R, p.rows_per);
    p.splits_s = 1;
    p.seg = 0;
  }
  return p;
}

// ---------------------------------------------------------------------------
// Device helpers.

// K elements at p (aligned to K elements: the host checks) into math type S.
template <int K, typename T, typename S>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, S (&out)[K]) {
  const AlignedVec<T, K> v = *reinterpret_cast<const AlignedVec<T, K>*>(p);
#pragma unroll
  for (int k = 0; k < K; ++k) out[k] = static_cast<S>(v.val[k]);
}

template <int K, typename T, typename S>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const S (&in)[K]) {
  AlignedVec<T, K> v;
#pragma unroll
  for (int k = 0; k < K; ++k) v.val[k] = static_cast<T>(in[k]);
  *reinterpret_cast<AlignedVec<T, K>*>(p) = v;
}

// A per-channel parameter or running statistic: [C] of the input's dtype T,
// or float (f32) beside half/bfloat16 input; p null when absent.
struct ParamIn {
  const void* p;
  bool f32;
};

struct ParamOut {
  void* p;
  bool f32;
};

template <typename T, typename S>
__device__ __forceinline__ S load_param(const ParamIn& q, int64_t c, S absent) {
  if (q.p == nullptr) {
    return absent;
  }
  return q.f32 ? static_cast<S>(static_cast<const float*>(q.p)[c]) : static_cast<S>(static_cast<const T*>(q.p)[c]);
}

template <typename T, typename S>
__device__ __forceinline__ void store_param(const ParamOut& q, int64_t c, S v) {
  if (q.f32) {
    static_cast<float*>(q.p)[c] = static_cast<float>(v);
  } else {
    static_cast<T*>(q.p)[c] = static_cast<T>(v);
  }
}

// The reductions' element source and accumulator. An Op has State (a plain
// aggregate: it lives in shared memory), Elem (what one element contributes),
// chan(c) (a per-channel constant), init(), load<K>(i, e) (the K elements at
// flat offset i), push(state, chan, elem) and merge(a, b).

// The statistics: Welford over x. Counts are int64_t: a channel's count can
// pass 2^24, where a float count stops being exact.
template <typename T>
struct WelfordOp {
  using S = at::opmath_type<T>;
  using State = WelfordState<S, int64_t>;
  using Elem = S;
  const T* x;  // the input, in its layout

  __device__ __forceinline__ S chan(int64_t) const { return S(0); }
  __device__ __forceinline__ static State init() { return State{S(0), S(0), 0}; }
  template <int K>
  __device__ __forceinline__ void load(int64_t i, Elem (&e)[K]) const {
    load_vec<K>(x + i, e);
  }
  __device__ __forceinline__ static void push(State& st, S, const Elem& e) { welford_push(st, e); }
  __device__ __forceinline__ static void merge(State& a, const State& b) { welford_merge(a, b); }
};

// The backward's reductions: sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)).
template <typename S>
struct BwdSums {
  S sum_dy;
  S sum_dy_xmu;
};

template <typename T>
struct BwdSumsOp {
  using S = at::opmath_type<T>;
  using State = BwdSums<S>;
  struct Elem {
    S dy;
    S x;
  };
  const T* dy;    // grad_out, in the input's layout
  const T* x;     // the input
  const S* mean;  // [C]

  __device__ __forceinline__ S chan(int64_t c) const { return mean[c]; }
  __device__ __forceinline__ static State init() { return State{S(0), S(0)}; }
  template <int K>
  __device__ __forceinline__ void load(int64_t i, Elem (&e)[K]) const {
    S g[K], v[K];
    load_vec<K>(dy + i, g);
    load_vec<K>(x + i, v);
#pragma unroll
    for (int k = 0; k < K; ++k) e[k] = Elem{g[k], v[k]};
  }
  __device__ __forceinline__ static void push(State& st, S mean, const Elem& e) {
    st.sum_dy += e.dy;
    st.sum_dy_xmu += e.dy * (e.x - mean);
  }
  __device__ __forceinline__ static void merge(State& a, const State& b) {
    a.sum_dy += b.sum_dy;
    a.sum_dy_xmu += b.sum_dy_xmu;
  }
};

// ---------------------------------------------------------------------------
// Kernel 1: the reductions.

struct ReduceArgs {
  int64_t N, C, S;
  int64_t splits;    // partials per channel (plan.splits)
  int64_t splits_s;  // NCHW: segments per row
  int64_t rows_per;  // rows per split
  int64_t seg;       // NCHW: units per segment
  void* partial;     // NCHW: [C, splits] Op::State; channels-last: [splits, C]
};

// NCHW. Grid: C * splits blocks, block (bx, by) = plan's; block b reduces
// channel c = b / splits, split = b % splits: rows n in [n0, n1) and units
// (K elements each) u in [u0, u1) of each row.
template <typename Op, int K>
__global__ void __launch_bounds__(kThreads) reduce_nchw_kernel(const ReduceArgs a, const Op op) {
  using State = typename Op::State;
  using Elem = typename Op::Elem;
  using S = typename Op::S;
  __shared__ State smem[kThreads];
  const int64_t c = blockIdx.x / a.splits;
  const int64_t split = blockIdx.x % a.splits;
  const int64_t n0 = (split / a.splits_s) * a.rows_per;
  const int64_t n1 = ::min(a.N, n0 + a.rows_per);
  const int64_t u0 = (split % a.splits_s) * a.seg;
  const int64_t u1 = ::min(a.S / K, u0 + a.seg);
  const S ch = op.chan(c);
  State st = Op::init();
  for (int64_t n = n0 + threadIdx.y; n < n1; n += blockDim.y) {
    const int64_t row = (n * a.C + c) * a.S;  // a multiple of K: K divides S
    for (int64_t u = u0 + threadIdx.x; u < u1; u += blockDim.x) {
      Elem e[K];
      op.template load<K>(row + u * K, e);
#pragma unroll
      for (int k = 0; k < K; ++k) Op::push(st, ch, e[k]);
    }
  }
  // Tree merge: in round o, threads t < o absorb t + o (disjoint slots).
  const int tid = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
  smem[tid] = st;
  __syncthreads();
#pragma unroll
  for (int o = kThreads / 2; o > 0; o /= 2) {
    if (tid < o) Op::merge(smem[tid], smem[tid + o]);
    __syncthreads();
  }
  if (tid == 0) static_cast<State*>(a.partial)[c * a.splits + split] = smem[0];
}

// Channels-last. Grid: (tiles, splits), block (bx, by) = plan's; thread
// (tx, ty) of block (t, r) owns channels [c0, c0 + K), c0 = (t * bx + tx) * K,
// and rows r0 + ty, r0 + ty + by, ... below r1. Threads past C idle (but
// take part in the merges' barriers).
template <typename Op, int K>
__global__ void __launch_bounds__(kThreads) reduce_cl_kernel(const ReduceArgs a, const Op op) {
  using State = typename Op::State;
  using Elem = typename Op::Elem;
  using S = typename Op::S;
  __shared__ State smem[kThreads];
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * K;
  const bool live = c0 < a.C;  // then c0 + K <= C: K divides C
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * a.rows_per;
  const int64_t r1 = ::min(a.N * a.S, r0 + a.rows_per);
  State st[K];
  S ch[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    st[k] = Op::init();
    ch[k] = live ? op.chan(c0 + k) : S(0);
  }
  if (live) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      Elem e[K];
      op.template load<K>(r * a.C + c0, e);
#pragma unroll
      for (int k = 0; k < K; ++k) Op::push(st[k], ch[k], e[k]);
    }
  }
  // Per channel of the thread: a tree over ty (round o: rows ty < o absorb
  // ty + o, disjoint slots), row 0 writes the block's partial.
  const int tid = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
  State* partial = static_cast<State*>(a.partial) + static_cast<int64_t>(blockIdx.y) * a.C;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    smem[tid] = st[k];
    __syncthreads();
    for (unsigned int o = blockDim.y / 2; o > 0; o /= 2) {
      if (threadIdx.y < o) Op::merge(smem[tid], smem[tid + o * blockDim.x]);
      __syncthreads();
    }
    if (threadIdx.y == 0 && live) partial[c0 + k] = smem[threadIdx.x];
    __syncthreads();  // row 0 has read smem before the next k overwrites it
  }
}

// ---------------------------------------------------------------------------
// Kernel 2: per channel. One thread per channel, grid ceil(C / kThreads).

enum class FwdMode : int {
  kTraining,  // Welford partials -> save_mean, save_invstd, new running stats
  kEval,      // running stats -> save_mean, save_invstd
  kStats,     // Welford partials -> mean, m2 (batch_norm_stats)
  kElemt,     // given mean, invstd (batch_norm_elemt)
};

struct FwdChannelArgs {
  FwdMode mode;
  int64_t C;
  const void* partial;  // WelfordState<S, int64_t>, channel c's k-th at c * stride_c + k * stride_k
  int64_t splits, stride_c, stride_k;
  ParamIn running_mean, running_var;           // kTraining (optional), kEval
  ParamOut new_running_mean, new_running_var;  // kTraining with running stats, else null
  const void* mean_in;                         // kElemt: [C] S
  const void* invstd_in;                       // kElemt: [C] S
  ParamIn weight, bias;
  double eps, momentum;
  void* mean_out;  // [C] S: save_mean (kTraining, kEval), mean (kStats); null for kElemt
  void* var_out;   // [C] S: save_invstd (kTraining, kEval), m2 (kStats); null for kElemt
  void* coef;      // [3, C] S: the elementwise pass's mean, scale, bias; or null
};

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_channel_kernel(const FwdChannelArgs a) {
  using S = at::opmath_type<T>;
  using State = WelfordState<S, int64_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.C) {
    return;
  }
  const S eps = static_cast<S>(a.eps);
  S mean, invstd;
  if (a.mode == FwdMode::kTraining || a.mode == FwdMode::kStats) {
    const State* p = static_cast<const State*>(a.partial) + c * a.stride_c;
    State w = p[0];
    for (int64_t k = 1; k < a.splits; ++k) welford_merge(w, p[k * a.stride_k]);
    if (a.mode == FwdMode::kStats) {
      static_cast<S*>(a.mean_out)[c] = w.mean;
      static_cast<S*>(a.var_out)[c] = w.m2;
      return;
    }
    mean = w.mean;
    invstd = batch_norm_invstd(batch_norm_biased_var(w), eps);
    if (a.new_running_mean.p != nullptr) {
      const S momentum = static_cast<S>(a.momentum);
      store_param<T>(a.new_running_mean, c,
                     batch_norm_running(load_param<T>(a.running_mean, c, S(0)), mean, momentum));
      store_param<T>(a.new_running_var, c,
                     batch_norm_running(load_param<T>(a.running_var, c, S(1)), batch_norm_unbiased_var(w), momentum));
    }
  } else if (a.mode == FwdMode::kEval) {
    mean = load_param<T>(a.running_mean, c, S(0));
    invstd = batch_norm_invstd(load_param<T>(a.running_var, c, S(1)), eps);
  } else {
    mean = static_cast<const S*>(a.mean_in)[c];
    invstd = static_cast<const S*>(a.invstd_in)[c];
  }
  if (a.mean_out != nullptr) {
    static_cast<S*>(a.mean_out)[c] = mean;
    static_cast<S*>(a.var_out)[c] = invstd;
  }
  if (a.coef != nullptr) {
    const BatchNormFwdCoeffs<S> k =
        batch_norm_fwd_coeffs(mean, invstd, load_param<T>(a.weight, c, S(1)), load_param<T>(a.bias, c, S(0)));
    S* coef = static_cast<S*>(a.coef);
    coef[c] = k.mean;
    coef[a.C + c] = k.scale;
    coef[2 * a.C + c] = k.bias;
  }
}

struct BwdChannelArgs {
  int64_t C;
  const void* partial;  // BwdSums<S>, as FwdChannelArgs::partial; or null: no reductions
  int64_t splits, stride_c, stride_k;
  int64_t count;              // elements per channel: mean_dy = sum_dy / count
  const void* mean;           // [C] S, or null (batch_norm_backward_reduce)
  const void* invstd;         // [C] S, or null (batch_norm_backward_reduce)
  ParamIn weight;
  const void* mean_dy_in;      // [C] S (batch_norm_backward_elemt), or null: from the sums
  const void* mean_dy_xmu_in;  // [C] S, likewise
  bool training;
  ParamOut grad_weight, grad_bias;  // or null
  void* sum_dy_out;                 // [C] S (batch_norm_backward_reduce), or null
  void* sum_dy_xmu_out;             // [C] S, likewise
  void* coef;                       // [4, C] S: mean, mean_dy, proj, scale; or null
};

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_channel_kernel(const BwdChannelArgs a) {
  using S = at::opmath_type<T>;
  using State = BwdSums<S>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.C) {
    return;
  }
  State sums{S(0), S(0)};
  if (a.partial != nullptr) {
    const State* p = static_cast<const State*>(a.partial) + c * a.stride_c;
    sums = p[0];
    for (int64_t k = 1; k < a.splits; ++k) {
      const State& b = p[k * a.stride_k];
      sums.sum_dy += b.sum_dy;
      sums.sum_dy_xmu += b.sum_dy_xmu;
    }
  }
  if (a.sum_dy_out != nullptr) {
    static_cast<S*>(a.sum_dy_out)[c] = sums.sum_dy;
    static_cast<S*>(a.sum_dy_xmu_out)[c] = sums.sum_dy_xmu;
  }
  const S invstd = a.invstd != nullptr ? static_cast<const S*>(a.invstd)[c] : S(0);
  // grad_weight = sum_dy_xmu * invstd, grad_bias = sum_dy (batch_norm.h).
  if (a.grad_weight.p != nullptr) store_param<T>(a.grad_weight, c, sums.sum_dy_xmu * invstd);
  if (a.grad_bias.p != nullptr) store_param<T>(a.grad_bias, c, sums.sum_dy);
  if (a.coef != nullptr) {
    S mean_dy, mean_dy_xmu;
    if (a.mean_dy_in != nullptr) {
      mean_dy = static_cast<const S*>(a.mean_dy_in)[c];
      mean_dy_xmu = static_cast<const S*>(a.mean_dy_xmu_in)[c];
    } else {
      mean_dy = sums.sum_dy / static_cast<S>(a.count);
      mean_dy_xmu = sums.sum_dy_xmu / static_cast<S>(a.count);
    }
    const BatchNormBwdCoeffs<S> k = batch_norm_bwd_coeffs(static_cast<const S*>(a.mean)[c], invstd,
                                                          load_param<T>(a.weight, c, S(1)), mean_dy, mean_dy_xmu,
                                                          a.training);
    S* coef = static_cast<S*>(a.coef);
    coef[c] = k.mean;
    coef[a.C + c] = k.mean_dy;
    coef[2 * a.C + c] = k.proj;
    coef[3 * a.C + c] = k.scale;
  }
}

// ---------------------------------------------------------------------------
// Kernel 3: elementwise.

struct ElemArgs {
  const void* x;     // [numel] T, in the layout
  const void* dy;    // [numel] T (backward), else null
  void* out;         // [numel] T: y, or dx; the same layout
  const void* coef;  // [3, C] S forward, [4, C] S backward
  int64_t C;
  int64_t nvec;  // numel / K
};

// Vector v (elements [v * K, v * K + K)) of the flat tensor; block b serves
// vectors b * kThreads * kElemItems + i * kThreads + threadIdx.x, i <
// kElemItems. Its channels:
//   NCHW: c = (v / (S / K)) % C for all K elements (K divides S: a vector
//     never crosses a row); `rows` divides by S / K, `chans` by C;
//   channels-last: c = (v % (C / K)) * K + k (K divides C); `chans` divides by
//     C / K, `rows` is unused.
// Index is uint32_t when numel <= INT32_MAX (IntDivider's magic-number range),
// else uint64_t (plain division).
template <typename T, int K, bool CL, bool BWD, typename Index>
__global__ void __launch_bounds__(kThreads)
    elem_kernel(const ElemArgs a, const IntDivider<Index> rows, const IntDivider<Index> chans) {
  using S = at::opmath_type<T>;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  T* __restrict__ out = static_cast<T*>(a.out);
  const S* __restrict__ coef = static_cast<const S*>(a.coef);
  const int64_t C = a.C;
  const Index base = static_cast<Index>(blockIdx.x) * static_cast<Index>(kThreads * kElemItems) + threadIdx.x;
  S xv[kElemItems][K];
  [[maybe_unused]] S gv[BWD ? kElemItems : 1][K];
#pragma unroll
  for (int i = 0; i < kElemItems; ++i) {
    const Index v = base + static_cast<Index>(i * kThreads);
    if (static_cast<int64_t>(v) < a.nvec) {
      load_vec<K>(x + static_cast<int64_t>(v) * K, xv[i]);
      if constexpr (BWD) load_vec<K>(dy + static_cast<int64_t>(v) * K, gv[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kElemItems; ++i) {
    const Index v = base + static_cast<Index>(i * kThreads);
    if (static_cast<int64_t>(v) < a.nvec) {
      const int64_t c0 =
          CL ? static_cast<int64_t>(chans.mod(v)) * K : static_cast<int64_t>(chans.mod(rows.div(v)));
      S o[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t c = CL ? c0 + k : c0;
        if constexpr (BWD) {
          o[k] = batch_norm_bwd_elem(gv[i][k], xv[i][k], coef[c], coef[C + c], coef[2 * C + c], coef[3 * C + c]);
        } else {
          o[k] = batch_norm_fwd_elem(xv[i][k], coef[c], coef[C + c], coef[2 * C + c]);
        }
      }
      store_vec<K>(out + static_cast<int64_t>(v) * K, o);
    }
  }
}

// ---------------------------------------------------------------------------
// Host launchers.

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// An input as the kernels read it: the tensor in its layout, its dims, and
// which kernels (cl: channels-last; also for S == 1, see the top).
struct Layout {
  at::Tensor x;
  BatchNormDims d;
  bool cl;
};

Layout layout_of(const at::Tensor& input) {
  auto [x, d] = batch_norm_layout(input);
  return {x, d, d.channels_last || d.S == 1};
}

// Whether K-vectors of the input's vector width serve this layout: K divides
// the inner dim (S for NCHW, C for channels-last) and every big tensor's data
// is 16-byte aligned.
bool use_vec(const Layout& l, std::initializer_list<const void*> ptrs) {
  const int64_t k = 16 / static_cast<int64_t>(l.x.element_size());
  if ((l.cl ? l.d.C : l.d.S) % k != 0) {
    return false;
  }
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) {
      return false;
    }
  }
  return true;
}

// A per-channel tensor (C elements, any shape and strides) as contiguous
// memory, and how the kernels read it.
at::Tensor channel_tensor(const std::optional<at::Tensor>& t) { return has(t) ? t->contiguous() : at::Tensor(); }

ParamIn param_in(const at::Tensor& t) {
  return t.defined() ? ParamIn{t.const_data_ptr(), t.scalar_type() == at::kFloat} : ParamIn{nullptr, false};
}

ParamOut param_out(const at::Tensor& t, bool want) {
  return want ? ParamOut{t.data_ptr(), t.scalar_type() == at::kFloat} : ParamOut{nullptr, false};
}

// Calls f(T(), K) for the input's dtype, K its vector width or 1.
template <typename F>
void dispatch(at::ScalarType dtype, bool vec, F f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "batch_norm_cuda", [&] {
    if (vec) {
      f(scalar_t(), std::integral_constant<int, vec_size<scalar_t>()>());
    } else {
      f(scalar_t(), std::integral_constant<int, 1>());
    }
  });
}

// The partial states of a reduction, and where channel c's k-th one is.
struct Partials {
  at::Tensor ws;  // bytes
  int64_t splits, stride_c, stride_k;
};

template <typename Op, int K>
Partials launch_reduce(const Op& op, const Layout& l, cudaStream_t stream) {
  using State = typename Op::State;
  const BatchNormDims& d = l.d;
  const BatchNormReducePlan p = plan_batch_norm_reduce(d.N, d.C, d.S, l.cl, K, sm_count());
  Partials r;
  r.splits = p.splits;
  r.ws = at::empty({d.C * p.splits * static_cast<int64_t>(sizeof(State))}, l.x.options().dtype(at::kByte));
  const ReduceArgs a{d.N, d.C, d.S, p.splits, p.splits_s, p.rows_per, p.seg, r.ws.data_ptr()};
  const dim3 block(static_cast<unsigned int>(p.bx), static_cast<unsigned int>(p.by));
  if (l.cl) {
    r.stride_c = 1;
    r.stride_k = d.C;
    TORCH_INTERNAL_ASSERT(p.tiles <= std::numeric_limits<int32_t>::max() && p.splits <= 65535);
    const dim3 grid(static_cast<unsigned int>(p.tiles), static_cast<unsigned int>(p.splits));
    reduce_cl_kernel<Op, K><<<grid, block, 0, stream>>>(a, op);
  } else {
    r.stride_c = p.splits;
    r.stride_k = 1;
    PYOPTIM_CHECK(d.C * p.splits <= std::numeric_limits<int32_t>::max(), "batch_norm: ", d.C,
                  " channels is more than one launch of the CUDA kernels holds");
    reduce_nchw_kernel<Op, K><<<static_cast<unsigned int>(d.C * p.splits), block, 0, stream>>>(a, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return r;
}

unsigned int channel_grid(int64_t C) { return static_cast<unsigned int>(ceil_div(C, kThreads)); }

template <typename T, int K, bool BWD>
void launch_elem(const ElemArgs& a, const Layout& l, cudaStream_t stream) {
  const int64_t blocks = ceil_div(a.nvec, kThreads * kElemItems);
  PYOPTIM_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "batch_norm: an input of ", l.x.numel(),
                " elements is more than one launch of the CUDA kernels holds");
  const unsigned int grid = static_cast<unsigned int>(blocks);
  // Divisors: NCHW rows of S / K vectors, C channels; channels-last C / K vectors per row.
  const int64_t rows_div = l.cl ? 1 : l.d.S / K;
  const int64_t chans_div = l.cl ? l.d.C / K : l.d.C;
  if (l.x.numel() <= std::numeric_limits<int32_t>::max()) {
    using I = uint32_t;
    const IntDivider<I> rows(static_cast<I>(rows_div)), chans(static_cast<I>(chans_div));
    if (l.cl) {
      elem_kernel<T, K, true, BWD, I><<<grid, kThreads, 0, stream>>>(a, rows, chans);
    } else {
      elem_kernel<T, K, false, BWD, I><<<grid, kThreads, 0, stream>>>(a, rows, chans);
    }
  } else {
    using I = uint64_t;
    const IntDivider<I> rows(static_cast<I>(rows_div)), chans(static_cast<I>(chans_div));
    if (l.cl) {
      elem_kernel<T, K, true, BWD, I><<<grid, kThreads, 0, stream>>>(a, rows, chans);
    } else {
      elem_kernel<T, K, false, BWD, I><<<grid, kThreads, 0, stream>>>(a, rows, chans);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::TensorOptions stat_options(const at::Tensor& input) {
  return input.options().dtype(norm_stat_dtype(input.scalar_type()));
}

at::Tensor empty0(const at::Tensor& input) { return at::empty({0}, input.options()); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps) {
  check_batch_norm_fwd_args("batch_norm_fwd", input, weight, bias, running_mean, running_var, training, true,
                            c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(input.device());
  const Layout l = layout_of(input);
  const int64_t C = l.d.C, count = l.d.count();
  at::Tensor out = at::empty_like(l.x);
  at::Tensor save_mean = at::empty({C}, stat_options(input)), save_invstd = at::empty({C}, stat_options(input));
  const at::Tensor rm = channel_tensor(running_mean), rv = channel_tensor(running_var);
  const bool move = training && rm.defined();
  at::Tensor new_rm = move ? at::empty({C}, rm.options()) : empty0(input);
  at::Tensor new_rv = move ? at::empty({C}, rv.options()) : empty0(input);
  if (C == 0) {
    return {out, save_mean, save_invstd, new_rm, new_rv};
  }
  if (training && count == 0) {
    // No batch statistics: zeros saved, running statistics left as they are.
    save_mean.zero_();
    save_invstd.zero_();
    if (move) {
      new_rm.copy_(rm.view({C}));
      new_rv.copy_(rv.view({C}));
    }
    return {out, save_mean, save_invstd, new_rm, new_rv};
  }
  const at::Tensor w = channel_tensor(weight), b = channel_tensor(bias);
  at::Tensor coef = count > 0 ? at::empty({3, C}, stat_options(input)) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec = use_vec(l, {l.x.const_data_ptr(), out.const_data_ptr()});
  dispatch(input.scalar_type(), vec, [&](auto t, auto k) {
    using T = decltype(t);
    constexpr int K = decltype(k)::value;
    FwdChannelArgs ca{};
    ca.C = C;
    Partials p{};  // lives until the channel kernel that reads it is queued
    if (training) {
      p = launch_reduce<WelfordOp<T>, K>(WelfordOp<T>{l.x.const_data_ptr<T>()}, l, stream);
      ca.mode = FwdMode::kTraining;
      ca.partial = p.ws.const_data_ptr();
      ca.splits = p.splits;
      ca.stride_c = p.stride_c;
      ca.stride_k = p.stride_k;
      ca.new_running_mean = param_out(new_rm, move);
      ca.new_running_var = param_out(new_rv, move);
    } else {
      ca.mode = FwdMode::kEval;
    }
    ca.running_mean = param_in(rm);
    ca.running_var = param_in(rv);
    ca.mean_in = ca.invstd_in = nullptr;
    ca.weight = param_in(w);
    ca.bias = param_in(b);
    ca.eps = eps;
    ca.momentum = momentum;
    ca.mean_out = save_mean.data_ptr();
    ca.var_out = save_invstd.data_ptr();
    ca.coef = coef.defined() ? coef.data_ptr() : nullptr;
    fwd_channel_kernel<T><<<channel_grid(C), kThreads, 0, stream>>>(ca);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (count > 0) {
      const ElemArgs ea{l.x.const_data_ptr(), nullptr, out.data_ptr(), coef.const_data_ptr(), C,
                        l.x.numel() / K};
      launch_elem<T, K, false>(ea, l, stream);
    }
  });
  return {out, save_mean, save_invstd, new_rm, new_rv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cuda(const at::Tensor& grad_out,
                                                                   const at::Tensor& input,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& save_mean,
                                                                   const at::Tensor& save_invstd, bool training,
                                                                   std::array<bool, 3> output_mask) {
  const char* op = "batch_norm_bwd";
  check_batch_norm_fwd_args(op, input, weight, std::nullopt, std::nullopt, std::nullopt, training, false,
                            c10::DeviceType::CUDA);
  check_norm_grad_out(op, grad_out, input);
  check_batch_norm_stat(op, "save_mean", save_mean, input);
  check_batch_norm_stat(op, "save_invstd", save_invstd, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool want_dx = output_mask[0], want_dw = output_mask[1] && has(weight), want_db = output_mask[2];
  const Layout l = layout_of(input);
  const int64_t C = l.d.C, count = l.d.count();
  const auto wopts = input.options().dtype(has(weight) ? weight->scalar_type() : input.scalar_type());
  at::Tensor dx = want_dx ? at::empty_like(l.x) : empty0(input);
  at::Tensor dw = want_dw ? at::empty({C}, wopts) : empty0(input);
  at::Tensor db = want_db ? at::empty({C}, wopts) : empty0(input);
  if (C == 0) {
    return {dx, dw, db};
  }
  if (count == 0) {
    // Sums over no elements.
    if (want_dw) dw.zero_();
    if (want_db) db.zero_();
    return {dx, dw, db};
  }
  const bool reduce = (want_dx && training) || want_dw || want_db;
  if (!reduce && !want_dx) {
    return {dx, dw, db};
  }
  const at::Tensor dy = batch_norm_match_layout(grad_out, l.d);
  const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  const at::Tensor w = channel_tensor(weight);
  at::Tensor coef = want_dx ? at::empty({4, C}, stat_options(input)) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec =
      use_vec(l, {l.x.const_data_ptr(), dy.const_data_ptr(), want_dx ? dx.const_data_ptr() : nullptr});
  dispatch(input.scalar_type(), vec, [&](auto t, auto k) {
    using T = decltype(t);
    using S = at::opmath_type<T>;
    constexpr int K = decltype(k)::value;
    BwdChannelArgs ca{};
    ca.C = C;
    Partials p{};
    if (reduce) {
      const BwdSumsOp<T> sums{dy.const_data_ptr<T>(), l.x.const_data_ptr<T>(), mean.const_data_ptr<S>()};
      p = launch_reduce<BwdSumsOp<T>, K>(sums, l, stream);
      ca.partial = p.ws.const_data_ptr();
      ca.splits = p.splits;
      ca.stride_c = p.stride_c;
      ca.stride_k = p.stride_k;
    }
    ca.count = count;
    ca.mean = mean.const_data_ptr();
    ca.invstd = invstd.const_data_ptr();
    ca.weight = param_in(w);
    ca.training = training;
    ca.grad_weight = param_out(dw, want_dw);
    ca.grad_bias = param_out(db, want_db);
    ca.coef = want_dx ? coef.data_ptr() : nullptr;
    bwd_channel_kernel<T><<<channel_grid(C), kThreads, 0, stream>>>(ca);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (want_dx) {
      const ElemArgs ea{l.x.const_data_ptr(), dy.const_data_ptr(), dx.data_ptr(), coef.const_data_ptr(), C,
                        l.x.numel() / K};
      launch_elem<T, K, true>(ea, l, stream);
    }
  });
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  check_batch_norm_fwd_args("batch_norm_stats", input, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                            true, false, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(input.device());
  const Layout l = layout_of(input);
  const int64_t C = l.d.C;
  at::Tensor mean = at::empty({C}, stat_options(input)), m2 = at::empty({C}, stat_options(input));
  if (C == 0) {
    return {mean, m2};
  }
  if (l.d.count() == 0) {
    // Welford's state of no elements.
    mean.zero_();
    m2.zero_();
    return {mean, m2};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(input.scalar_type(), use_vec(l, {l.x.const_data_ptr()}), [&](auto t, auto k) {
    using T = decltype(t);
    constexpr int K = decltype(k)::value;
    const Partials p = launch_reduce<WelfordOp<T>, K>(WelfordOp<T>{l.x.const_data_ptr<T>()}, l, stream);
    FwdChannelArgs ca{};
    ca.mode = FwdMode::kStats;
    ca.C = C;
    ca.partial = p.ws.const_data_ptr();
    ca.splits = p.splits;
    ca.stride_c = p.stride_c;
    ca.stride_k = p.stride_k;
    ca.mean_out = mean.data_ptr();
    ca.var_out = m2.data_ptr();
    fwd_channel_kernel<T><<<channel_grid(C), kThreads, 0, stream>>>(ca);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, m2};
}

at::Tensor batch_norm_elemt_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                 const at::Tensor& invstd) {
  const char* op = "batch_norm_elemt";
  check_batch_norm_fwd_args(op, input, weight, bias, std::nullopt, std::nullopt, false, false,
                            c10::DeviceType::CUDA);
  check_batch_norm_stat(op, "mean", mean, input);
  check_batch_norm_stat(op, "invstd", invstd, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const Layout l = layout_of(input);
  const int64_t C = l.d.C;
  at::Tensor out = at::empty_like(l.x);
  if (C == 0 || l.d.count() == 0) {
    return out;
  }
  const at::Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const at::Tensor w = channel_tensor(weight), b = channel_tensor(bias);
  at::Tensor coef = at::empty({3, C}, stat_options(input));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(input.scalar_type(), use_vec(l, {l.x.const_data_ptr(), out.const_data_ptr()}), [&](auto t, auto k) {
    using T = decltype(t);
    constexpr int K = decltype(k)::value;
    FwdChannelArgs ca{};
    ca.mode = FwdMode::kElemt;
    ca.C = C;
    ca.mean_in = mean_c.const_data_ptr();
    ca.invstd_in = invstd_c.const_data_ptr();
    ca.weight = param_in(w);
    ca.bias = param_in(b);
    ca.coef = coef.data_ptr();
    fwd_channel_kernel<T><<<channel_grid(C), kThreads, 0, stream>>>(ca);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const ElemArgs ea{l.x.const_data_ptr(), nullptr, out.data_ptr(), coef.const_data_ptr(), C, l.x.numel() / K};
    launch_elem<T, K, false>(ea, l, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda(const at::Tensor& grad_out,
                                                                   const at::Tensor& input,
                                                                   const at::Tensor& mean) {
  const char* op = "batch_norm_backward_reduce";
  check_batch_norm_fwd_args(op, input, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true, false,
                            c10::DeviceType::CUDA);
  check_norm_grad_out(op, grad_out, input);
  check_batch_norm_stat(op, "mean", mean, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const Layout l = layout_of(input);
  const int64_t C = l.d.C;
  at::Tensor sum_dy = at::empty({C}, stat_options(input)), sum_dy_xmu = at::empty({C}, stat_options(input));
  if (C == 0) {
    return {sum_dy, sum_dy_xmu};
  }
  if (l.d.count() == 0) {
    sum_dy.zero_();
    sum_dy_xmu.zero_();
    return {sum_dy, sum_dy_xmu};
  }
  const at::Tensor dy = batch_norm_match_layout(grad_out, l.d);
  const at::Tensor mean_c = mean.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(input.scalar_type(), use_vec(l, {l.x.const_data_ptr(), dy.const_data_ptr()}), [&](auto t, auto k) {
    using T = decltype(t);
    using S = at::opmath_type<T>;
    constexpr int K = decltype(k)::value;
    const BwdSumsOp<T> sums{dy.const_data_ptr<T>(), l.x.const_data_ptr<T>(), mean_c.const_data_ptr<S>()};
    const Partials p = launch_reduce<BwdSumsOp<T>, K>(sums, l, stream);
    BwdChannelArgs ca{};
    ca.C = C;
    ca.partial = p.ws.const_data_ptr();
    ca.splits = p.splits;
    ca.stride_c = p.stride_c;
    ca.stride_k = p.stride_k;
    ca.count = l.d.count();
    ca.sum_dy_out = sum_dy.data_ptr();
    ca.sum_dy_xmu_out = sum_dy_xmu.data_ptr();
    bwd_channel_kernel<T><<<channel_grid(C), kThreads, 0, stream>>>(ca);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor batch_norm_backward_elemt_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                          const at::Tensor& mean, const at::Tensor& invstd,
                                          const std::optional<at::Tensor>& weight, const at::Tensor& mean_dy,
                                          const at::Tensor& mean_dy_xmu) {
  const char* op = "batch_norm_backward_elemt";
  check_batch_norm_fwd_args(op, input, weight, std::nullopt, std::nullopt, std::nullopt, true, false,
                            c10::DeviceType::CUDA);
  check_norm_grad_out(op, grad_out, input);
  check_batch_norm_stat(op, "mean", mean, input);
  check_batch_norm_stat(op, "invstd", invstd, input);
  check_batch_norm_stat(op, "mean_dy", mean_dy, input);
  check_batch_norm_stat(op, "mean_dy_xmu", mean_dy_xmu, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const Layout l = layout_of(input);
  const int64_t C = l.d.C;
  at::Tensor dx = at::empty_like(l.x);
  if (C == 0 || l.d.count() == 0) {
    return dx;
  }
  const at::Tensor dy = batch_norm_match_layout(grad_out, l.d);
  const at::Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const at::Tensor mean_dy_c = mean_dy.contiguous(), mean_dy_xmu_c = mean_dy_xmu.contiguous();
  const at::Tensor w = channel_tensor(weight);
  at::Tensor coef = at::empty({4, C}, stat_options(input));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec = use_vec(l, {l.x.const_data_ptr(), dy.const_data_ptr(), dx.const_data_ptr()});
  dispatch(input.scalar_type(), vec, [&](auto t, auto k) {
    using T = decltype(t);
    constexpr int K = decltype(k)::value;
    BwdChannelArgs ca{};
    ca.C = C;
    ca.count = l.d.count();
    ca.mean = mean_c.const_data_ptr();
    ca.invstd = invstd_c.const_data_ptr();
    ca.weight = param_in(w);
    ca.mean_dy_in = mean_dy_c.const_data_ptr();
    ca.mean_dy_xmu_in = mean_dy_xmu_c.const_data_ptr();
    ca.training = true;
    ca.coef = coef.data_ptr();
    bwd_channel_kernel<T><<<channel_grid(C), kThreads, 0, stream>>>(ca);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const ElemArgs ea{l.x.const_data_ptr(), dy.const_data_ptr(), dx.data_ptr(), coef.const_data_ptr(), C,
                      l.x.numel() / K};
    launch_elem<T, K, true>(ea, l, stream);
  });
  return dx;
}

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("batch_norm_fwd", &pyoptim::cuda::batch_norm_fwd_cuda);
  m.impl("batch_norm_bwd", &pyoptim::cuda::batch_norm_bwd_cuda);
  m.impl("batch_norm_stats", &pyoptim::cuda::batch_norm_stats_cuda);
  m.impl("batch_norm_elemt", &pyoptim::cuda::batch_norm_elemt_cuda);
  m.impl("batch_norm_backward_reduce", &pyoptim::cuda::batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &pyoptim::cuda::batch_norm_backward_elemt_cuda);
}
