// The fused epilogues' activation codes, in the order of alt_jax/ops/epilogue.py ACTIVATIONS:
// one list for the CPU templates (epilogue.h) and the CUDA ones (cuda_block.h).
#ifndef ALT_JAX_ACTIVATION_CODES_H_
#define ALT_JAX_ACTIVATION_CODES_H_

#define ALT_ACT_NONE 0
#define ALT_ACT_RELU 1
#define ALT_ACT_RELU6 2
#define ALT_ACT_GELU_TANH 3
#define ALT_ACT_GELU_ERF 4
#define ALT_ACT_SILU 5

#endif  // ALT_JAX_ACTIVATION_CODES_H_
