// pyops.functional's activations, batch_norm and cross_entropy as C functions, so that a call costs what torch's own
// binding does. A call with a plain tensor (torch.Tensor or Parameter), arguments of the plain Python types and no
// __torch_function__ mode active takes the short route: bind the arguments, call the public op
// (csrc/autograd/activation.cpp) through its typed dispatcher handle with the GIL released, wrap the
// result. Every other call (tensor subclasses, modes, numpy or tensor scalars, wrong arguments) goes
// to the function's Python twin in pyops/functional.py, which also reports bad input, and which
// torch.compile traces in the C function's place (torch.compiler.substitute_in_graph).
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>

#include "functional.h"

namespace pyops {
namespace {

using at::Tensor;

// ---- the Python twins ----------------------------------------------------------------------------
enum Fn { kRelu, kLeakyRelu, kElu, kSigmoid, kTanh, kMaxout, kBatchNorm, kCrossEntropy, kFnCount };
constexpr const char* kFnNames[kFnCount] = {"relu", "leaky_relu", "elu",        "sigmoid",
                                            "tanh", "maxout",     "batch_norm", "cross_entropy"};
PyObject* twins[kFnCount] = {};

PyObject* twin(Fn fn, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  if (twins[fn] == nullptr) {
    PyErr_Format(PyExc_RuntimeError, "pyops.%s: its Python twin is not registered", kFnNames[fn]);
    return nullptr;
  }
  return PyObject_Vectorcall(twins[fn], args, nargs, kwnames);
}

// ---- argument binding: false (no error set) where the call does not fit the short route ---------
// The first `positional` parameters may come by position (all of them by default), any by keyword.
template <int N>
bool bind(const char* const (&params)[N], int required, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
          PyObject* (&slots)[N], int positional = N) {
  if (nargs > positional) return false;
  for (int i = 0; i < N; ++i) slots[i] = i < nargs ? args[i] : nullptr;
  const Py_ssize_t nkw = kwnames == nullptr ? 0 : PyTuple_GET_SIZE(kwnames);
  for (Py_ssize_t k = 0; k < nkw; ++k) {
    PyObject* name = PyTuple_GET_ITEM(kwnames, k);
    int j = int(nargs);
    while (j < N && PyUnicode_CompareWithASCIIString(name, params[j]) != 0) ++j;
    if (j == N || slots[j] != nullptr) return false;
    slots[j] = args[nargs + k];
  }
  for (int i = 0; i < required; ++i)
    if (slots[i] == nullptr) return false;
  return true;
}

// A tensor the short route takes: exactly torch.Tensor or Parameter, with no __torch_function__ mode.
bool plain_tensor(PyObject* o) { return THPVariable_CheckExact(o) && !at::impl::torch_function_mode_enabled(); }
bool plain_bool(PyObject* o) { return o == nullptr || o == Py_True || o == Py_False; }
bool plain_float(PyObject* o) { return o == nullptr || PyFloat_CheckExact(o); }
bool plain_int(PyObject* o) {
  if (o == nullptr) return true;
  int overflow = 0;
  return PyLong_CheckExact(o) && (PyLong_AsLongLongAndOverflow(o, &overflow), overflow == 0);
}

bool plain_optional_tensor(PyObject* o) { return o == nullptr || o == Py_None || THPVariable_CheckExact(o); }

double as_double(PyObject* o, double absent) { return o == nullptr ? absent : PyFloat_AS_DOUBLE(o); }
int64_t as_int(PyObject* o, int64_t absent) { return o == nullptr ? absent : PyLong_AsLongLong(o); }

#define PYOPS_PUBLIC_OP(fn, name, Sig)                                                                          \
  const c10::TypedOperatorHandle<Sig>& fn() {                                                                   \
    static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("pyops::" name, "").typed<Sig>(); \
    return handle;                                                                                              \
  }
PYOPS_PUBLIC_OP(relu_op, "relu", Tensor(const Tensor&))
PYOPS_PUBLIC_OP(relu_op_, "relu_", Tensor&(Tensor&))
PYOPS_PUBLIC_OP(leaky_relu_op, "leaky_relu", Tensor(const Tensor&, const at::Scalar&))
PYOPS_PUBLIC_OP(leaky_relu_op_, "leaky_relu_", Tensor&(Tensor&, const at::Scalar&))
PYOPS_PUBLIC_OP(elu_op, "elu", Tensor(const Tensor&, const at::Scalar&))
PYOPS_PUBLIC_OP(elu_op_, "elu_", Tensor&(Tensor&, const at::Scalar&))
PYOPS_PUBLIC_OP(sigmoid_op, "sigmoid", Tensor(const Tensor&))
PYOPS_PUBLIC_OP(tanh_op, "tanh", Tensor(const Tensor&))
PYOPS_PUBLIC_OP(maxout_op, "maxout", Tensor(const Tensor&, int64_t, int64_t))
using OptTensor = std::optional<Tensor>;
PYOPS_PUBLIC_OP(cross_entropy_op, "cross_entropy",
                Tensor(const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t, double))
PYOPS_PUBLIC_OP(batch_norm_op, "batch_norm",
                Tensor(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool,
                       double, double, std::optional<c10::string_view>, double, double, const OptTensor&, bool))
#undef PYOPS_PUBLIC_OP

struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

// The result of an out-of-place op as a new Python tensor.
template <class F>
PyObject* out_of_place(F&& f) {
  HANDLE_TH_ERRORS
  Tensor result;
  {
    ReleaseGil no_gil;
    result = f();
  }
  return THPVariable_Wrap(std::move(result));
  END_HANDLE_TH_ERRORS
}

// An in-place op returns its input object itself, as torch's do.
template <class F>
PyObject* in_place(PyObject* self, F&& f) {
  HANDLE_TH_ERRORS {
    ReleaseGil no_gil;
    f();
  }
  Py_INCREF(self);
  return self;
  END_HANDLE_TH_ERRORS
}

// relu(input, inplace=False), leaky_relu(input, negative_slope=0.01, inplace=False),
// elu(input, alpha=1.0, inplace=False): one shape, an optional scalar between input and inplace.
PyObject* py_relu(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const params[] = {"input", "inplace"};
  PyObject* a[2];
  if (!bind(params, 1, args, nargs, kwnames, a) || !plain_tensor(a[0]) || !plain_bool(a[1]))
    return twin(kRelu, args, nargs, kwnames);
  Tensor x = THPVariable_Unpack(a[0]);
  if (a[1] == Py_True) return in_place(a[0], [&] { relu_op_().call(x); });
  return out_of_place([&] { return relu_op().call(x); });
}

PyObject* py_leaky_relu(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const params[] = {"input", "negative_slope", "inplace"};
  PyObject* a[3];
  if (!bind(params, 1, args, nargs, kwnames, a) || !plain_tensor(a[0]) || !plain_float(a[1]) || !plain_bool(a[2]))
    return twin(kLeakyRelu, args, nargs, kwnames);
  Tensor x = THPVariable_Unpack(a[0]);
  const at::Scalar slope(as_double(a[1], 0.01));
  if (a[2] == Py_True) return in_place(a[0], [&] { leaky_relu_op_().call(x, slope); });
  return out_of_place([&] { return leaky_relu_op().call(x, slope); });
}

PyObject* py_elu(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const params[] = {"input", "alpha", "inplace"};
  PyObject* a[3];
  if (!bind(params, 1, args, nargs, kwnames, a) || !plain_tensor(a[0]) || !plain_float(a[1]) || !plain_bool(a[2]))
    return twin(kElu, args, nargs, kwnames);
  Tensor x = THPVariable_Unpack(a[0]);
  const at::Scalar alpha(as_double(a[1], 1.0));
  if (a[2] == Py_True) return in_place(a[0], [&] { elu_op_().call(x, alpha); });
  return out_of_place([&] { return elu_op().call(x, alpha); });
}

// sigmoid(input), tanh(input): one tensor in, one out.
template <Fn F, const c10::TypedOperatorHandle<Tensor(const Tensor&)>& (*Op)()>
PyObject* py_unary(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const params[] = {"input"};
  PyObject* a[1];
  if (!bind(params, 1, args, nargs, kwnames, a) || !plain_tensor(a[0])) return twin(F, args, nargs, kwnames);
  const Tensor& x = THPVariable_Unpack(a[0]);
  return out_of_place([&] { return Op().call(x); });
}
constexpr auto py_sigmoid = &py_unary<kSigmoid, sigmoid_op>;
constexpr auto py_tanh = &py_unary<kTanh, tanh_op>;

PyObject* py_maxout(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const params[] = {"input", "pieces", "dim"};
  PyObject* a[3];
  if (!bind(params, 2, args, nargs, kwnames, a) || !plain_tensor(a[0]) || !plain_int(a[1]) || !plain_int(a[2]))
    return twin(kMaxout, args, nargs, kwnames);
  const Tensor& x = THPVariable_Unpack(a[0]);
  const int64_t pieces = as_int(a[1], 0), dim = as_int(a[2], 1);
  return out_of_place([&] { return maxout_op().call(x, pieces, dim); });
}

OptTensor as_optional_tensor(PyObject* o) {
  if (o == nullptr || o == Py_None) return std::nullopt;
  return THPVariable_Unpack(o);
}

// batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
// eps=1e-05, *, activation=None, negative_slope=0.01, alpha=1.0, residual=None, memory_efficient=False).
// The twin raises what torch's functional raises (eps, one value per channel); such calls go there.
PyObject* py_batch_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const params[] = {
      "input", "running_mean", "running_var",    "weight", "bias",     "training",        "momentum",
      "eps",   "activation",   "negative_slope", "alpha",  "residual", "memory_efficient"};
  PyObject* a[13];
  const auto fallback = [&] { return twin(kBatchNorm, args, nargs, kwnames); };
  if (!bind(params, 3, args, nargs, kwnames, a, /*positional=*/8) || !plain_tensor(a[0])) return fallback();
  for (int i : {1, 2, 3, 4, 11})
    if (!plain_optional_tensor(a[i])) return fallback();
  for (int i : {6, 7, 9, 10})
    if (!plain_float(a[i])) return fallback();
  if (!plain_bool(a[5]) || !plain_bool(a[12])) return fallback();
  std::optional<c10::string_view> activation;
  if (a[8] != nullptr && a[8] != Py_None) {
    if (!PyUnicode_CheckExact(a[8])) return fallback();
    Py_ssize_t size = 0;
    const char* name = PyUnicode_AsUTF8AndSize(a[8], &size);
    if (name == nullptr) {
      PyErr_Clear();
      return fallback();
    }
    const c10::string_view act(name, size_t(size));
    if (act != "relu" && act != "leaky_relu" && act != "elu") return fallback();
    activation = act;
  }
  const Tensor& x = THPVariable_Unpack(a[0]);
  const bool training = a[5] == Py_True;
  const double eps = as_double(a[7], 1e-5);
  if (x.dim() < 2 || eps < 0 || (training && eps <= 0)) return fallback();
  if (training && x.sym_numel().maybe_as_int() && x.numel() == x.size(1)) return fallback();  // one value a channel
  const OptTensor rm = as_optional_tensor(a[1]), rv = as_optional_tensor(a[2]), w = as_optional_tensor(a[3]),
                  b = as_optional_tensor(a[4]), r = as_optional_tensor(a[11]);
  const double momentum = as_double(a[6], 0.1), slope = as_double(a[9], 0.01), alpha = as_double(a[10], 1.0);
  const bool memory_efficient = a[12] == Py_True;
  return out_of_place([&] {
    return batch_norm_op().call(x, rm, rv, w, b, training, momentum, eps, activation, slope, alpha, r,
                                memory_efficient);
  });
}

// cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
// reduction="mean", label_smoothing=0.0). The deprecated size_average/reduce go to the twin.
PyObject* py_cross_entropy(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const params[] = {"input",        "target", "weight",    "size_average",
                                       "ignore_index", "reduce", "reduction", "label_smoothing"};
  PyObject* a[8];
  const auto fallback = [&] { return twin(kCrossEntropy, args, nargs, kwnames); };
  if (!bind(params, 2, args, nargs, kwnames, a) || !plain_tensor(a[0]) || !THPVariable_CheckExact(a[1]) ||
      !plain_optional_tensor(a[2]) || !plain_int(a[4]) || !plain_float(a[7]))
    return fallback();
  for (int i : {3, 5})
    if (a[i] != nullptr && a[i] != Py_None) return fallback();
  int64_t reduction = 1;  // mean
  if (a[6] != nullptr) {
    if (!PyUnicode_CheckExact(a[6])) return fallback();
    if (PyUnicode_CompareWithASCIIString(a[6], "mean") == 0)
      reduction = 1;
    else if (PyUnicode_CompareWithASCIIString(a[6], "sum") == 0)
      reduction = 2;
    else if (PyUnicode_CompareWithASCIIString(a[6], "none") == 0)
      reduction = 0;
    else
      return fallback();
  }
  const Tensor& x = THPVariable_Unpack(a[0]);
  const Tensor& t = THPVariable_Unpack(a[1]);
  const OptTensor w = as_optional_tensor(a[2]);
  const int64_t ignore_index = as_int(a[4], -100);
  const double smoothing = as_double(a[7], 0.0);
  return out_of_place([&] { return cross_entropy_op().call(x, t, w, reduction, ignore_index, smoothing); });
}

// _set_twins({name: function}): the Python twins, registered once by pyops.functional.
PyObject* py_set_twins(PyObject*, PyObject* mapping) {
  for (int i = 0; i < kFnCount; ++i) {
    PyObject* f = PyMapping_GetItemString(mapping, kFnNames[i]);
    if (f == nullptr) return nullptr;
    Py_XSETREF(twins[i], f);
  }
  Py_RETURN_NONE;
}

#define PYOPS_FAST(name, fn, doc) \
  {name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn)), METH_FASTCALL | METH_KEYWORDS, doc}

