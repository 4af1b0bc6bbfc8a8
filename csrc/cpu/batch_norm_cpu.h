// The CPU BatchNorm launch: what the launcher (batch_norm_cpu.cpp, built once)
// hands to the kernels (batch_norm_cpu_kernel.cpp, built once per instruction
// set).
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "cpu_isa.h"

namespace pyoptim::cpu {

// Elements per task of a purely elementwise pass (~128 KB of fp32), and the
// fewest elements a reduction block is cut down to (note [batch norm blocks]).
constexpr int64_t kBatchNormCpuGrain = 32768;
constexpr int64_t kBatchNormCpuMinBlock = 16384;

// note [batch norm sample-major] (batch_norm_cpu_kernel.cpp): an NCHW input
// whose runs (S elements) are shorter than kBatchNormCpuShortRunBytes is
// reduced in memory order when it is at most kBatchNormCpuSampleMajorBytes
// (the elementwise pass then rereads it from L3), or whatever its size when
// its runs are shorter than a cache line.
constexpr int64_t kBatchNormCpuShortRunBytes = 4096;
constexpr int64_t kBatchNormCpuSampleMajorBytes = int64_t(8) << 20;

// Outputs (y, dx) of at least this many bytes are written with streaming
// stores (note [streaming stores] in vec_io.h): past the size of the caches.
constexpr int64_t kBatchNormCpuStreamBytes = int64_t(8) << 20;

// The input and grad_out are (N, C, S) in one of the two layouts of
// BatchNormDims (csrc/batch_norm_host.h), output in the same one. Every
// per-channel array is [C] dense of the math type S (double for Double input,
// else float): the launcher converts weight, bias and running statistics to
// it, and the kernels' per-channel outputs to the dtypes the ops return.
// A null pointer is an absent input or an output not wanted.
//
// note [batch norm blocks]: a reduction over a channel's count = N * S
// elements is cut into a fixed number of blocks (`blocks`, chosen by the
// launcher from the thread count and the shape), each reduced on its own and
// the blocks then merged in block order, so results depend on the thread
// count only, never on scheduling, and no atomics are involved.
//   NCHW: `blocks` per channel (1 when the channels alone keep the threads
//     busy: then one task reads a channel's statistics and normalizes it
//     while its data is still in cache); block k of a channel is its
//     elements [k * count / blocks, (k + 1) * count / blocks) in (n, s) order.
//   channels-last: rows [k * N * S / blocks, (k + 1) * N * S / blocks), each
//     block summing every channel; `partial` holds its results per channel.
//   NCHW sample-major: the same over the N * C runs of S elements, in memory
//     order (run r is sample r / C, channel r % C).
struct BatchNormCpuLaunch {
  c10::ScalarType dtype;  // x, dy, out
  int64_t N, C, S;
  bool channels_last;
  bool sample_major;      // NCHW reduced in memory order (note [batch norm sample-major])
  bool stream_out;        // write out with streaming stores
  int64_t blocks;
  void* partial;          // scratch of S: [C * blocks * 3] (NCHW) or [blocks * 2 * C] (channels-last,
                          // sample-major); null when blocks == 1 (NCHW channel-major)

  const void* x;
  const void* dy;         // backward
  void* out;              // y (forward) or dx (backward)

  const void* weight;     // [C], or null (1)
  const void* bias;       // [C], or null (0)

  // Statistics read by batch_norm_elemt_kernel and batch_norm_bwd_kernel.
  const void* mean;       // [C]
  const void* invstd;     // [C]; null in batch_norm_backward_reduce (no dx, no grad_weight)

  // batch_norm_stats_kernel: the batch's statistics, and y when `out`.
  double momentum, eps;
  const void* running_mean;  // [C] or null; with running_var
  const void* running_var;
  void* save_mean;           // [C]
  void* save_invstd;         // [C] or null: 1 / sqrt(m2 / count + eps)
  void* save_m2;             // [C] or null: sum((x - mean)^2)
  void* new_running_mean;    // [C]; written when running_mean is given
  void* new_running_var;

  // batch_norm_bwd_kernel: the sums when `sum_dy`, then dx when `out` with
  // coefficients from mean_dy / mean_dy_xmu when given, else (training) from
  // the sums over count, else (eval) dy * invstd * w.
  bool training;
  const void* mean_dy;       // [C] or null
  const void* mean_dy_xmu;   // [C] or null
  void* sum_dy;              // [C] or null
  void* sum_dy_xmu;          // [C]; with sum_dy
  void* grad_weight;         // [C] or null: sum_dy_xmu * invstd
};

// Built once per instruction set (setup.py's ISA_SOURCES); see cpu_isa.h.
PYOPTIM_DECLARE_ISA_KERNELS(void batch_norm_stats_kernel(const BatchNormCpuLaunch& launch))
PYOPTIM_DECLARE_ISA_KERNELS(void batch_norm_elemt_kernel(const BatchNormCpuLaunch& launch))
PYOPTIM_DECLARE_ISA_KERNELS(void batch_norm_bwd_kernel(const BatchNormCpuLaunch& launch))

}  // namespace pyoptim::cpu
