// The CPU norm launch: what the launcher (norm_cpu.cpp, built once) hands to
// the kernels (norm_cpu_kernel.cpp, built once per instruction set).
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "cpu_isa.h"

namespace pyoptim::cpu {

// Elements per forward task: rows are grouped so a task moves at least
// ~128 KB of fp32, enough to amortize its start.
constexpr int64_t kNormCpuGrain = 32768;

// Outputs (y, dx) of at least this many bytes are written with streaming
// stores (note [streaming stores] in norm_cpu_kernel.cpp): past the size of
// the caches, where keeping them cached would only evict the inputs.
constexpr int64_t kNormCpuStreamBytes = int64_t(8) << 20;

// Pointers are to dense, row-major M x N data (the launcher makes them so).
// S below is the math type: double for Double input, else float.
struct NormCpuLaunch {
  c10::ScalarType dtype;   // x, y, dy, dx
  c10::ScalarType wdtype;  // w, b, dw, db: dtype, or Float for Half/BFloat16 input
  bool rms;
  bool stream_out;         // write y / dx with streaming stores
  int64_t M, N;
  double eps;              // forward only
  const void* x;
  const void* w;           // [N] or null
  const void* b;           // [N] or null (always null for RMSNorm)
  const void* dy;          // backward only
  void* out;               // forward: y; backward: dx
  void* mean;              // [M] S; null for RMSNorm (forward writes, backward reads)
  void* rstd;              // [M] S
  void* dw;                // backward: [N] or null (not wanted)
  void* db;                // backward: [N] or null
  // Backward: note [deterministic weight grads]. Rows are cut into `blocks`
  // contiguous ranges; block k sums its rows' dy * xhat and dy into
  // partial[k][0][:] and partial[k][1][:] ([blocks, 2, N] S), then a second
  // pass adds the blocks' partials in block order: the result depends on the
  // thread count only, never on scheduling, and no atomics are involved.
  void* partial;
  int64_t blocks;
};

// Built once per instruction set (setup.py's ISA_SOURCES); see cpu_isa.h.
PYOPTIM_DECLARE_ISA_KERNELS(void norm_fwd_kernel(const NormCpuLaunch& launch))
PYOPTIM_DECLARE_ISA_KERNELS(void norm_bwd_kernel(const NormCpuLaunch& launch))

}  // namespace pyoptim::cpu
