// The one schema block of pyops: every op, defined once. Each primitive exists twice with the same
// schema, as the native op pyops::<name> (csrc/cpu, csrc/cuda) and its Triton twin (csrc/triton,
// launching pyops.kernels); the public ops pick a backend and carry autograd (csrc/autograd).
// Fake kernels live in pyops/ops/<family>.py.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/backend.h"
#include "functional.h"
#include "optim.h"
#include "primitives.h"
#include "roofline.h"

TORCH_LIBRARY(pyops, m) {
  // ---- primitives: pyops::<native> and pyops::<triton>, one schema (csrc/primitives.h) ----------
#define PYOPS_DEFINE_PRIMITIVE(native, triton, signature) \
  m.def(native signature);                                \
  m.def(triton signature);
  PYOPS_PRIMITIVES(PYOPS_DEFINE_PRIMITIVE)
#undef PYOPS_DEFINE_PRIMITIVE

  // ---- public ops: torch's signatures; each picks the backend (pyops.backend) and differentiates
  // through its primitives (csrc/autograd/<family>.cpp) ----------------------------------------------
  m.def("relu(Tensor self) -> Tensor");
  m.def("relu_(Tensor(a!) self) -> Tensor(a!)");
  m.def("leaky_relu(Tensor self, Scalar negative_slope=0.01) -> Tensor");
  m.def("leaky_relu_(Tensor(a!) self, Scalar negative_slope=0.01) -> Tensor(a!)");
  m.def("elu(Tensor self, Scalar alpha=1.0) -> Tensor");
  m.def("elu_(Tensor(a!) self, Scalar alpha=1.0) -> Tensor(a!)");
  m.def("sigmoid(Tensor self) -> Tensor");
  m.def("tanh(Tensor self) -> Tensor");
  m.def("maxout(Tensor self, int pieces, int dim=1) -> Tensor");
  m.def(
      "batch_norm(Tensor input, Tensor? running_mean, Tensor? running_var, Tensor? weight=None, Tensor? bias=None, "
      "bool training=False, float momentum=0.1, float eps=1e-05, *, str? activation=None, "
      "float negative_slope=0.01, float alpha=1.0, Tensor? residual=None, bool memory_efficient=False) -> Tensor");
  // batch_norm in training with the input's batch statistics given (conv2d_stats's; empty: computed)
  m.def(
      "batch_norm.given_stats(Tensor input, Tensor batch_mean, Tensor batch_var, Tensor? running_mean, "
      "Tensor? running_var, Tensor? weight=None, Tensor? bias=None, float momentum=0.1, float eps=1e-05, *, "
      "str? activation=None, float negative_slope=0.01, float alpha=1.0, Tensor? residual=None, "
      "bool memory_efficient=False) -> Tensor");
  // batch_norm's running-average step, one op as torch's batch norm kernels do it (a composite's in-place
  // update of plain buffers from a tensor subclass's statistics is what subclasses cannot follow)
  m.def(
      "batch_norm_running_update(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "float momentum, float var_factor) -> ()");
  m.def("l1_loss(Tensor self, Tensor target, int reduction=1) -> Tensor");
  m.def("mse_loss(Tensor self, Tensor target, int reduction=1) -> Tensor");
  m.def("huber_loss(Tensor self, Tensor target, int reduction=1, float delta=1.0) -> Tensor");
  m.def("rmse_loss(Tensor self, Tensor target, int reduction=1, float eps=0.0) -> Tensor");
  m.def(
      "cross_entropy(Tensor self, Tensor target, Tensor? weight=None, int reduction=1, int ignore_index=-100, "
      "float label_smoothing=0.0) -> Tensor");
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
      "int[2] dilation=1, int groups=1, *, str? activation=None) -> Tensor");
  // conv2d and, in training, its output's batch statistics for the batch norm that follows (empty where the
  // backend computes none)
  m.def(
      "conv2d_stats(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
      "int[2] dilation=1, int groups=1) -> (Tensor, Tensor, Tensor)");
  m.def(
      "conv2d.padding(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, str padding=\"valid\", "
      "int[2] dilation=1, int groups=1, *, str? activation=None) -> Tensor");
}

namespace pyops {  // csrc/launch_plan.cpp
PyObject* py_cuda_launch_plan(PyObject*, PyObject* args);
PyObject* py_cross_entropy_weight_total(PyObject*, PyObject* args);
}  // namespace pyops

