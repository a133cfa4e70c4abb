// pyops._C._cuda_launch_plan(op, sizes): the launch of every CUDA kernel an op runs, as the CUDA
// launchers compute it (csrc/common/launch_plan.h has the plans and the table of ops), so that tests
// and the launch-plan table need no GPU. Host code only: built with or without CUDA.
// Also _cross_entropy_weight_total(target, weight, ignore_index): the weight total the CUDA and Triton
// backends divide a mean cross entropy by (csrc/loss.h), for the tests.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <exception>
#include <string>
#include <vector>

#include "common/launch_plan.h"
#include "cuda/conv_plan.h"
#include "loss.h"

namespace pyops {
namespace {

bool as_int(PyObject* o, int64_t& out) {
  PyObject* i = PyNumber_Index(o);  // ints, bools, numpy integers; a TypeError otherwise
  if (i == nullptr) return false;
  out = PyLong_AsLongLong(i);
  Py_DECREF(i);
  return !(out == -1 && PyErr_Occurred());
}

// sizes: str -> int, bool, str, or a sequence of ints.
bool read_sizes(PyObject* dict, plan::Sizes& s) {
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(dict, &pos, &key, &value)) {
    if (!PyUnicode_Check(key)) {
      PyErr_SetString(PyExc_TypeError, "pyops._cuda_launch_plan: the keys of sizes must be strings");
      return false;
    }
    const std::string k = PyUnicode_AsUTF8(key);
    if (PyUnicode_Check(value)) {
      s.strs[k] = PyUnicode_AsUTF8(value);
    } else if (PyIndex_Check(value)) {
      int64_t v = 0;
      if (!as_int(value, v)) return false;
      s.ints[k] = {v};
    } else if (PySequence_Check(value)) {
      PyObject* seq = PySequence_Fast(value, "");
      if (seq == nullptr) return false;
      std::vector<int64_t> vs(size_t(PySequence_Fast_GET_SIZE(seq)));
      bool ok = true;
      for (size_t i = 0; ok && i < vs.size(); ++i) ok = as_int(PySequence_Fast_GET_ITEM(seq, Py_ssize_t(i)), vs[i]);
      Py_DECREF(seq);
      if (!ok) return false;
      s.ints[k] = std::move(vs);
    } else {
      PyErr_Format(PyExc_TypeError,
                   "pyops._cuda_launch_plan: sizes['%s'] must be an int, a bool, a str or a tuple of "
                   "ints, got %s",
                   k.c_str(), Py_TYPE(value)->tp_name);
      return false;
    }
  }
  return true;
}

// conv2d: shape (N, C, H, W), weight (K, C / groups, kh, kw), groups, stride, padding, dilation (ints or
// pairs), training (default true), channels_last (default false), float64 (default false), activation code
// (0 none, 1 relu, 2 leaky_relu, 3 elu; default 0). The plan is csrc/cuda/conv_plan.h's.
std::vector<plan::Launch> conv2d_plans(const plan::Sizes& s) {
  const auto& x = s.list("shape");
  const auto& w = s.list("weight");
  if (x.size() != 4 || w.size() != 4) throw std::invalid_argument("conv2d needs a 4-d shape and a 4-d weight");
  const auto pair = [&](const char* key, int64_t fallback) {
    if (!s.has(key)) return std::vector<int64_t>{fallback, fallback};
    std::vector<int64_t> v = s.list(key);
    if (v.size() == 1) v.push_back(v[0]);
    if (v.size() != 2) throw std::invalid_argument(std::string("conv2d's ") + key + " must be an int or a pair");
    return v;
  };
  conv_plan::ConvPlanOptions o;
  o.channels_last = s.get("channels_last", 0) != 0;
  o.float64 = s.get("float64", 0) != 0;
  o.act = int(s.get("activation", 0));
  ConvShape shape;
  try {
    shape = conv_shape("conv2d_cuda_plan", x, w, pair("stride", 1), pair("padding", 0), pair("dilation", 1),
                       s.get("groups", 1));
  } catch (const c10::Error& e) {
    throw std::invalid_argument(e.what_without_backtrace());
  }
  const int64_t in = shape.N * shape.C * shape.H * shape.W, out = shape.N * shape.K * shape.OH * shape.OW;
  const int64_t weight = shape.K * shape.Cg() * shape.KH * shape.KW;
  std::vector<plan::Launch> launches;
  for (plan::Launch l : conv2d_cuda_plan(shape, s.get("training", 1) != 0, o)) {
    const bool reduce = std::string(l.kernel) == "conv_reduce_partials_kernel";
    l.elements = reduce ? weight : std::max(in, out);
    if (!reduce && l.grid.x * l.grid.y * l.grid.z < conv_plan::kTargetBlocks)
      l.why =
          "by construction (csrc/cuda/conv_plan.h): one result per thread, under 2 waves only below 540K results; a "
          "split weight gradient takes at most one chunk per unit of work";
    launches.push_back(l);
  }
  return launches;
}

// Every op of launch_plan.h's table, and conv2d.
const std::map<std::string, plan::PlanFn>& known_ops() {
  static const std::map<std::string, plan::PlanFn> ops = [] {
    auto all = plan::launch_plan_ops();
    all["conv2d"] = conv2d_plans;
    return all;
  }();
  return ops;
}

PyObject* dims(const plan::Dim& d) { return Py_BuildValue("(LLL)", (long long)d.x, (long long)d.y, (long long)d.z); }

}  // namespace

