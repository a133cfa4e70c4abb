// The backend selection, `auto`'s rule and the autotune cache (csrc/common/backend.h).
#include "common/backend.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ops/ones_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "common/checks.h"

namespace pyops {
namespace {
// One thread-local for both, so that an op reads its selection with one TLS access.
struct Selection {
  Backend backend = Backend::kAuto;
  int8_t autotune = -1;  // -1: the process default
};
thread_local Selection selection;
std::atomic<bool> autotune_default{false};
Available available;
constexpr Facts kNoFacts{};
}  // namespace

Backend selected_backend() { return selection.backend; }
void select_backend(Backend b) { selection.backend = b; }

int autotune_setting() { return selection.autotune; }
void set_autotune(int setting) { selection.autotune = int8_t(setting < 0 ? -1 : setting > 0 ? 1 : 0); }
void set_autotune_default(bool on) { autotune_default.store(on, std::memory_order_relaxed); }
bool autotune_enabled() {
  const int8_t s = selection.autotune;
  return s > 0 || (s < 0 && autotune_default.load(std::memory_order_relaxed));
}

void set_available(const Available& a) { available = a; }

const char* backend_name(Backend b) {
  static const char* names[] = {"auto", "native", "triton", "torch"};
  return names[int(b)];
}

const char* op_name(Op op) {
  static const char* names[] = {
#define PYOPS_AUTO_NAME(op, n) #op,
      PYOPS_AUTO_MIN_NUMEL(PYOPS_AUTO_NAME)
#undef PYOPS_AUTO_NAME
  };
  return op < Op::kCount ? names[int(op)] : "op";
}

Op op_by_name(const char* name) {
  for (int i = 0; i < int(Op::kCount); ++i)
    if (std::strcmp(op_name(Op(i)), name) == 0) return Op(i);
  return Op::kCount;
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

constexpr int64_t kCpuMin[] = {
#define PYOPS_AUTO_MIN_VALUE(op, n) n,
    PYOPS_AUTO_MIN_NUMEL(PYOPS_AUTO_MIN_VALUE)
#undef PYOPS_AUTO_MIN_VALUE
};

CudaRule cuda_rule(Op op) {
  switch (op) {
#define PYOPS_AUTO_CUDA_CASE(name, rule, why) \
  case Op::name:                              \
    return CudaRule::rule;
    PYOPS_AUTO_CUDA(PYOPS_AUTO_CUDA_CASE)
#undef PYOPS_AUTO_CUDA_CASE
    default:
      return CudaRule::kKernel;
  }
}

// conv2d on the CPU (the measurements are in backend.h's CPU table and tools/conv_sweep.py's sweep in
// bench/RESULTS.md).
bool cpu_conv_wins(int64_t numel, const Facts& f) {
  if (f.groups == 1 || f.in_per_group < 0 || f.in_per_group > 8) return false;
  if (numel >= 0 && numel < (int64_t(1) << 14)) return true;  // torch's fixed cost decides
  if (f.channels_last) return f.in_per_group == 1 && numel >= 0 && numel < (int64_t(1) << 18);
  if (f.sh > 1 || f.sw > 1) return false;  // strided along the width: the direct kernel's scalar loop
  if (f.in_per_group == 2) return true;
  const int64_t min_plane = f.in_per_group <= 4 ? 14 * 14 : 28 * 28;
  return f.out_plane < 0 || f.out_plane >= min_plane;
}

// The first kernel backend that runs on `device` here, else torch.
Backend first_kernel(Device device) {
  for (Backend c : {Backend::kNative, Backend::kTriton})
    if (can_run(c, device)) return c;
  return Backend::kTorch;
}

[[noreturn]] void unavailable(const char* op, Backend b, Device device, const at::Tensor* t) {
  const std::string where = device == Device::kCpu    ? "cpu"
                            : device == Device::kCuda ? "cuda"
                            : t != nullptr            ? c10::DeviceTypeName(t->device().type(), true)
                                                      : "this device";
  TORCH_CHECK(false, "pyops.", op, ": backend '", backend_name(b), "' is not available on ", where,
              " here (available: ", usable_list(device), ")");
}
}  // namespace

std::vector<Backend> usable_backends(Device d) {
  std::vector<Backend> found;
  for (Backend b : {Backend::kNative, Backend::kTriton, Backend::kTorch})
    if (can_run(b, d)) found.push_back(b);
  return found;
}

bool auto_kernel(Op op, Device device, int64_t numel, const Facts& f) {
  if (op >= Op::kCount) return device != Device::kOther;
  switch (device) {
    case Device::kCpu:
      if (op == Op::conv2d) return cpu_conv_wins(numel, f);
      return numel < 0 || numel >= kCpuMin[int(op)];
    case Device::kCuda:
      switch (cuda_rule(op)) {
        case CudaRule::kKernel:
          return true;
        case CudaRule::kFused:
          return f.fused || f.memory_efficient;
        case CudaRule::kDepthwise:
          return f.in_per_group == 1 && f.groups > 1 && !f.channels_last && f.kh > 0 && f.kh <= 7 && f.kw > 0 &&
                 f.kw <= 7 && f.sh <= 2 && f.sw <= 2;
        default:
          return false;
      }
    default:
      return false;
  }
}

Backend resolve_for(Device device, int64_t numel, int64_t auto_min_numel, const char* op) {
  const Backend b = selection.backend;
  if (b == Backend::kAuto) {
    if (device == Device::kCpu && numel >= 0 && numel < auto_min_numel) return Backend::kTorch;
    if (device == Device::kCuda) {
      const Op id = op_by_name(op);
      if (id < Op::kCount && cuda_rule(id) == CudaRule::kTorch) return Backend::kTorch;
    }
    return first_kernel(device);
  }
  if (!can_run(b, device)) unavailable(op, b, device, nullptr);
  return b;
}

Backend resolve(Op op, const char* name, const at::Tensor& t, const Facts* facts, bool* tune) {
  if (!is_kernel_dtype(t.scalar_type())) return Backend::kTorch;
  const Device d = device_kind(t);
  const Selection sel = selection;
  if (sel.backend != Backend::kAuto) {
    if (sel.backend == Backend::kTorch) return Backend::kTorch;
    if (!can_run(sel.backend, d)) unavailable(name, sel.backend, d, &t);
    return sel.backend;
  }
  if (d == Device::kOther) return Backend::kTorch;
  // Under torch.compile with dynamic shapes the size is symbolic: choose as for a large input
  // rather than put a guard on it.
  const auto numel = t.sym_numel().maybe_as_int();
  const int64_t n = numel.has_value() ? *numel : -1;
  if (tune != nullptr && (sel.autotune > 0 || (sel.autotune < 0 && autotune_default.load(std::memory_order_relaxed))))
    *tune = n >= 0;
  if (d == Device::kCpu && op < Op::conv2d)  // auto_kernel's CPU table, inline: native always runs there
    return n < 0 || n >= kCpuMin[int(op)] ? Backend::kNative : Backend::kTorch;
  return auto_kernel(op, d, n, facts != nullptr ? *facts : kNoFacts) ? first_kernel(d) : Backend::kTorch;
}

// ---- autotuning ------------------------------------------------------------------------------------
namespace {
std::mutex cache_mutex;
std::unordered_map<std::string, Backend> cache;
Tuner tuner;

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return "float64";
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    default:
      return c10::toString(t);
  }
}

