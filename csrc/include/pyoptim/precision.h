// The precision policy of a step's param write (issue 15), shared by the CPU
// and CUDA kernels; kernels/_multi_tensor.py and pyoptim/reference.py compute
// the same bits.
//
// `master_weights` (per param group) says where the fp32 value of a 16-bit
// param lives and how the update's fp32 result goes back into the param:
//   kNone       param, read as fp32; result rounded to nearest into the param
//   kFp32       an fp32 master (state "master_param"); master = result,
//               param = master rounded to nearest
//   kRemainder  bf16 param + int16 remainder (state "param_remainder") is the
//               fp32 master exactly (Transformer Engine's store_param_remainders):
//               split_remainder / join_remainder
//   kStochastic result stochastically rounded into the bf16 param from a
//               counter-based hash of (seed, step, tensor, element)
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <pyoptim/macros.h>

namespace pyoptim {

enum class MasterWeights : int32_t { kNone = 0, kFp32 = 1, kRemainder = 2, kStochastic = 3 };

inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

PYOPTIM_HOST_DEVICE PYOPTIM_INLINE uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

PYOPTIM_HOST_DEVICE PYOPTIM_INLINE float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// note [remainder split]: x's high 16 bits rounded to nearest (low half >=
// 0x8000 rounds the magnitude up, so an exact tie rounds away from zero)
// are the bf16 param; x's low 16 bits, as int16, the remainder. A negative
// remainder says the high half was rounded up, which join undoes: hi + rem
// is x, bit for bit, for every x (a finite x just below bf16's max rounds
// to inf in the param and still joins back exactly).
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE void split_remainder(float x, uint16_t& hi, int16_t& rem) {
  const uint32_t u = float_bits(x);
  const uint16_t low = static_cast<uint16_t>(u & 0xFFFFu);
  hi = static_cast<uint16_t>((u >> 16) + (low >= 0x8000u ? 1u : 0u));
  rem = static_cast<int16_t>(low);
}

PYOPTIM_HOST_DEVICE PYOPTIM_INLINE float join_remainder(uint16_t hi, int16_t rem) {
  const uint32_t h = static_cast<uint32_t>(static_cast<uint16_t>(hi - (rem < 0 ? 1 : 0)));
  return bits_float((h << 16) | static_cast<uint16_t>(rem));
}

// A 32-bit integer hash (Wellons' lowbias32: full avalanche, two multiplies).
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// note [stochastic key]: the random bits of element j of tensor `tensor`
// (its index in the op's lists) at step `step` (already advanced) are
// mix32(key ^ low 32 bits of j), key = stochastic_key(seed, step, tensor):
// a function of the call's seed and the state alone, so every backend, and a
// run resumed from a checkpoint, draws the same bits. (Tensors past 2^32
// elements reuse their first 2^32 draws.)
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE uint32_t stochastic_key(int64_t seed, double step, int64_t tensor) {
  const uint64_t s = static_cast<uint64_t>(seed);
  uint32_t k = mix32(static_cast<uint32_t>(tensor) + 0x9E3779B9u);
  k = mix32(k ^ static_cast<uint32_t>(static_cast<int64_t>(step)));
  k = mix32(k ^ static_cast<uint32_t>(s >> 32));
  return mix32(k ^ static_cast<uint32_t>(s));
}

// x stochastically rounded to bf16 (bits): torchao's rule, random low 16
// bits added to x's bits and the sum truncated, so x rounds away from zero
// with probability (low 16 bits of x) / 2^16: E[result] = x. Inf and NaN
// round to nearest (a carry out of NaN's bits would change its sign).
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE uint16_t bf16_stochastic(float x, uint32_t random) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7F800000u) == 0x7F800000u) {
    return static_cast<uint16_t>(((u & 0x7FFFFFFFu) > 0x7F800000u ? (u | 0x400000u) : u) >> 16);
  }
  return static_cast<uint16_t>((u + (random & 0xFFFFu)) >> 16);
}

// Element j of a param of storage type T, in fp32, as `policy` keeps it:
// `extra` is the fp32 masters (kFp32) or the int16 remainders (kRemainder)
// of the same tensor, unused otherwise.
template <typename T>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE float load_master(MasterWeights policy, const T* p, const void* extra, int64_t j) {
  if (policy == MasterWeights::kFp32) {
    return static_cast<const float*>(extra)[j];
  }
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (policy == MasterWeights::kRemainder) {
      return join_remainder(p[j].x, static_cast<const int16_t*>(extra)[j]);
    }
  }
  return static_cast<float>(p[j]);
}

// The inverse: element j's new fp32 value x written back as `policy` says
// (`key`: note [stochastic key], for kStochastic).
template <typename T>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE void store_master(MasterWeights policy, T* p, void* extra, uint32_t key, int64_t j,
                                                     float x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (policy == MasterWeights::kRemainder) {
      split_remainder(x, p[j].x, static_cast<int16_t*>(extra)[j]);
      return;
    }
    if (policy == MasterWeights::kStochastic) {
      p[j].x = bf16_stochastic(x, mix32(key ^ static_cast<uint32_t>(j)));
      return;
    }
  }
  if (policy == MasterWeights::kFp32) {
    static_cast<float*>(extra)[j] = x;
  }
  p[j] = static_cast<T>(x);  // round to nearest even
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
