// The one schema block of pyops: every native op, each backend's kernels register elsewhere
// (csrc/cpu/<family>.cpp, csrc/cuda/<family>.cu); fake kernels and autograd live in pyops/ops/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pyops, m) {
  // ---- activation ------------------------------------------------------------------------
  // Masked activations return (out, mask): bit (i % 8) of byte i / 8 says whether the gradient
  // flows unchanged at element i (relu: !(x <= 0), leaky_relu: x > 0), elements taken in out's
  // memory order; *_bwd wants grad_out laid out as out was.
  m.def("relu_fwd(Tensor self) -> (Tensor, Tensor)");
  m.def("relu_fwd_(Tensor(a!) self) -> Tensor");
  m.def("relu_bwd(Tensor grad_out, Tensor mask) -> Tensor");
  m.def("leaky_relu_fwd(Tensor self, float negative_slope) -> (Tensor, Tensor)");
  m.def("leaky_relu_fwd_(Tensor(a!) self, float negative_slope) -> Tensor");
  m.def("leaky_relu_bwd(Tensor grad_out, Tensor mask, float negative_slope) -> Tensor");
  m.def("elu_fwd(Tensor self, float alpha) -> Tensor");
  m.def("elu_fwd_(Tensor(a!) self, float alpha) -> ()");
  // saved is the output (is_result) or the input of the forward, as torch's elu_backward.
  m.def("elu_bwd(Tensor grad_out, Tensor saved, float alpha, bool is_result) -> Tensor");
  m.def("sigmoid_fwd(Tensor self) -> Tensor");
  m.def("sigmoid_bwd(Tensor grad_out, Tensor out) -> Tensor");
  m.def("tanh_fwd(Tensor self) -> Tensor");
  m.def("tanh_bwd(Tensor grad_out, Tensor out) -> Tensor");
  // maxout returns (out, indices): indices (uint8, out's shape) of the first maximal piece.
  m.def("maxout_fwd(Tensor self, int pieces, int dim) -> (Tensor, Tensor)");
  m.def("maxout_bwd(Tensor grad_out, Tensor indices, int pieces, int dim) -> Tensor");

  // ---- optim: one call updates every tensor of a (device, dtype) group in place ----------------
  // Lists run in parallel (state lists empty where an option needs no state). grad_scale: the
  // gradients are divided by it and written back unscaled; found_inf != 0: nothing is touched.
  // lr is a 0-d tensor; steps are 0-d float32 tensors, incremented by the step.
  m.def("sgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor lr, "
        "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, int[] first, "
        "Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def("adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
        "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, Tensor lr, float beta1, float beta2, "
        "float weight_decay, float eps, bool amsgrad, bool maximize, bool decoupled, Tensor? grad_scale, "
        "Tensor? found_inf) -> ()");
  m.def("adagrad_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] sums, Tensor(d!)[] steps, "
        "Tensor lr, float lr_decay, float weight_decay, float eps, bool maximize, Tensor? grad_scale, "
        "Tensor? found_inf) -> ()");
  m.def("rmsprop_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "
        "Tensor(d!)[] grad_avgs, Tensor(e!)[] momentum_buffers, Tensor(f!)[] steps, Tensor lr, float alpha, "
        "float eps, float weight_decay, float momentum, bool centered, bool maximize, Tensor? grad_scale, "
        "Tensor? found_inf) -> ()");
}

// A plain extension module: importing it runs the registrations above. It carries the build facts.
static struct PyModuleDef pyops_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&pyops_module);
  if (m == nullptr) return nullptr;
  PyModule_AddIntConstant(m, "WITH_CUDA", PYOPS_WITH_CUDA);
#define PYOPS_STR2(x) #x
#define PYOPS_STR(x) PYOPS_STR2(x)
  PyModule_AddStringConstant(m, "CPU_CAPABILITY", PYOPS_STR(CPU_CAPABILITY));
  return m;
}
