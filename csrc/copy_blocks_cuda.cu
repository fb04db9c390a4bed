// CUDA kernel of cwm_ext::copy_blocks (see copy_blocks.cpp for the geometry).
// One thread block per (block, run) and layer; the staging side may be pinned
// host memory (addressed through UVA) or device memory.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;

template <typename Word>
__global__ void copy_blocks_kernel(const int64_t* __restrict__ paged_bases,
                                   const int64_t* __restrict__ host_bases,
                                   const int64_t* __restrict__ ids, int64_t outer,
                                   int64_t outer_stride, int64_t block_stride, int64_t inner,
                                   int64_t row, bool gather) {
  const int64_t run = blockIdx.x;
  const int64_t layer = blockIdx.y;
  const int64_t i = run / outer;
  const int64_t o = run % outer;
  Word* paged = reinterpret_cast<Word*>(paged_bases[layer]) + o * outer_stride + ids[i] * block_stride;
  Word* host = reinterpret_cast<Word*>(host_bases[layer]) + i * row + o * inner;
  const Word* src = gather ? paged : host;
  Word* dst = gather ? host : paged;
  for (int64_t j = threadIdx.x; j < inner; j += blockDim.x) {
    dst[j] = src[j];
  }
}

template <typename Word>
void launch(const at::Tensor& paged_bases, const at::Tensor& host_bases, const at::Tensor& ids,
            int64_t outer, int64_t outer_stride, int64_t block_stride, int64_t inner, int64_t row,
            bool gather) {
  const int64_t w = sizeof(Word);
  const dim3 grid(static_cast<unsigned>(ids.numel() * outer),
                  static_cast<unsigned>(paged_bases.numel()));
  auto stream = at::cuda::getCurrentCUDAStream();
  copy_blocks_kernel<Word><<<grid, kThreads, 0, stream>>>(
      paged_bases.data_ptr<int64_t>(), host_bases.data_ptr<int64_t>(), ids.data_ptr<int64_t>(),
      outer, outer_stride / w, block_stride / w, inner / w, row / w, gather);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void copy_blocks_cuda(const at::Tensor& paged_bases, const at::Tensor& host_bases,
                      const at::Tensor& ids, int64_t outer, int64_t outer_stride,
                      int64_t block_stride, int64_t inner, int64_t row, int64_t word,
                      bool gather) {
  TORCH_CHECK(paged_bases.is_cuda() && host_bases.is_cuda() && ids.is_cuda(),
              "tables and ids must be CUDA tensors");
  TORCH_CHECK(paged_bases.scalar_type() == at::kLong && host_bases.scalar_type() == at::kLong &&
                  ids.scalar_type() == at::kLong,
              "tables and ids must be int64");
  TORCH_CHECK(paged_bases.numel() == host_bases.numel(), "one paged and one host base per layer");
  if (ids.numel() == 0 || paged_bases.numel() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(ids.device());
  switch (word) {
    case 16:
      launch<uint4>(paged_bases, host_bases, ids, outer, outer_stride, block_stride, inner, row,
                    gather);
      break;
    case 8:
      launch<uint64_t>(paged_bases, host_bases, ids, outer, outer_stride, block_stride, inner,
                       row, gather);
      break;
    case 4:
      launch<uint32_t>(paged_bases, host_bases, ids, outer, outer_stride, block_stride, inner,
                       row, gather);
      break;
    case 2:
      launch<uint16_t>(paged_bases, host_bases, ids, outer, outer_stride, block_stride, inner,
                       row, gather);
      break;
    default:
      launch<uint8_t>(paged_bases, host_bases, ids, outer, outer_stride, block_stride, inner, row,
                      gather);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(cwm_ext, CUDA, m) { m.impl("copy_blocks", &copy_blocks_cuda); }
