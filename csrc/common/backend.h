// The backend selection, readable from every op: a thread-local that pyops.backend(...) sets
// (per thread, as torch.no_grad), and the rule that turns `auto` into a concrete backend.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace pyops {

// Ids in pyops._C.BACKENDS order.
enum class Backend : int8_t { kAuto = 0, kNative = 1, kTriton = 2, kTorch = 3, kCount = 4 };
enum class Device : int8_t { kCpu, kCuda, kOther };

Backend selected_backend();
void select_backend(Backend b);

struct Available {
  bool triton_cpu = false;   // Triton interpreted (TRITON_INTERPRET=1)
  bool triton_cuda = false;  // Triton importable and a GPU visible
  bool native_cuda = false;  // compiled with CUDA and a GPU visible
};
void set_available(const Available& a);

// The concrete backend (native, triton or torch) for an input of `numel` elements (-1: unknown, as
// for symbolic sizes under torch.compile) on `device`. `auto` takes torch below auto_min_numel on
// the CPU, where pyops' kernels do not repay their call; else native, then triton. An explicit
// backend that cannot run there raises, naming op.
Backend resolve_for(Device device, int64_t numel, int64_t auto_min_numel, const char* op = "op");

// The same for a tensor: torch for dtypes no kernel takes, and never a branch on a symbolic size.
Backend resolve(const char* op, const at::Tensor& t, int64_t auto_min_numel);

const char* backend_name(Backend b);

// The concrete backends that can run on `device` here, in order of preference (torch last).
std::vector<Backend> usable_backends(Device device);

// `auto` hands CPU inputs below these sizes (elements) to torch eager, which is faster there: the
// kernels' gains do not repay a pyops call. Measured fwd+bwd crossovers (dense upstream gradient),
// float32, 2 cores: relu, leaky_relu and sigmoid on a 2-core EPYC (AVX512) when a call cost ~20 us
// more than torch's; elu and maxout re-measured at ~4K on a 2-core Xeon (AVX512) once it cost ~10 us
// (elu 1.0x at 4K, 1.1x at 16K; maxout 1.3x at 4K). tanh: 64K on the EPYC; on the Xeon torch's own
// vectorized tanh beats Sleef's at every size (0.4-0.8x). batch_norm (training fwd+bwd, one thread,
// 2-core Xeon): 0.85x torch at 16K elements, 1.22x at 64K. Losses (Xeon, fwd+bwd, mean): l1, mse and
// huber are ahead of torch from 64 elements on (1.1x, 1.5x, 1.1x); cross entropy crosses at ~16K
// logits (0.9x at 64x64, 1.0x at 64x256, 1.2x at 256x256). conv2d: no size alone decides;
// csrc/autograd/conv.cpp (cpu_kernel_wins) weighs channels per group, layout and plane size. pyops._C.AUTO_MIN_NUMEL
// carries the same table to Python.
#define PYOPS_AUTO_MIN_NUMEL(X)      \
  X(relu, int64_t(1) << 20)          \
  X(leaky_relu, int64_t(1) << 20)    \
  X(elu, int64_t(1) << 12)           \
  X(sigmoid, int64_t(1) << 20)       \
  X(tanh, int64_t(1) << 16)          \
  X(maxout, int64_t(1) << 12)        \
  X(batch_norm, int64_t(1) << 15)    \
  X(l1_loss, 0)                      \
  X(mse_loss, 0)                     \
  X(huber_loss, 0)                   \
  X(cross_entropy, int64_t(1) << 14) \
  X(conv2d, 0)

namespace auto_min_numel {
#define PYOPS_AUTO_MIN_CONSTANT(op, n) constexpr int64_t op = n;
PYOPS_AUTO_MIN_NUMEL(PYOPS_AUTO_MIN_CONSTANT)
#undef PYOPS_AUTO_MIN_CONSTANT
}  // namespace auto_min_numel

}  // namespace pyops
