// The raw-pointer C++ API of dropout (csrc/dropout.cu) and the dropout arguments that
// linear_act's functions take (api.h). Plain C++: see api.h for the conventions.
#pragma once

#include <cstdint>

namespace kiln {

// dst = src * keep / (1 - p) for n contiguous elements of dtype; element i's keep bit from
// Philox(seed, offset + i) and threshold (kiln.ops.random's rule); scale = 1 / (1 - p).
// dst must not overlap src. The same function is dropout's backward (applied to the gradient).
void dropout_apply(std::uintptr_t src, std::uintptr_t dst, std::int64_t n, std::uint64_t seed,
                   std::uint64_t offset, std::int64_t threshold, double scale, int dtype, std::uintptr_t stream);

}  // namespace kiln