// ---- the extension module: importing it runs the registrations above; it carries the build facts,
// the primitive table and the backend selection (a thread-local read by every public op) ----------
namespace {

PyObject* py_set_backend(PyObject*, PyObject* arg) {
  const long b = PyLong_AsLong(arg);
  if (b == -1 && PyErr_Occurred()) return nullptr;
  if (b < 0 || b >= long(pyops::Backend::kCount)) {
    PyErr_Format(PyExc_ValueError, "pyops: backend id %ld out of range", b);
    return nullptr;
  }
  pyops::select_backend(pyops::Backend(b));
  Py_RETURN_NONE;
}

PyObject* py_get_backend(PyObject*, PyObject*) { return PyLong_FromLong(long(pyops::selected_backend())); }

// _set_available(triton_cpu, triton_cuda, cuda): what can run here, told once by pyops.backend.
PyObject* py_set_available(PyObject*, PyObject* args) {
  int triton_cpu = 0, triton_cuda = 0, cuda = 0;
  if (!PyArg_ParseTuple(args, "ppp", &triton_cpu, &triton_cuda, &cuda)) return nullptr;
  pyops::set_available({bool(triton_cpu), bool(triton_cuda), bool(cuda) && PYOPS_WITH_CUDA});
  Py_RETURN_NONE;
}

pyops::Device parse_device(const char* device) {
  const std::string dev(device);
  return dev == "cpu" ? pyops::Device::kCpu : dev == "cuda" ? pyops::Device::kCuda : pyops::Device::kOther;
}

// _resolve(op, device_type, numel, auto_min_numel) -> backend id: what the selection gives there.
PyObject* py_resolve(PyObject*, PyObject* args) {
  const char* op = nullptr;
  const char* device = nullptr;
  long long numel = -1, min_numel = 0;
  if (!PyArg_ParseTuple(args, "ssLL", &op, &device, &numel, &min_numel)) return nullptr;
  try {
    return PyLong_FromLong(long(pyops::resolve_for(parse_device(device), numel, min_numel, op)));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

// _auto_rule(op, device_type, numel=-1, **facts) -> bool: whether `auto`'s static rule runs a pyops
// kernel (True) or torch (False) there (csrc/common/backend.h, auto_kernel), whatever is installed.
PyObject* py_auto_rule(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"op",        "device",        "numel", "training", "fused", "memory_efficient",
                                 "groups",    "in_per_group",  "kh",    "kw",       "sh",    "sw",
                                 "out_plane", "channels_last", nullptr};
  const char* op = nullptr;
  const char* device = nullptr;
  long long numel = -1, groups = 1, per_group = -1, kh = -1, kw = -1, sh = 1, sw = 1, out_plane = -1;
  int training = 0, fused = 0, memory_efficient = 0, channels_last = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ss|L$pppLLLLLLLp", const_cast<char**>(kwlist), &op, &device, &numel,
                                   &training, &fused, &memory_efficient, &groups, &per_group, &kh, &kw, &sh, &sw,
                                   &out_plane, &channels_last))
    return nullptr;
  const pyops::Op id = pyops::op_by_name(op);
  if (id == pyops::Op::kCount) {
    PyErr_Format(PyExc_ValueError, "pyops._auto_rule: unknown op %R", PyTuple_GET_ITEM(args, 0));
    return nullptr;
  }
  pyops::Facts f;
  f.training = training;
  f.fused = fused;
  f.memory_efficient = memory_efficient;
  f.groups = groups;
  f.in_per_group = per_group;
  f.kh = kh;
  f.kw = kw;
  f.sh = sh;
  f.sw = sw;
  f.out_plane = out_plane;
  f.channels_last = channels_last;
  return PyBool_FromLong(pyops::auto_kernel(id, parse_device(device), numel, f));
}

// ---- autotuning: the thread's setting, the process default, the cache, and the bridge to the
// Python tuner (pyops/autotune.py), which times the candidates ----------------------------------------
PyObject* py_autotune_get(PyObject*, PyObject*) { return PyLong_FromLong(pyops::autotune_setting()); }

PyObject* py_autotune_set(PyObject*, PyObject* arg) {
  const long v = PyLong_AsLong(arg);
  if (v == -1 && PyErr_Occurred()) return nullptr;
  pyops::set_autotune(int(v));
  Py_RETURN_NONE;
}

PyObject* py_autotune_set_default(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  pyops::set_autotune_default(on);
  Py_RETURN_NONE;
}

PyObject* py_autotune_enabled(PyObject*, PyObject*) { return PyBool_FromLong(pyops::autotune_enabled()); }

