// Run-time dtype codes -> compile-time element types, for the host-side launchers.
#pragma once

#include <stdexcept>
#include <string>

#include "mix_math.h"

namespace mixnn {

template <typename T>
struct TypeTag { using type = T; };

// Calls fn(TypeTag<T>{}) with T the element type of `dtype`.
template <typename Fn>
decltype(auto) dispatch_dtype(DType dtype, const char* argument, Fn&& fn) {
  switch (dtype) {
    case DType::kUInt8: return fn(TypeTag<uint8_t>{});
    case DType::kFloat32: return fn(TypeTag<float>{});
    case DType::kFloat16: return fn(TypeTag<Half>{});
    case DType::kBFloat16: return fn(TypeTag<BFloat16>{});
  }
  throw std::invalid_argument(std::string(argument) + ": unknown dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

// Calls fn(TypeTag<In>{}, TypeTag<Out>{}) for the input and output element types.
template <typename Fn>
decltype(auto) dispatch_in_out(DType in, DType out, Fn&& fn) {
  return dispatch_dtype(in, "images", [&](auto in_tag) {
    return dispatch_dtype(out, "out_dtype", [&](auto out_tag) { return fn(in_tag, out_tag); });
  });
}

}  // namespace mixnn
