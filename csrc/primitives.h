// Every primitive op: (native name, Triton twin's name, schema). csrc/ops.cpp defines both from the
// one schema; pyops._C.PRIMITIVES lists the pairs for Python. Forward and backward are separate ops;
// in-place forwards end in "_" and return what they save.
#pragma once

// clang-format off
#define PYOPS_PRIMITIVES(X)                                                                            \
  /* ---- activation: masked ops return (out, mask): bit (i % 8) of byte i / 8 says whether the     \
     gradient flows unchanged at element i (relu: !(x <= 0), leaky_relu: x > 0), elements taken in   \
     out's memory order; *_bwd wants grad_out laid out as out was. */                                \
  X("relu_fwd", "relu_fwd_triton", "(Tensor self) -> (Tensor, Tensor)")                             \
  X("relu_fwd_", "relu_fwd_triton_", "(Tensor(a!) self) -> Tensor")                                 \
  X("relu_bwd", "relu_bwd_triton", "(Tensor grad_out, Tensor mask) -> Tensor")                      \
  X("leaky_relu_fwd", "leaky_relu_fwd_triton", "(Tensor self, float negative_slope) -> (Tensor, Tensor)") \
  X("leaky_relu_fwd_", "leaky_relu_fwd_triton_", "(Tensor(a!) self, float negative_slope) -> Tensor") \
  X("leaky_relu_bwd", "leaky_relu_bwd_triton", "(Tensor grad_out, Tensor mask, float negative_slope) -> Tensor") \
  X("elu_fwd", "elu_fwd_triton", "(Tensor self, float alpha) -> Tensor")                            \
  X("elu_fwd_", "elu_fwd_triton_", "(Tensor(a!) self, float alpha) -> ()")                          \
  /* saved is the output (is_result) or the input of the forward, as torch's elu_backward */         \
  X("elu_bwd", "elu_bwd_triton", "(Tensor grad_out, Tensor saved, float alpha, bool is_result) -> Tensor") \
  X("sigmoid_fwd", "sigmoid_fwd_triton", "(Tensor self) -> Tensor")                                 \
  X("sigmoid_bwd", "sigmoid_bwd_triton", "(Tensor grad_out, Tensor out) -> Tensor")                 \
  X("tanh_fwd", "tanh_fwd_triton", "(Tensor self) -> Tensor")                                       \
  X("tanh_bwd", "tanh_bwd_triton", "(Tensor grad_out, Tensor out) -> Tensor")                       \
  /* maxout returns (out, indices): indices (uint8, out's shape) of the first maximal piece */       \
  X("maxout_fwd", "maxout_fwd_triton", "(Tensor self, int pieces, int dim) -> (Tensor, Tensor)")    \
  X("maxout_bwd", "maxout_bwd_triton", "(Tensor grad_out, Tensor indices, int pieces, int dim) -> Tensor") \
  /* ---- optim: one call updates every tensor of a (device, dtype) group in place (csrc/optim.h).  \
     Lists run in parallel (state lists empty where an option needs no state). grad_scale: the      \
     gradients are divided by it and written back unscaled; found_inf != 0: nothing is touched. lr, \
     grad_scale and found_inf are one-element float32/float64 tensors on the parameters' device;    \
     steps are one-element float32/float64 tensors there, incremented by the step. new_buffers (SGD):\
     empty, or per parameter a one-element bool/uint8 flag: the buffer is new and starts as the     \
     gradient; the step clears the flags it applied (none when found_inf is set).                   \
     bf16_stochastic_round: bfloat16 parameters take their new value rounded stochastically, the     \
     random bits hashed from (seed, tensor index, element index) (csrc/common/stochastic_round.h). */ \
  X("sgd_step_", "sgd_step_triton_",                                                                \
    "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor lr, "          \
    "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "            \
    "Tensor(d!)[] new_buffers, Tensor? grad_scale, Tensor? found_inf, "                              \
    "bool bf16_stochastic_round=False, int seed=0) -> ()")                                           \
  X("adam_step_", "adam_step_triton_",                                                              \
    "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "   \
    "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, Tensor lr, float beta1, float beta2, "        \
    "float weight_decay, float eps, bool amsgrad, bool maximize, bool decoupled, Tensor? grad_scale, " \
    "Tensor? found_inf, bool bf16_stochastic_round=False, int seed=0) -> ()")                        \
  /* 8-bit Adam/AdamW (csrc/optim.h, Adam8bitStep): exp_avgs/exp_avg_sqs are uint8 codes shaped and \
     strided as their parameter, the absmaxs float32 with one value per block of block_size (256)   \
     elements in memory order; state = qmap[code] * absmax (qmap_signed for exp_avg, qmap_unsigned   \
     for exp_avg_sq: 256 sorted float32 values each); requantized against each block's new absmax. */ \
  X("adam_step_8bit_", "adam_step_8bit_triton_",                                                    \
    "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "   \
    "Tensor(e!)[] exp_avg_absmaxs, Tensor(f!)[] exp_avg_sq_absmaxs, Tensor(g!)[] steps, "           \
    "Tensor qmap_signed, Tensor qmap_unsigned, int block_size, Tensor lr, float beta1, float beta2, " \
    "float weight_decay, float eps, bool maximize, bool decoupled, Tensor? grad_scale, "            \
    "Tensor? found_inf) -> ()")                                                                      \
  X("adagrad_step_", "adagrad_step_triton_",                                                        \
    "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] sums, Tensor(d!)[] steps, Tensor lr, "  \
    "float lr_decay, float weight_decay, float eps, bool maximize, Tensor? grad_scale, "             \
    "Tensor? found_inf, bool bf16_stochastic_round=False, int seed=0) -> ()")                        \
  X("rmsprop_step_", "rmsprop_step_triton_",                                                        \
    "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, Tensor(d!)[] grad_avgs, "  \
    "Tensor(e!)[] momentum_buffers, Tensor(f!)[] steps, Tensor lr, float alpha, float eps, "         \
    "float weight_decay, float momentum, bool centered, bool maximize, Tensor? grad_scale, "         \
    "Tensor? found_inf, bool bf16_stochastic_round=False, int seed=0) -> ()")                        \
  /* ---- batch_norm (csrc/batch_norm.h): statistics per channel (mean, biased variance; op-math       \
     dtype); out = act((x - mean) * invstd * w + b + r); backward reduction: sum(dz), sum(dz * xhat) and \
     dr = dz when grad_residual (else an empty tensor); backward elementwise: dx, with mean_dz and       \
     mean_dz_xhat given in training (none in eval). input=None: the output is saved instead           \
     (memory-efficient form). activation: none, relu, leaky_relu, elu; param: its slope or alpha. */    \
  X("batch_norm_stats", "batch_norm_stats_triton", "(Tensor input) -> (Tensor, Tensor)")             \
  X("batch_norm_elemt", "batch_norm_elemt_triton",                                                  \
    "(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, "    \
    "str activation, float param) -> Tensor")                                                        \
  X("batch_norm_bwd_reduce", "batch_norm_bwd_reduce_triton",                                        \
    "(Tensor grad_out, Tensor? input, Tensor? output, Tensor? residual, Tensor mean, Tensor invstd, " \
    "Tensor? weight, Tensor? bias, str activation, float param, bool grad_residual) -> "              \
    "(Tensor, Tensor, Tensor)")                                                                      \
  X("batch_norm_bwd_elemt", "batch_norm_bwd_elemt_triton",                                          \
    "(Tensor grad_out, Tensor? input, Tensor? output, Tensor? residual, Tensor mean, Tensor invstd, " \
    "Tensor? weight, Tensor? bias, Tensor? mean_dz, Tensor? mean_dz_xhat, str activation, "          \
    "float param) -> Tensor")                                                                        \
  /* both backward passes in training: (dx, sum(dz), sum(dz * xhat), dr or empty) */                  \
  X("batch_norm_bwd", "batch_norm_bwd_triton",                                                      \
    "(Tensor grad_out, Tensor? input, Tensor? output, Tensor? residual, Tensor mean, Tensor invstd, " \
    "Tensor? weight, Tensor? bias, str activation, float param, bool grad_residual) -> "              \
    "(Tensor, Tensor, Tensor, Tensor)")                                                              \
  /* ---- loss (csrc/loss.h): kind 0 l1, 1 mse, 2 huber; reduction 0 none, 1 mean, 2 sum (torch's).   \
     *_fwd return (loss, grad): with grad and a reduction, grad = d loss / d input, computed in the   \
     same pass (input's layout; cross_entropy: input's shape); else an empty tensor. */              \
  X("pointwise_loss_fwd", "pointwise_loss_fwd_triton",                                              \
    "(Tensor input, Tensor target, int kind, int reduction, float delta, bool grad) -> (Tensor, Tensor)") \
  X("pointwise_loss_bwd", "pointwise_loss_bwd_triton",                                              \
    "(Tensor grad_out, Tensor input, Tensor target, int kind, float delta) -> Tensor")               \
  X("cross_entropy_fwd", "cross_entropy_fwd_triton",                                                \
    "(Tensor input, Tensor target, Tensor? weight, int ignore_index, int reduction, "                \
    "float label_smoothing, bool grad) -> (Tensor, Tensor)")                                         \
  /* ---- conv: 2-d convolution, any groups (csrc/conv.h). conv2d_fwd applies bias and the activation \
     (0 none, 1 relu, 2 leaky_relu with negative_slope = scalar, 3 elu with alpha = scalar; scalar  \
     >= 0) in its epilogue and returns (out, mask): for relu/leaky_relu the 1-bit mask of the       \
     activation family (out's memory order), else an empty uint8 tensor. conv2d_bwd_weight returns  \
     (grad_weight, grad_bias), grad_bias empty unless bias. */                                      \
  X("conv2d_fwd", "conv2d_fwd_triton",                                                              \
    "(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "  \
    "int groups, int activation, float scalar) -> (Tensor, Tensor)")                                 \
  /* out = conv(x, w) + bias with its per-channel mean and biased variance (float32, float64 for  \
     float64 input), for a batch norm that follows in training */                                  \
  X("conv2d_fwd_stats", "conv2d_fwd_stats_triton",                                                  \
    "(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "  \
    "int groups) -> (Tensor, Tensor, Tensor)")                                                       \
  X("conv2d_bwd_input", "conv2d_bwd_input_triton",                                                  \
    "(Tensor grad_out, Tensor weight, SymInt[] input_size, int[2] stride, int[2] padding, "         \
    "int[2] dilation, int groups) -> Tensor")                                                        \
  X("conv2d_bwd_weight", "conv2d_bwd_weight_triton",                                                \
    "(Tensor grad_out, Tensor input, SymInt[] weight_size, int[2] stride, int[2] padding, "         \
    "int[2] dilation, int groups, bool bias) -> (Tensor, Tensor)")
// clang-format on
