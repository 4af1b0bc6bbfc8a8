// Welford's running mean and sum of squared deviations, and Chan et al.'s
// merge of two such: the statistics of LayerNorm's rows (layer_norm.h) and of
// BatchNorm's channels (batch_norm.h), on the CPU and the GPU alike.
#pragma once

#include <pyoptim/macros.h>

namespace pyoptim {
inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

// Running mean and sum of squared deviations (Welford), for rows streamed in
// pieces: the CUDA multi-pass path merges one per thread, then per warp.
// `count` is of type C, S by default: exact in float up to 2^24 elements
// (a row of LayerNorm); BatchNorm's per-channel counts, which can pass that,
// keep it in int64_t or double. A plain aggregate (start from {0, 0, 0}), so
// it can live in CUDA shared memory.
template <typename S, typename C = S>
struct WelfordState {
  S mean;
  S m2;
  C count;
};

template <typename S, typename C>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE void welford_push(WelfordState<S, C>& w, S x) {
  w.count += C(1);
  const S delta = x - w.mean;
  w.mean += delta / S(w.count);
  w.m2 += delta * (x - w.mean);
}

// Chan et al.'s parallel merge: `a` absorbs `b`. An empty `a` takes `b` as
// it is: the general formula's delta^2 * count_a term would be 0 * delta^2,
// NaN when delta^2 overflows (|mean| > ~1.8e19 in float) though the result is b.
template <typename S, typename C>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE void welford_merge(WelfordState<S, C>& a, const WelfordState<S, C>& b) {
  if (b.count == C(0)) {
    return;
  }
  if (a.count == C(0)) {
    a = b;
    return;
  }
  const C count = a.count + b.count;
  const S delta = b.mean - a.mean;
  const S nb_over_n = S(b.count) / S(count);
  a.mean += delta * nb_over_n;
  a.m2 += b.m2 + delta * delta * S(a.count) * nb_over_n;
  a.count = count;
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
