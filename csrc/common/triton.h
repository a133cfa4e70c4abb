// The Triton backend's host side is the C++ host side every backend shares (csrc/<family>.h); only
// the kernel launch crosses to Python: pyops::_triton_<kernel> ops, defined and implemented in
// pyops/ops/<family>.py around the launchers of pyops.kernels. They receive checked, allocated
// tensors and launch, nothing else.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/DeviceGuard.h>

#include <mutex>
#include <optional>
#include <utility>

namespace pyops {

class TritonLaunch {
 public:
  explicit TritonLaunch(const char* name) : name_(name) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    std::call_once(once_, [this] { handle_.emplace(c10::Dispatcher::singleton().findSchemaOrThrow(name_, "")); });
    torch::jit::Stack stack;
    stack.reserve(sizeof...(Args));
    (stack.emplace_back(std::forward<Args>(args)), ...);
    handle_->callBoxed(stack);
  }

 private:
  const char* name_;
  mutable std::once_flag once_;
  mutable std::optional<c10::OperatorHandle> handle_;
};

// The device guard of a backend whose tensors may live on any device (Triton: CPU when interpreted).
struct AnyDeviceGuard {
  c10::OptionalDeviceGuard guard;
  explicit AnyDeviceGuard(const at::Tensor& t) : guard(t.device()) {}
};

}  // namespace pyops
