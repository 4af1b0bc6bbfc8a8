// Large CPU outputs: asking for transparent huge pages before first touch.
#pragma once

#include <ATen/core/Tensor.h>

namespace pyoptim::cpu {

// note [huge-page outputs]: under glibc's default settings a large output
// (>= 128 KB, M_MMAP_THRESHOLD) is a fresh mmap on every call, and its first
// touch takes a page fault per 4 KB page: 8193 faults for a 32 MB LayerNorm
// output, about 85% of the call's time on a 2-core EPYC (torch's kernels pay
// the same). Where the kernel's THP mode is "madvise" (the common default),
// madvise(MADV_HUGEPAGE) on the output before it is written turns those into
// one fault per 2 MB. The hint changes no value and nothing when the memory
// is already populated (an allocator that keeps freed memory, as the
// benchmarks' default run does); torch's CPU allocator does the same for all
// its large allocations under THP_MEM_ALLOC_ENABLE=1. Outputs under
// kHugePageMinBytes are left alone.
constexpr int64_t kHugePageMinBytes = int64_t(4) << 20;

// A kernel's output shaped like `like` (at::empty_like with `format`), with
// huge pages asked for before its first write: every large CPU output is
// allocated here.
at::Tensor empty_output_like(const at::Tensor& like, at::MemoryFormat format = at::MemoryFormat::Preserve);

}  // namespace pyoptim::cpu
