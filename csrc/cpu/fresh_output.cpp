#include "fresh_output.h"

#include <cstdint>

#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyoptim::cpu {

namespace {

// Hints huge pages for the 2 MB-aligned part of `t`'s storage (Linux; a no-op elsewhere or when small).
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (bytes < kHugePageMinBytes) {
    return;
  }
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (hi > lo) {
    // A hint: failure (THP off, an old kernel) leaves the pages as they were.
    (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#else
  (void)t;
#endif
}

}  // namespace

at::Tensor empty_output_like(const at::Tensor& like, at::MemoryFormat format) {
  at::Tensor out = at::empty_like(like, format);
  advise_huge_pages(out);
  return out;
}

}  // namespace pyoptim::cpu