PyMethodDef functional_methods[] = {
    PYOPS_FAST("relu", py_relu,
               "relu($module, /, input, inplace=False)\n--\n\n"
               "max(input, 0); gradient g * [input > 0]. Saves a 1-bit mask."),
    PYOPS_FAST("leaky_relu", py_leaky_relu,
               "leaky_relu($module, /, input, negative_slope=0.01, inplace=False)\n--\n\n"
               "input > 0 ? input : negative_slope * input; gradient g * (input > 0 ? 1 : negative_slope)."),
    PYOPS_FAST("elu", py_elu,
               "elu($module, /, input, alpha=1.0, inplace=False)\n--\n\n"
               "input > 0 ? input : alpha * (exp(input) - 1); gradient g * (input <= 0 ? alpha * exp(input) : 1)."),
    PYOPS_FAST("sigmoid", py_sigmoid,
               "sigmoid($module, /, input)\n--\n\n1 / (1 + exp(-input)); gradient g * y * (1 - y)."),
    PYOPS_FAST("tanh", py_tanh, "tanh($module, /, input)\n--\n\ntanh(input); gradient g * (1 - y^2)."),
    PYOPS_FAST("maxout", py_maxout,
               "maxout($module, /, input, pieces, dim=1)\n--\n\n"
               "output[..., j, ...] = max_k input[..., j * pieces + k, ...]; the gradient goes to the first\n"
               "maximal piece. `pieces` (1 to 256) must divide input.size(dim)."),
    PYOPS_FAST("batch_norm", py_batch_norm,
               "batch_norm($module, /, input, running_mean, running_var, weight=None, bias=None, training=False, "
               "momentum=0.1, eps=1e-05, *, activation=None, negative_slope=0.01, alpha=1.0, residual=None, "
               "memory_efficient=False)\n--\n\n"
               "torch.nn.functional.batch_norm, optionally fused with a residual add and an activation:\n"
               "y = act((x - mean) / sqrt(var + eps) * weight + bias + residual), act in None, \"relu\", "
               "\"leaky_relu\"\n(negative_slope), \"elu\" (alpha). Training normalizes with the batch's biased "
               "variance and updates\nrunning_mean/running_var in place (the unbiased variance, momentum as torch); "
               "eval uses them.\nGradients: db = sum(dz), dw = sum(dz xhat), dr = dz, dx = w invstd (dz - mean(dz) - "
               "xhat mean(dz xhat))\nwith dz = g act'(z). memory_efficient=True (invertible act: None, leaky_relu "
               "with a positive slope, elu\nwith a positive alpha) saves the output instead of the input and "
               "recovers xhat from it; the weight\nmust then be non-zero."),
    PYOPS_FAST("cross_entropy", py_cross_entropy,
               "cross_entropy($module, /, input, target, weight=None, size_average=None, ignore_index=-100, "
               "reduce=None, reduction='mean', label_smoothing=0.0)\n--\n\n"
               "Softmax cross entropy of logits `input` (C), (N, C) or (N, C, d1, ...) against class indices or\n"
               "class probabilities, as torch.nn.functional.cross_entropy (class weights, ignore_index, label\n"
               "smoothing). Per row: (1 - e) w_t (lse - x_t) + e / C sum_c w_c (lse - x_c); gradient\n"
               "(1 - e) w_t (softmax - onehot(t)) + e / C (softmax sum w - w), computed with the loss."),
    {"_set_twins", py_set_twins, METH_O, "Register the Python twins of the C functions of pyops.functional."},
};

}  // namespace

int add_functional(PyObject* module) {
  PyObject* name = PyModule_GetNameObject(module);
  if (name == nullptr) return -1;
  int status = 0;
  for (PyMethodDef& def : functional_methods) {
    PyObject* f = PyCFunction_NewEx(&def, module, name);
    if (f == nullptr || PyModule_AddObject(module, def.ml_name, f) < 0) {
      Py_XDECREF(f);
      status = -1;
      break;
    }
  }
  Py_DECREF(name);
  return status;
}

}  // namespace pyops
