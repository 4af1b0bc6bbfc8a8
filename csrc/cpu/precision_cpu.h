// The CPU elementwise loop of a step under a precision policy (note
// [precision policy] in pyoptim/optim/_base.py): params and grads of storage
// type T (fp32/fp16/bf16), NS state arrays of storage type U (fp32 or bf16,
// note [state dtype]), the param's fp32 value read and written through
// precision.h's load_master / store_master. Shared by every optimizer's CPU
// kernel; the math stays the optimizer's, in csrc/include/pyoptim.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/cpu/vec/vec.h>

#include <pyoptim/precision.h>

#include "vec_io.h"

namespace pyoptim::cpu::CPU_CAPABILITY {

// Applies op(p, g, s) to elements [begin, end): p and g one float vector each,
// s the NS state arrays' vectors (those whose SLOAD bit is clear load as 0;
// those whose SSTORE bit is set are written back), in steps of two float
// vectors. The param goes through a small fp32 buffer, element by element,
// since its policy may join or split bits; the rest is vector loads and stores.
// PSTORE false: the param (and its master or remainder) is read, not written (LAMB's first pass).
template <typename T, typename U, int NS, unsigned SLOAD, unsigned SSTORE, bool PSTORE = true, typename Op>
void precision_range(MasterWeights policy, T* p, const T* g, void* extra, uint32_t key, U* const (&state)[NS],
                     int64_t begin, int64_t end, const Op& op) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t K = 2 * V::size();
  alignas(64) float pf[K];
  for (int64_t j = begin; j < end; j += K) {
    const int64_t n = std::min<int64_t>(K, end - j);
    for (int64_t k = 0; k < K; ++k) {
      pf[k] = k < n ? load_master(policy, p, extra, j + k) : 0.0f;
    }
    V x[2] = {V::loadu(pf), V::loadu(pf + V::size())};
    V gv[2];
    V s[2][NS];
    V in[NS][2];
    n == K ? load<2>(g + j, gv) : load_n<2>(g + j, gv, n);
    for (int k = 0; k < NS; ++k) {
      if ((SLOAD >> k) & 1u) {
        n == K ? load<2>(state[k] + j, in[k]) : load_n<2>(state[k] + j, in[k], n);
      } else {
        in[k][0] = in[k][1] = V(0.0f);
      }
      s[0][k] = in[k][0];
      s[1][k] = in[k][1];
    }
    op(x[0], gv[0], s[0]);
    op(x[1], gv[1], s[1]);
    x[0].store(pf);
    x[1].store(pf + V::size());
    if constexpr (PSTORE) {
      for (int64_t k = 0; k < n; ++k) {
        store_master(policy, p, extra, key, j + k, pf[k]);
      }
    }
    for (int k = 0; k < NS; ++k) {
      if ((SSTORE >> k) & 1u) {
        const V out[2] = {s[0][k], s[1][k]};
        n == K ? store<2>(state[k] + j, out) : store_n<2>(state[k] + j, out, n);
      }
    }
  }
}

}  // namespace pyoptim::cpu::CPU_CAPABILITY
