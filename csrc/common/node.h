#pragma once
// Hand-written autograd nodes, as torch's generated derivatives are: a forward records one node on its
// output, holding what backward needs. A torch::autograd::Function costs several microseconds more a
// call in bookkeeping (context, saved-data map, output wrapping), which on small tensors is more than
// the kernels; the nodes built here cost what torch's own do. Works with both node handle types
// (std::shared_ptr up to torch 2.11, c10::intrusive_ptr later).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <memory>
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
// or a saved tensor were recorded in).
inline at::Tensor to_layout(const at::Tensor& g, c10::SymIntArrayRef strides) {
  if (g.sym_strides() == strides) return g;
  return at::empty_strided_symint(g.sym_sizes(), strides, g.options()).copy_(g);
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
