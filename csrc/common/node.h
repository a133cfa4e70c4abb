#pragma once
// Hand-written autograd nodes, as torch's generated derivatives are: a forward records one node on its
// output, holding what backward needs. A torch::autograd::Function costs several microseconds more a
// call in bookkeeping (context, saved-data map, output wrapping), which on small tensors is more than
// the kernels; the nodes built here cost what torch's own do, and functorch (torch.func) accepts them where
// it refuses C++ torch::autograd::Functions outright. Works with both node handle types
// (std::shared_ptr up to torch 2.11, c10::intrusive_ptr later).
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

namespace pyops {

using torch::autograd::Edge;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using NodePtr = decltype(std::declval<Node&>().getptr());

// f() below autograd: what a recorded forward calls the primitive under, and what an Autograd kernel
// does when nothing is recorded (PYOPS_BELOW_AUTOGRAD returns from the kernel).
template <class F>
auto below_autograd(F&& f) {
  at::AutoDispatchBelowADInplaceOrView below;
  return f();
}
// An incoming gradient g brought to the strides a backward kernel walks (the memory order a mask's bits
// or a saved tensor were recorded in). new_empty_strided: a functorch-wrapped g (torch.func) gets a
// wrapped copy, never a plain tensor written from a wrapped one.
inline at::Tensor to_layout(const at::Tensor& g, c10::SymIntArrayRef strides) {
  if (g.sym_strides() == strides) return g;
  return g.new_empty_strided_symint(g.sym_sizes(), strides).copy_(g);
}

// ---- what a recorded derivative needs to know about its operands --------------------------------------
inline bool requires_graph(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_graph(const std::optional<at::Tensor>& t) { return t.has_value() && requires_graph(*t); }

// Whether a result computed from these must record a graph of its own (a recorded forward, or a backward
// under create_graph=True).
template <class... T>
bool graph_of(const T&... t) {
  return at::GradMode::is_enabled() && (requires_graph(t) || ...);
}

// ---- forward-mode AD (dual tensors, torch.func.jvp, jacfwd), as torch's generated kernels do it: an
// Autograd kernel whose operand carries a tangent (level 0; each functorch level sees its own here)
// computes its results' tangents from the operands' (an absent one is zero) with differentiable ops, and
// attaches them. A tangent formula reads the operands' primals.
inline at::Tensor tangent(const at::Tensor& t) { return t.defined() ? t._fw_grad(/*level=*/0) : at::Tensor(); }
inline at::Tensor tangent(const std::optional<at::Tensor>& t) { return t.has_value() ? tangent(*t) : at::Tensor(); }

template <class... T>
bool has_tangent(const T&... t) {
  return (tangent(t).defined() || ...);
}

// Whether a result computed from these must carry derivatives: a graph, or a tangent.
template <class... T>
bool differentiable(const T&... t) {
  return graph_of(t...) || has_tangent(t...);
}

// t without its tangent (t itself where it has none).
inline at::Tensor primal(const at::Tensor& t) { return tangent(t).defined() ? t._fw_primal(/*level=*/0) : t; }

// a + b for tangents, either of which may be absent (zero).
inline at::Tensor add_tangents(const at::Tensor& a, const at::Tensor& b) {
  return !a.defined() ? b : !b.defined() ? a : a + b;
}

// out, a new result, gets tangent t (none when t is absent). Set it before out is saved for backward: a
// saved output keeps the tangent it had then.
inline void set_tangent(const at::Tensor& out, const at::Tensor& t) {
  if (t.defined()) out._set_fw_grad(t, /*level=*/0, /*is_inplace_op=*/false);
}

// x, changed in place, gets tangent t, written into x's own tangent as torch's in-place ops do (views of x
// and its base see it).
inline void set_tangent_inplace(const at::Tensor& x, const at::Tensor& t) {
  at::Tensor own = tangent(x);
  if (own.defined()) {
    own.copy_(t);
  } else {
    own = t;
  }
  x._set_fw_grad(own, /*level=*/0, /*is_inplace_op=*/true);
}

#define PYOPS_BELOW_AUTOGRAD(call)              \
  do {                                          \
    at::AutoDispatchBelowADInplaceOrView below; \
    return call;                                \
  } while (0)

template <class T, class... Args>
auto make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

// out, a new result computed from `inputs`, gets `node` as its history.
template <class P, class... Inputs>
void record(const P& node, const at::Tensor& out, const Inputs&... inputs) {
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  torch::autograd::set_history(out, NodePtr(node));
}

// Before x is changed in place under a recorded op: torch's checks (leaf, views of leaves).
inline void check_inplace(const at::Tensor& x) { torch::autograd::check_inplace(x, /*requires_grad=*/true); }

// After x was changed in place (below autograd): its version moves on and `node` becomes its history
// (for a view, wrapped by torch in the base's CopySlices).
template <class P>
void record_inplace(const P& node, const at::Tensor& x) {
  node->set_next_edges(torch::autograd::collect_next_edges(x));
  torch::autograd::impl::bump_version(x);
  torch::autograd::rebase_history(x, NodePtr(node));
}

}  // namespace pyops