// _auto_static() -> bool: `auto` is selected and this thread does not autotune, so that the static
// rule decides (the Python twins of pyops.functional decide small CPU inputs themselves then).
PyObject* py_auto_static(PyObject*, PyObject*) {
  return PyBool_FromLong(pyops::selected_backend() == pyops::Backend::kAuto && !pyops::autotune_enabled());
}

PyObject* py_autotune_store(PyObject*, PyObject* args) {
  const char* key = nullptr;
  long b = 0;
  if (!PyArg_ParseTuple(args, "sl", &key, &b)) return nullptr;
  if (b <= long(pyops::Backend::kAuto) || b >= long(pyops::Backend::kCount)) {
    PyErr_Format(PyExc_ValueError, "pyops: backend id %ld is not a concrete backend", b);
    return nullptr;
  }
  pyops::autotune_store(key, pyops::Backend(b));
  Py_RETURN_NONE;
}

PyObject* py_autotune_entries(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  for (const auto& [key, b] : pyops::autotune_entries()) {
    PyObject* v = PyLong_FromLong(long(b));
    PyDict_SetItemString(d, key.c_str(), v);
    Py_DECREF(v);
  }
  return d;
}

PyObject* py_autotune_clear(PyObject*, PyObject*) {
  pyops::autotune_clear();
  Py_RETURN_NONE;
}

struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

// The runner handed to the Python tuner for one call: run(backend_id) runs the op once on that
// backend (GIL released); it expires when the tuner returns.
struct RunnerRef {
  const pyops::Runner* run = nullptr;
};
constexpr const char* kRunnerCapsule = "pyops.autotune.runner";

PyObject* py_runner_call(PyObject* self, PyObject* arg) {
  auto* ref = static_cast<RunnerRef*>(PyCapsule_GetPointer(self, kRunnerCapsule));
  if (ref == nullptr) return nullptr;
  if (ref->run == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "pyops.autotune: this runner has expired (its tuning call returned)");
    return nullptr;
  }
  const long b = PyLong_AsLong(arg);
  if (b == -1 && PyErr_Occurred()) return nullptr;
  if (b <= long(pyops::Backend::kAuto) || b >= long(pyops::Backend::kCount)) {
    PyErr_Format(PyExc_ValueError, "pyops.autotune: backend id %ld is not a concrete backend", b);
    return nullptr;
  }
  HANDLE_TH_ERRORS {
    ReleaseGil no_gil;
    (*ref->run)(pyops::Backend(b));
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}
PyMethodDef runner_def = {"run", py_runner_call, METH_O, "Run the op being tuned once on a backend id."};

PyObject* python_tuner = nullptr;

// Calls the Python tuner(key, candidates, run) -> backend id (0: time nothing, keep the static rule).
pyops::Backend call_python_tuner(const std::string& key, const std::vector<pyops::Backend>& candidates,
                                 const pyops::Runner& run) {
  if (!Py_IsInitialized()) return pyops::Backend::kAuto;
  const PyGILState_STATE gil = PyGILState_Ensure();
  auto* ref = new RunnerRef{&run};
  PyObject* capsule = PyCapsule_New(ref, kRunnerCapsule, [](PyObject* c) {
    delete static_cast<RunnerRef*>(PyCapsule_GetPointer(c, kRunnerCapsule));
  });
  PyObject* runner = capsule == nullptr ? nullptr : PyCFunction_New(&runner_def, capsule);
  PyObject* ids = PyTuple_New(Py_ssize_t(candidates.size()));
  for (size_t i = 0; ids != nullptr && i < candidates.size(); ++i)
    PyTuple_SET_ITEM(ids, Py_ssize_t(i), PyLong_FromLong(long(candidates[i])));
  PyObject* tuner = python_tuner;
  Py_XINCREF(tuner);
  PyObject* result = runner == nullptr || ids == nullptr || tuner == nullptr
                         ? nullptr
                         : PyObject_CallFunction(tuner, "sOO", key.c_str(), ids, runner);
  ref->run = nullptr;
  long b = 0;
  std::string error;
  if (result != nullptr) {
    b = PyLong_AsLong(result);
    Py_DECREF(result);
  }
  if (PyErr_Occurred()) {
    PyObject *type = nullptr, *value = nullptr, *trace = nullptr;
    PyErr_Fetch(&type, &value, &trace);
    PyObject* text = value != nullptr ? PyObject_Str(value) : nullptr;
    const char* utf8 = text != nullptr ? PyUnicode_AsUTF8(text) : nullptr;
    error = utf8 != nullptr ? utf8 : "unknown error";
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(trace);
    PyErr_Clear();
  }
  Py_XDECREF(tuner);
  Py_XDECREF(ids);
  Py_XDECREF(runner);
  Py_XDECREF(capsule);
  PyGILState_Release(gil);
  TORCH_CHECK(error.empty(), "pyops.autotune: timing ", key, " failed: ", error);
  return b > long(pyops::Backend::kAuto) && b < long(pyops::Backend::kCount) ? pyops::Backend(b)
                                                                             : pyops::Backend::kAuto;
}

