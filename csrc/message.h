// Error messages built without std::ostream.
//
// note [no ostream in messages]: on the GPU machine's image (torch 2.11,
// g++ 13), formatting an integer into the std::ostringstream that
// TORCH_CHECK's c10::str builds inside this library crashed the process
// (SIGSEGV in std::ostream::_M_insert<long>, seen 2026-11-26) instead of
// raising: every bad-input error became a segfault. Messages here are
// assembled from std::string pieces instead (std::to_string, snprintf), and
// TORCH_CHECK receives one finished string, which c10::str passes through.
#pragma once

#include <cstdio>
#include <string>
#include <type_traits>

#include <c10/core/Device.h>
#include <c10/core/Layout.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace pyoptim {
namespace detail {

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", x);
  return buf;
}
template <typename I, typename = std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>>>
std::string piece(I x) {
  return std::to_string(x);
}
inline std::string piece(bool b) { return b ? "True" : "False"; }
inline std::string piece(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return s + "]";
}
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(c10::DeviceType t) { return c10::DeviceTypeName(t, /*lower_case=*/true); }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string piece(c10::Layout l) {
  switch (l) {
    case c10::kStrided: return "Strided";
    case c10::kSparse: return "Sparse";
    case c10::kSparseCsr: return "SparseCsr";
    default: return "non-strided";
  }
}

}  // namespace detail

// The concatenation of every argument's text.
template <typename... Args>
std::string msg(const Args&... args) {
  std::string out;
  ((out += detail::piece(args)), ...);
  return out;
}

}  // namespace pyoptim

// TORCH_CHECK with a message from pyoptim::msg (see note above).
#define PYOPTIM_CHECK(cond, ...) TORCH_CHECK((cond), ::pyoptim::msg(__VA_ARGS__))
// The same, raising c10::ValueError (Python ValueError), for torch messages of that type.
#define PYOPTIM_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE((cond), ::pyoptim::msg(__VA_ARGS__))