int64_t bucket(int64_t n) {  // the next power of two (0 stays 0)
  int64_t b = 1;
  while (b < n) b <<= 1;
  return n <= 0 ? n : b;
}

bool elementwise(Op op) { return op < Op::batch_norm || (op >= Op::l1_loss && op <= Op::huber_loss); }

// op|device|dtype|layout|shape bucket|grad or nograd|facts: the calls that share a choice. The
// shape bucket rounds sizes up to powers of two: the element count for elementwise ops, each
// dimension otherwise.
std::string make_key(Op op, const at::Tensor& x, const Facts& f, bool grad) {
  std::string k = op_name(op);
  k = x.device().str() + "|" + k + "|" + dtype_name(x.scalar_type()) + "|";
  k += x.is_contiguous() ? "contiguous" : x.is_contiguous(at::MemoryFormat::ChannelsLast) ? "channels_last" : "strided";
  k += "|";
  if (elementwise(op)) {
    k += "n" + std::to_string(bucket(x.numel()));
  } else {
    for (int64_t i = 0; i < x.dim(); ++i) k += (i ? "x" : "") + std::to_string(bucket(x.size(i)));
  }
  k += grad ? "|grad" : "|nograd";
  if (op == Op::batch_norm) {
    k += std::string(f.training ? "|training" : "|eval") + (f.fused ? ",fused" : "") +
         (f.memory_efficient ? ",memory_efficient" : "");
  } else if (op == Op::conv2d) {
    k += "|groups=" + std::to_string(f.groups) + ",per_group=" + std::to_string(f.in_per_group) +
         ",out=" + std::to_string(bucket(f.out_channels)) + ",k=" + std::to_string(f.kh) + "x" + std::to_string(f.kw) +
         ",s=" + std::to_string(f.sh) + "x" + std::to_string(f.sw);
  }
  if (f.variant != 0) k += "|v" + std::to_string(f.variant);
  return k;
}