// _autotune_set_tuner(fn or None): the Python tuner every autotuned call asks on a new key.
PyObject* py_autotune_set_tuner(PyObject*, PyObject* fn) {
  if (fn != Py_None && !PyCallable_Check(fn)) {
    PyErr_SetString(PyExc_TypeError, "pyops._autotune_set_tuner: expected a callable or None");
    return nullptr;
  }
  Py_XDECREF(python_tuner);
  python_tuner = fn == Py_None ? nullptr : (Py_INCREF(fn), fn);
  pyops::set_tuner(python_tuner == nullptr ? pyops::Tuner() : pyops::Tuner(call_python_tuner));
  Py_RETURN_NONE;
}

// _available(device_type) -> backend ids that can run there, in order of preference.
PyObject* py_available(PyObject*, PyObject* arg) {
  const char* device = PyUnicode_AsUTF8(arg);
  if (device == nullptr) return nullptr;
  const auto found = pyops::usable_backends(parse_device(device));
  PyObject* ids = PyTuple_New(Py_ssize_t(found.size()));
  for (size_t i = 0; i < found.size(); ++i) PyTuple_SET_ITEM(ids, Py_ssize_t(i), PyLong_FromLong(long(found[i])));
  return ids;
}

// The tensors of a Python list, appended to out; None (in a state list only) stands for the tensor a step
// creates like its parameter, params[i]. False with a Python error set on anything else.
bool tensors_of(PyObject* list, std::vector<at::Tensor>& out, const std::vector<at::Tensor>* params = nullptr) {
  PyObject* seq = PySequence_Fast(list, "pyops._fused_step_fits: expected lists of tensors");
  if (seq == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  out.reserve(out.size() + size_t(n));
  bool ok = true;
  for (Py_ssize_t i = 0; ok && i < n; ++i) {
    if (items[i] == Py_None && params != nullptr && !params->empty()) {
      out.push_back((*params)[size_t(i) % params->size()]);
    } else if (THPVariable_Check(items[i])) {
      out.push_back(THPVariable_Unpack(items[i]));
    } else {
      PyErr_Format(PyExc_TypeError, "pyops._fused_step_fits: expected a tensor, got %s", Py_TYPE(items[i])->tp_name);
      ok = false;
    }
  }
  Py_DECREF(seq);
  return ok;
}

// _fused_step_fits(params, grads, states, steps) -> bool: whether an optimizer primitive takes the group
// in one call (csrc/optim.h), read without the dispatcher's list conversions (it runs every step);
// states is a list of state lists, each empty or of params' length.
PyObject* py_fused_step_fits(PyObject*, PyObject* args) {
  PyObject *p = nullptr, *g = nullptr, *s = nullptr, *st = nullptr;
  if (!PyArg_ParseTuple(args, "OOOO", &p, &g, &s, &st)) return nullptr;
  std::vector<at::Tensor> params, grads, states, steps;
  if (!tensors_of(p, params) || !tensors_of(g, grads) || !tensors_of(st, steps)) return nullptr;
  PyObject* lists = PySequence_Fast(s, "pyops._fused_step_fits: states must be a list of lists of tensors");
  if (lists == nullptr) return nullptr;
  bool ok = true;
  for (Py_ssize_t k = 0; ok && k < PySequence_Fast_GET_SIZE(lists); ++k)
    ok = tensors_of(PySequence_Fast_GET_ITEM(lists, k), states, &params);
  Py_DECREF(lists);
  if (!ok) return nullptr;
  try {
    return PyBool_FromLong(pyops::fused_step_fits(params, grads, states, steps));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"_set_backend", py_set_backend, METH_O, "Select a backend id for this thread."},
    {"_get_backend", py_get_backend, METH_NOARGS, "This thread's selected backend id."},
    {"_set_available", py_set_available, METH_VARARGS, "Tell which backends can run here."},
    {"_resolve", py_resolve, METH_VARARGS, "The backend id that runs on a device now."},
    {"_available", py_available, METH_O, "The backend ids that can run on a device here."},
    {"_auto_rule", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_auto_rule)),
     METH_VARARGS | METH_KEYWORDS, "Whether auto's static rule runs a pyops kernel for an op, device and shape."},
    {"_auto_static", py_auto_static, METH_NOARGS, "Whether auto's static rule decides on this thread now."},
    {"_autotune_get", py_autotune_get, METH_NOARGS, "This thread's autotune setting (-1 default, 0 off, 1 on)."},
    {"_autotune_set", py_autotune_set, METH_O, "Set this thread's autotune setting (-1 default, 0 off, 1 on)."},
    {"_autotune_set_default", py_autotune_set_default, METH_O, "Set the process default (PYOPS_AUTOTUNE)."},
    {"_autotune_enabled", py_autotune_enabled, METH_NOARGS, "Whether this thread autotunes now."},
    {"_autotune_set_tuner", py_autotune_set_tuner, METH_O, "Register the Python tuner."},
    {"_autotune_store", py_autotune_store, METH_VARARGS, "Store a choice (key, backend id) in the cache."},
    {"_autotune_entries", py_autotune_entries, METH_NOARGS, "The cache: {key: backend id}."},
    {"_autotune_clear", py_autotune_clear, METH_NOARGS, "Empty the cache."},
    {"_fused_step_fits", py_fused_step_fits, METH_VARARGS, "Whether an optimizer primitive takes a group in one call."},
    {"_cuda_launch_plan", pyops::py_cuda_launch_plan, METH_VARARGS, "The CUDA launches of an op for given sizes."},
    {"_fma_peak", pyops::py_fma_peak, METH_VARARGS, "GFLOP/s of register-only vector FMAs on n threads."},
    {"_cross_entropy_weight_total", pyops::py_cross_entropy_weight_total, METH_VARARGS, "A mean's weight total."},
    {nullptr, nullptr, 0, nullptr}};

