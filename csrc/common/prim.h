#pragma once
// A primitive of each kernel backend (native, Triton), looked up in the dispatcher once and called
// through its typed handle: what every family's autograd functions call.

#include <ATen/core/dispatch/Dispatcher.h>

#include <mutex>
#include <optional>

#include "common/backend.h"

namespace pyops {

template <class Sig>
class Prim {
 public:
  Prim(const char* native, const char* triton) : names_{native, triton} {}
  const c10::TypedOperatorHandle<Sig>& operator[](Backend b) const {
    const int i = b == Backend::kTriton ? 1 : 0;
    std::call_once(once_[i], [&] {
      handles_[i].emplace(c10::Dispatcher::singleton().findSchemaOrThrow(names_[i], "").template typed<Sig>());
    });
    return *handles_[i];
  }

 private:
  const char* names_[2];
  mutable std::once_flag once_[2];
  mutable std::optional<c10::TypedOperatorHandle<Sig>> handles_[2];
};

}  // namespace pyops
