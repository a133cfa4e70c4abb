// The backend selection, readable from every op: a thread-local that pyops.backend(...) sets
// (per thread, as torch.no_grad), the rule that turns `auto` into a concrete backend (two tables
// below: the CPU's and CUDA's), and the hook through which pyops.autotune() replaces that rule by
// a measurement (pyops/autotune.py).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

namespace pyops {

// Ids in pyops._C.BACKENDS order.
enum class Backend : int8_t { kAuto = 0, kNative = 1, kTriton = 2, kTorch = 3, kCount = 4 };
enum class Device : int8_t { kCpu, kCuda, kOther };

Backend selected_backend();
void select_backend(Backend b);

// Autotuning for this thread: -1 follows the process default (PYOPS_AUTOTUNE=1), 0 off, 1 on.
int autotune_setting();
void set_autotune(int setting);
void set_autotune_default(bool on);
bool autotune_enabled();  // what this thread does now

struct Available {
  bool triton_cpu = false;   // Triton interpreted (TRITON_INTERPRET=1)
  bool triton_cuda = false;  // Triton importable and a GPU visible
  bool native_cuda = false;  // compiled with CUDA and a GPU visible
};
void set_available(const Available& a);

const char* backend_name(Backend b);

// The concrete backends that can run on `device` here, in order of preference (torch last).
std::vector<Backend> usable_backends(Device device);

// ---- `auto`'s rule: the CPU table --------------------------------------------------------------
// `auto` hands CPU inputs below these sizes (elements) to torch eager, which is faster there: the
// kernels' gains do not repay a pyops call. Measured fwd+bwd crossovers (dense upstream gradient),
// float32, 2 cores: relu, leaky_relu and sigmoid on a 2-core EPYC (AVX512) when a call cost ~20 us
// more than torch's; elu and maxout re-measured at ~4K on a 2-core Xeon (AVX512) once it cost ~10 us
// (elu 1.0x at 4K, 1.1x at 16K; maxout 1.3x at 4K). tanh: 64K on the EPYC; on the Xeon torch's own
// vectorized tanh beats Sleef's at every size (0.4-0.8x). batch_norm (training fwd+bwd, one thread,
// 2-core Xeon): 0.85x torch at 16K elements, 1.22x at 64K. Losses (Xeon, fwd+bwd, mean): l1, mse and
// huber are ahead of torch from 64 elements on (1.1x, 1.5x, 1.1x); cross entropy crosses at ~16K
// logits (0.9x at 64x64, 1.0x at 64x256, 1.2x at 256x256). The optimizers' steps are ours at every
// size. conv2d: no size alone decides (auto_kernel, csrc/backend.cpp): measured with
// tools/conv_sweep.py on a 2-core EPYC (Zen 5, AVX-512), float32, 3x3 kernels, forward+backward
// (torch's time over ours; the table is in bench/RESULTS.md): below 16K input elements ours wins
// every grouped shape (torch's fixed cost: 1.1-3.2x); above it, in NCHW at stride 1, two channels per
// group win everywhere (1.6-4.4x), depthwise and 4 channels per group from 14x14 output planes on
// (1.1-3.9x; 7x7 planes 0.5-1.1x) and 8 per group from 28x28 (1.05-1.3x; 14x14 0.8x); NCHW at stride
// 2 loses (0.2-0.6x, see below); channels_last goes to torch
// (0.5-1.0x) except depthwise below 256K elements (1.6-2.2x); dense convolutions (groups == 1) and
// more than 8 channels per group stay torch's (0.1-0.7x on a Xeon when last measured). The NCHW stride-2
// rows are the direct kernel's scalar loop (0.2-0.6x). pyops._C.AUTO_MIN_NUMEL carries the table to
// Python. Under pyops.autotune() a measurement on this machine replaces it.
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
  X(conv2d, 0)                       \
  X(sgd, 0)                          \
  X(adam, 0)                         \
  X(adagrad, 0)                      \
  X(rmsprop, 0)

namespace auto_min_numel {
#define PYOPS_AUTO_MIN_CONSTANT(op, n) constexpr int64_t op = n;
PYOPS_AUTO_MIN_NUMEL(PYOPS_AUTO_MIN_CONSTANT)
#undef PYOPS_AUTO_MIN_CONSTANT
}  // namespace auto_min_numel

// ---- `auto`'s rule: the CUDA table -------------------------------------------------------------
// No GPU has measured these kernels yet, so on a CUDA tensor `auto` runs a pyops kernel only where
// its design moves fewer bytes than torch's or fuses what torch runs as separate kernels, and hands
// the rest to torch (cuDNN for convolutions). kKernel: pyops (native, else triton); kTorch: torch;
// kFused: pyops when the call fuses something (below); kDepthwise: pyops for the shapes its kernel
// is designed for. pyops._C.AUTO_CUDA carries the table (rule and reason) to Python; the README
// states it. Under pyops.autotune() a measurement on the user's GPU replaces it.
#define PYOPS_AUTO_CUDA(X)                                                                                        \
  X(relu, kKernel, "saves a 1-bit mask for backward where torch saves the output (1/32 of float32's bytes)")      \
  X(leaky_relu, kKernel, "saves a 1-bit mask for backward where torch saves the input (1/32 of float32's bytes)") \
  X(elu, kTorch, "saves the input, as torch does: the same bytes and passes, nothing fused")                      \
  X(sigmoid, kTorch, "saves the output, as torch does: the same bytes and passes, nothing fused")                 \
  X(tanh, kTorch, "saves the output, as torch does: the same bytes and passes, nothing fused")                    \
  X(maxout, kKernel,                                                                                              \
    "saves uint8 indices for backward, where torch's max over the pieces saves int64 ones (1/8 of the bytes)")    \
  X(batch_norm, kFused,                                                                                           \
    "pyops when an activation or a residual add is fused into its epilogue (one pass over the output "            \
    "instead of two or three), or memory_efficient (saves the output only, which "                                \
    "torch cannot); plain batch norm is cuDNN's")                                                                 \
  X(l1_loss, kKernel, "the gradient formed in the forward pass: one read of input and target for both")           \
  X(mse_loss, kKernel,                                                                                            \
    "the gradient formed in the forward pass: one read of input and target for both (rmse_loss "                  \
    "too)")                                                                                                       \
  X(huber_loss, kKernel, "the gradient formed in the forward pass: one read of input and target for both")        \
  X(cross_entropy, kKernel,                                                                                       \
    "softmax, loss and gradient in one pass over the logits; torch runs log_softmax, nll_loss and their "         \
    "backwards apart")                                                                                            \
  X(conv2d, kDepthwise,                                                                                           \
    "cuDNN, except depthwise convolutions (groups == in_channels > 1) in NCHW with kernels up to 7x7 and "        \
    "strides up to 2: the tiled CUDA kernel is designed for them (an input tile and its halo in shared memory "   \
    "per block, the weight gradient as per-block partials and a fixed-order pass)")                               \
  X(sgd, kKernel,                                                                                                 \
    "one launch over a parameter group's lists, where torch's foreach path runs a kernel per arithmetic step")    \
  X(adam, kKernel,                                                                                                \
    "one launch over a parameter group's lists, where torch's foreach path runs a kernel per arithmetic step")    \
  X(adagrad, kKernel,                                                                                             \
    "one launch over a parameter group's lists, where torch's foreach path runs a kernel per arithmetic step")    \
  X(rmsprop, kKernel,                                                                                             \
    "one launch over a parameter group's lists, where torch's foreach path runs a kernel per arithmetic step")

enum class CudaRule : int8_t { kKernel, kTorch, kFused, kDepthwise };

// The ops `auto` decides: the rows of the tables above.
enum class Op : int8_t {
#define PYOPS_AUTO_OP(op, n) op,
  PYOPS_AUTO_MIN_NUMEL(PYOPS_AUTO_OP)
#undef PYOPS_AUTO_OP
      kCount
};
const char* op_name(Op op);
Op op_by_name(const char* name);  // Op::kCount for an unknown name

// What the rule (and the autotune key) reads of a call beyond its input's size; -1: unknown
// (symbolic under torch.compile, which the rule treats as large).
struct Facts {
  // batch_norm
  bool training = false;
  bool fused = false;  // an activation applied in the kernel's epilogue, or a residual added there
  bool memory_efficient = false;
  // conv2d
  int64_t groups = 1;
  int64_t in_per_group = -1;  // input channels per group
  int64_t out_channels = -1;
  int64_t kh = -1, kw = -1, sh = 1, sw = 1;
  int64_t out_plane = -1;  // OH * OW
  bool channels_last = false;
  // anything else that picks another kernel (a reduction, a fused activation's code)
  int64_t variant = 0;
};

// `auto`'s rule, a pure function of the device kind, the op and the shape facts: whether a pyops
// kernel (native, else triton, where one can run) or torch runs it. pyops._C._auto_rule exports it.
bool auto_kernel(Op op, Device device, int64_t numel, const Facts& facts);

// The concrete backend (native, triton or torch) for `op` on input `t` (`name` is what errors
// call it: relu_ for relu's in-place form, which follows relu's rule). Dtypes no kernel takes go
// to torch; an explicit backend that cannot run there raises; `auto` follows the rule above and
// never branches on a symbolic size. Sets *tune where this thread autotunes and the call may be
// timed or looked up (choose() below).
Backend resolve(Op op, const char* name, const at::Tensor& t, const Facts* facts = nullptr, bool* tune = nullptr);

// The same for a device and a size, as pyops.backend.resolve asks: on the CPU `auto` takes torch
// below auto_min_numel; on CUDA it follows `op`'s row of the CUDA table (kernel for an op not in
// it, and for kFused and kDepthwise, which need the facts).
Backend resolve_for(Device device, int64_t numel, int64_t auto_min_numel, const char* op = "op");

// ---- autotuning (pyops.autotune(), pyops/autotune.py) -----------------------------------------
// Runs the op once on backend b: forward, and backward where a graph is recorded.
using Runner = std::function<void(Backend)>;
// Times run(b) for each candidate and returns the fastest, or kAuto where it times nothing (CUDA
// graph capture); registered by pyops/autotune.py through pyops._C, which takes the GIL.
using Tuner = std::function<Backend(const std::string& key, const std::vector<Backend>& candidates, const Runner& run)>;
void set_tuner(Tuner tuner);
// The choices made so far (and those loaded from the cache file), by key.
void autotune_store(const std::string& key, Backend b);
std::vector<std::pair<std::string, Backend>> autotune_entries();
void autotune_clear();

// The backend for a call this thread autotunes: the cached choice for its key; else, where timing
// is safe (no fake or functional tensor, no dispatch mode: torch.compile's tracing; no torch.func
// wrapped tensor), the tuner's choice over the usable backends, run by `run` (the op itself) on the
// inputs the backward differentiates; else `fallback`, the static rule's choice.
Backend tuned(Op op, const at::Tensor& x, const Facts* facts, Backend fallback, const std::function<at::Tensor()>& run,
              std::initializer_list<const at::Tensor*> inputs);

// resolve, then tuned where this thread autotunes: what the public ops call. `run` (the op on the
// same arguments, out of place) and `inputs` (its differentiable tensors, nullptr for an absent
// one) are used only when the call is timed.
template <class Run>
inline Backend choose(Op op, const char* name, const at::Tensor& x, const Facts* facts, Run&& run,
                      std::initializer_list<const at::Tensor*> inputs) {
  bool tune = false;
  const Backend b = resolve(op, name, x, facts, &tune);
  if (C10_LIKELY(!tune)) return b;
  return tuned(op, x, facts, b, std::function<at::Tensor()>(std::forward<Run>(run)), inputs);
}

}  // namespace pyops