struct PyModuleDef pyops_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&pyops_module);
  if (m == nullptr) return nullptr;
  if (pyops::add_functional(m) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  PyModule_AddIntConstant(m, "WITH_CUDA", PYOPS_WITH_CUDA);
#define PYOPS_STR2(x) #x
#define PYOPS_STR(x) PYOPS_STR2(x)
  PyModule_AddStringConstant(m, "CPU_CAPABILITY", PYOPS_STR(CPU_CAPABILITY));
  // PRIMITIVES: ((native name, triton name), ...), so that Python never derives one from the other.
  PyObject* prims = PyList_New(0);
#define PYOPS_LIST_PRIMITIVE(native, triton, signature)     \
  {                                                         \
    PyObject* pair = Py_BuildValue("(ss)", native, triton); \
    PyList_Append(prims, pair);                             \
    Py_DECREF(pair);                                        \
  }
  PYOPS_PRIMITIVES(PYOPS_LIST_PRIMITIVE)
#undef PYOPS_LIST_PRIMITIVE
  PyModule_AddObject(m, "PRIMITIVES", PyList_AsTuple(prims));
  Py_DECREF(prims);
  // AUTO_MIN_NUMEL: op -> the CPU size below which `auto` runs torch (csrc/common/backend.h).
  PyObject* crossovers = PyDict_New();
#define PYOPS_EXPORT_AUTO_MIN(op, n)              \
  {                                               \
    PyObject* value = PyLong_FromLongLong(n);     \
    PyDict_SetItemString(crossovers, #op, value); \
    Py_DECREF(value);                             \
  }
  PYOPS_AUTO_MIN_NUMEL(PYOPS_EXPORT_AUTO_MIN)
#undef PYOPS_EXPORT_AUTO_MIN
  PyModule_AddObject(m, "AUTO_MIN_NUMEL", crossovers);
  // AUTO_CUDA: op -> (rule, reason), the CUDA table of `auto` (csrc/common/backend.h).
  PyObject* cuda_rules = PyDict_New();
#define PYOPS_EXPORT_AUTO_CUDA(op, rule, why)              \
  {                                                        \
    PyObject* row = Py_BuildValue("(ss)", #rule + 1, why); \
    PyDict_SetItemString(cuda_rules, #op, row);            \
    Py_DECREF(row);                                        \
  }
  PYOPS_AUTO_CUDA(PYOPS_EXPORT_AUTO_CUDA)
#undef PYOPS_EXPORT_AUTO_CUDA
  PyModule_AddObject(m, "AUTO_CUDA", cuda_rules);
  // BACKENDS: names in id order (csrc/common/backend.h).
  PyModule_AddObject(m, "BACKENDS", Py_BuildValue("(ssss)", "auto", "native", "triton", "torch"));
  return m;
}