PyObject* py_cuda_launch_plan(PyObject*, PyObject* args) {
  const char* op = nullptr;
  PyObject* sizes = nullptr;
  if (!PyArg_ParseTuple(args, "sO!", &op, &PyDict_Type, &sizes)) return nullptr;
  const auto& ops = known_ops();
  const auto it = ops.find(op);
  if (it == ops.end()) {
    std::string known;
    for (const auto& [name, fn] : ops) known += (known.empty() ? "" : ", ") + name;
    PyErr_Format(PyExc_ValueError, "pyops._cuda_launch_plan: unknown op '%s' (known: %s)", op, known.c_str());
    return nullptr;
  }
  plan::Sizes s;
  s.op = op;
  if (!read_sizes(sizes, s)) return nullptr;
  std::vector<plan::Launch> launches;
  try {
    launches = it->second(s);
  } catch (const std::exception& e) {
    PyErr_Format(PyExc_ValueError, "pyops._cuda_launch_plan: %s", e.what());
    return nullptr;
  }
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  for (const plan::Launch& l : launches) {
    PyObject* d = Py_BuildValue("{s:s,s:N,s:N,s:L,s:L,s:s}", "kernel", l.kernel, "grid", dims(l.grid), "block",
                                dims(l.block), "smem", (long long)l.smem, "elements", (long long)l.elements, "why",
                                l.why == nullptr ? "" : l.why);
    if (d == nullptr || PyList_Append(out, d) < 0) {
      Py_XDECREF(d);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(d);
  }
  return out;
}

PyObject* py_cross_entropy_weight_total(PyObject*, PyObject* args) {
  PyObject *t = nullptr, *w = nullptr;
  long long ignore_index = 0;
  if (!PyArg_ParseTuple(args, "OOL", &t, &w, &ignore_index)) return nullptr;
  if (!THPVariable_Check(t) || !THPVariable_Check(w)) {
    PyErr_SetString(PyExc_TypeError, "pyops._cross_entropy_weight_total: target and weight must be tensors");
    return nullptr;
  }
  try {
    const at::Tensor& weight = THPVariable_Unpack(w);
    return THPVariable_Wrap(
        target_weight_total(THPVariable_Unpack(t), ignore_index, weight, at::toOpMathType(weight.scalar_type())));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

}  // namespace pyops
