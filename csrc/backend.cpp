// The backend selection (csrc/common/backend.h).
#include "common/backend.h"

#include <c10/util/Exception.h>

#include <string>

#include "common/checks.h"

namespace pyops {
namespace {
thread_local Backend selected = Backend::kAuto;
Available available;
}  // namespace

Backend selected_backend() { return selected; }
void select_backend(Backend b) { selected = b; }
void set_available(const Available& a) { available = a; }

const char* backend_name(Backend b) {
  static const char* names[] = {"auto", "native", "triton", "torch"};
  return names[int(b)];
}

namespace {
bool can_run(Backend b, Device d) {
  switch (b) {
    case Backend::kNative:
      return d == Device::kCpu || (d == Device::kCuda && available.native_cuda);
    case Backend::kTriton:
      return (d == Device::kCpu && available.triton_cpu) || (d == Device::kCuda && available.triton_cuda);
    default:
      return true;
  }
}

std::string usable_list(Device d) {
  std::string s;
  for (Backend b : usable_backends(d)) {
    if (!s.empty()) s += ", ";
    s += backend_name(b);
  }
  return s;
}

Device device_kind(const at::Tensor& t) {
  return t.is_cpu() ? Device::kCpu : t.is_cuda() ? Device::kCuda : Device::kOther;
}
}  // namespace

std::vector<Backend> usable_backends(Device d) {
  std::vector<Backend> found;
  for (Backend b : {Backend::kNative, Backend::kTriton, Backend::kTorch})
    if (can_run(b, d)) found.push_back(b);
  return found;
}

Backend resolve_for(Device device, int64_t numel, int64_t auto_min_numel, const char* op) {
  const Backend b = selected;
  if (b == Backend::kAuto) {
    if (device == Device::kCpu && numel >= 0 && numel < auto_min_numel) return Backend::kTorch;
    for (Backend c : {Backend::kNative, Backend::kTriton})
      if (can_run(c, device)) return c;
    return Backend::kTorch;
  }
  TORCH_CHECK(can_run(b, device), "pyops.", op, ": backend '", backend_name(b), "' is not available on ",
              device == Device::kCpu    ? "cpu"
              : device == Device::kCuda ? "cuda"
                                        : "this device",
              " here (available: ", usable_list(device), ")");
  return b;
}

Backend resolve(const char* op, const at::Tensor& t, int64_t auto_min_numel) {
  if (!is_kernel_dtype(t.scalar_type())) return Backend::kTorch;
  const Device d = device_kind(t);
  if (d == Device::kOther && selected != Backend::kAuto && selected != Backend::kTorch) {
    TORCH_CHECK(false, "pyops.", op, ": backend '", backend_name(selected), "' is not available on ", t.device().type(),
                " here (available: torch)");
  }
  // Under torch.compile with dynamic shapes the size is symbolic: choose as for a large input
  // rather than put a guard on it.
  const auto numel = t.sym_numel().maybe_as_int();
  return resolve_for(d, numel.has_value() ? *numel : -1, auto_min_numel, op);
}

}  // namespace pyops
