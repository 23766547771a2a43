// What every CUDA template's kernel shares around its own block function: the buffers it is
// called with, the fused epilogue, the split-K finishing pass, and the two entry points
// (the launcher nvcc builds, the emulation the host compiler builds).
//
// A template defines, in an anonymous namespace, `block_main(blk, x)` for its Tile's blocks
// and, when it splits K, `finish_main(blk, x)` (alt_cuda_finish does the work), then
// expands ALT_CUDA_ENTRY(SYMBOL, Thread, Shared, THREADS, GX, GY, GZ, FINISH_ELEMENTS)
// after the namespace (FINISH_ELEMENTS = 0: no finishing pass).
// Entry points: AltCudaBuffers, alt_cuda_buffers<...>, alt_cuda_epilogue<...>,
// alt_cuda_finish<...>, ALT_CUDA_ENTRY.
#ifndef ALT_JAX_CUDA_ENTRY_H_
#define ALT_JAX_CUDA_ENTRY_H_

#include "alt_jax/cuda_block.h"

// inputs: the operand, the weights, then the epilogue's scale, shift, residual (those it
// has); outputs: the result, then the split-K workspace when there is one
struct AltCudaBuffers {
  const float* in;
  const float* w;
  const float* scale;
  const float* shift;
  const float* res;
  float* out;
  float* ws;
};

template <bool SCALE, bool SHIFT, bool RESIDUAL, bool WORKSPACE>
inline AltCudaBuffers alt_cuda_buffers(const void* const* inputs, void* const* outputs) {
  constexpr int I_SCALE = 2, I_SHIFT = I_SCALE + SCALE, I_RES = I_SHIFT + SHIFT;
  return AltCudaBuffers{static_cast<const float*>(inputs[0]), static_cast<const float*>(inputs[1]),
                        SCALE ? static_cast<const float*>(inputs[I_SCALE]) : nullptr,
                        SHIFT ? static_cast<const float*>(inputs[I_SHIFT]) : nullptr,
                        RESIDUAL ? static_cast<const float*>(inputs[I_RES]) : nullptr,
                        static_cast<float*>(outputs[0]),
                        WORKSPACE ? static_cast<float*>(outputs[1]) : nullptr};
}

// y of output channel c (of `channels`) stored at element `at` (of out_size): scale, shift,
// residual at the same element, activation
template <int ACT, bool SCALE, bool SHIFT, bool RESIDUAL, typename Blk>
ALT_DEV float alt_cuda_epilogue(Blk& blk, const AltCudaBuffers& x, float y, int64_t c,
                                int64_t channels, int64_t at, int64_t out_size) {
  if constexpr (SCALE) y = y * ALT_GLD(blk, x.scale, c, channels);
  if constexpr (SHIFT) y = y + ALT_GLD(blk, x.shift, c, channels);
  if constexpr (RESIDUAL) y = y + ALT_GLD(blk, x.res, at, out_size);
  return alt_cuda_activate<ACT>(y);
}

// The split-K finishing pass, one thread per element e of `partials` (each slice's partial
// results, slice after slice in the workspace): their sum goes to store(e, y).
constexpr int ALT_CUDA_FINISH_THREADS = 256;
struct AltCudaFinishShared {
  float unused[1];
};
struct AltCudaFinishThread {
  float unused;
};

template <int SPLIT_K, typename Blk, typename Store>
ALT_DEV void alt_cuda_finish(Blk& blk, const AltCudaBuffers& x, int64_t partials, Store&& store) {
  blk.each([&](AltCudaFinishThread&, int tid) {
    const int64_t e = blk.bx * ALT_CUDA_FINISH_THREADS + tid;
    if (e >= partials) return;
    float y = 0.0f;
    for (int s = 0; s < SPLIT_K; ++s) y += ALT_GLD(blk, x.ws, s * partials + e, SPLIT_K * partials);
    store(e, y);
  });
}

#if defined(__CUDACC__)
#define ALT_CUDA_ENTRY(SYMBOL, THREAD, SHARED, NT, GX, GY, GZ, FINISH_ELEMENTS)              \
  namespace {                                                                                \
  __global__ void __launch_bounds__(NT) alt_main_kernel(AltCudaBuffers x) {                   \
    __shared__ SHARED sh;                                                                    \
    alt_block<THREAD, SHARED, NT> blk(sh);                                                   \
    block_main(blk, x);                                                                      \
  }                                                                                          \
  __global__ void __launch_bounds__(ALT_CUDA_FINISH_THREADS) alt_finish_kernel(AltCudaBuffers x) { \
    __shared__ AltCudaFinishShared sh;                                                       \
    alt_block<AltCudaFinishThread, AltCudaFinishShared, ALT_CUDA_FINISH_THREADS> blk(sh);    \
    if constexpr ((FINISH_ELEMENTS) > 0) finish_main(blk, x);                                \
  }                                                                                          \
  }                                                                                          \
  /* The launcher the CUDA FFI handler calls; returns the launch's cudaError_t (0: ok). */   \
  extern "C" __attribute__((visibility("default"))) int32_t SYMBOL##_launch(                 \
      void* stream, const void* const* inputs, void* const* outputs) {                       \
    const AltCudaBuffers x = buffers(inputs, outputs);                                       \
    cudaStream_t s = static_cast<cudaStream_t>(stream);                                      \
    alt_main_kernel<<<dim3(GX, GY, GZ), NT, 0, s>>>(x);                                      \
    if constexpr ((FINISH_ELEMENTS) > 0)                                                     \
      alt_finish_kernel<<<((FINISH_ELEMENTS) + ALT_CUDA_FINISH_THREADS - 1) /                \
                              ALT_CUDA_FINISH_THREADS,                                       \
                          ALT_CUDA_FINISH_THREADS, 0, s>>>(x);                               \
    return static_cast<int32_t>(cudaGetLastError());                                         \
  }
#else
// The emulation, a host kernel of the alt_runtime ABI (kernel_abi.h): blocks spread over the
// runtime's threads, each block's threads in turn; returns ALT_CUDA_RACE or
// ALT_CUDA_OUT_OF_BOUNDS when the kernel raced on shared memory or left its buffers.
#define ALT_CUDA_ENTRY(SYMBOL, THREAD, SHARED, NT, GX, GY, GZ, FINISH_ELEMENTS)              \
  ALT_EXPORT int32_t SYMBOL(const alt_runtime* rt, const void* const* inputs,                 \
                            void* const* outputs) {                                          \
    const AltCudaBuffers x = buffers(inputs, outputs);                                       \
    int err = alt_emulate_grid<THREAD, SHARED, NT>(                                          \
        rt, GX, GY, GZ, [&](alt_block<THREAD, SHARED, NT>& blk) { block_main(blk, x); });    \
    if constexpr ((FINISH_ELEMENTS) > 0) {                                                   \
      if (err == ALT_CUDA_OK)                                                                \
        err = alt_emulate_grid<AltCudaFinishThread, AltCudaFinishShared,                     \
                               ALT_CUDA_FINISH_THREADS>(                                     \
            rt, ((FINISH_ELEMENTS) + ALT_CUDA_FINISH_THREADS - 1) / ALT_CUDA_FINISH_THREADS, \
            1, 1,                                                                            \
            [&](alt_block<AltCudaFinishThread, AltCudaFinishShared, ALT_CUDA_FINISH_THREADS>& \
                    blk) { finish_main(blk, x); });                                          \
    }                                                                                        \
    return err;                                                                              \
  }
#endif

#endif  // ALT_JAX_CUDA_ENTRY_H_
