// Host-side helpers for the raw-pointer entry points: the storage-dtype dispatch and
// the argument checks that do not depend on an op.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "kiln/common.cuh"

namespace kiln {

// Calls f(TypeTag<T>) for the storage dtype code; an unknown code calls nothing
// (check_dtype_code rejects it first).
template <class F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(TypeTag<float>{}); break;
    case kFloat16: f(TypeTag<__half>{}); break;
    case kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: break;
  }
}

inline void check_dtype_code(const char* where, int dtype) {
  check_arg(dtype >= 0 && dtype < kNumDTypes, where,
            "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
}

inline void check_required(const char* where, const char* name, std::uintptr_t ptr) {
  check_arg(ptr != 0, where, std::string(name) + " is null (0) but is required");
}

// A pointer of doubles (a saved float64 mean) must be 8-byte aligned; 0 passes.
inline void check_aligned8(const char* where, const char* name, std::uintptr_t ptr) {
  check_arg(ptr % 8 == 0, where, std::string(name) + " (float64) must be 8-byte aligned");
}

// True when every pointer is 16-byte aligned (0, an absent pointer, is).
inline bool all_aligned16(std::initializer_list<std::uintptr_t> ptrs) {
  for (std::uintptr_t p : ptrs) {
    if (p % 16 != 0) return false;
  }
  return true;
}

// Bytes of one element of the storage dtype.
inline std::size_t dtype_bytes(int dtype) { return dtype == kFloat32 ? 4 : 2; }

}  // namespace kiln