// Whether timing may run here: real tensors, as in eager code (no fake, functional or torch.func
// wrapped tensor, no Python dispatch mode); torch.compile's tracing fails one of these.
bool can_time(const at::Tensor& x) {
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0) return false;
  const c10::DispatchKeySet special({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                     c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                     c10::DispatchKey::FuncTorchGradWrapper,
                                     c10::DispatchKey::FuncTorchDynamicLayerFrontMode});
  if (x.key_set().has_any(special)) return false;
  return !c10::impl::tls_local_dispatch_key_set().included_.has_any(special);
}

struct SelectionGuard {
  Selection saved = selection;
  explicit SelectionGuard(Backend b) { selection.backend = b; }
  ~SelectionGuard() { selection = saved; }
};
}  // namespace

void set_tuner(Tuner t) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  tuner = std::move(t);
}

void autotune_store(const std::string& key, Backend b) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache[key] = b;
}

std::vector<std::pair<std::string, Backend>> autotune_entries() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return {cache.begin(), cache.end()};
}

void autotune_clear() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.clear();
}

Backend tuned(Op op, const at::Tensor& x, const Facts* facts, Backend fallback, const std::function<at::Tensor()>& run,
              std::initializer_list<const at::Tensor*> inputs) {
  // a symbolic size makes no key (resolve asks only for a known element count, but not every size
  // need be known then)
  if (x.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return fallback;
  const Device device = device_kind(x);
  std::vector<at::Tensor> diff;
  if (at::GradMode::is_enabled())
    for (const at::Tensor* t : inputs)
      if (t != nullptr && t->defined() && t->requires_grad()) diff.push_back(*t);
  const std::string key = make_key(op, x, facts != nullptr ? *facts : kNoFacts, !diff.empty());
  Tuner tune;
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    const auto found = cache.find(key);
    if (found != cache.end()) return can_run(found->second, device) ? found->second : fallback;
    tune = tuner;
  }
  if (!tune || !can_time(x)) return fallback;
  // The backends `auto` may pick: the kernels that run here (Triton on the CPU only interpreted,
  // a test vehicle, never timed) and torch.
  std::vector<Backend> candidates;
  for (Backend b : usable_backends(device))
    if (!(b == Backend::kTriton && device == Device::kCpu)) candidates.push_back(b);
  at::Tensor grad_out;
  const Runner runner = [&](Backend b) {
    const SelectionGuard guard(b);
    const at::Tensor y = run();
    if (diff.empty() || !y.requires_grad()) return;
    if (!grad_out.defined()) grad_out = at::ones_like(y);
    // the gradients are returned and dropped: nothing accumulates into .grad
    torch::autograd::grad({y}, diff, {grad_out}, /*retain_graph=*/false, /*create_graph=*/false,
                          /*allow_unused=*/true);
  };
  const Backend best = tune(key, candidates, runner);
  if (best == Backend::kAuto || !can_run(best, device)) return fallback;
  autotune_store(key, best);
  return best;
}

}  // namespace pyops
