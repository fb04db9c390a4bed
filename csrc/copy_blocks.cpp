// Batched KV block copy between paged layer tensors and a layer-major host
// staging buffer: the `native` copy backend of cwm (cwm_connector/native_ext.py).
//
// Geometry (bytes), shared by every layer of one call: a block of a layer is
// `outer` runs of `inner` contiguous bytes; run o of block b starts at
// paged_base + o * outer_stride + b * block_stride. Row i of the staging region
// holds block ids[i] as its runs back to back: host_base + i * row + o * inner.
// `word` is the widest access (16/8/4/2/1 bytes) that every value and base allows.
// This file defines the op and its CPU kernel (memcpy per run, in parallel);
// copy_blocks_cuda.cu adds the CUDA kernel when the extension is built with CUDA.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

void copy_blocks_cpu(const at::Tensor& paged_bases, const at::Tensor& host_bases,
                     const at::Tensor& ids, int64_t outer, int64_t outer_stride,
                     int64_t block_stride, int64_t inner, int64_t row, int64_t word,
                     bool gather) {
  (void)word;  // memcpy needs no alignment
  TORCH_CHECK(paged_bases.scalar_type() == at::kLong && host_bases.scalar_type() == at::kLong,
              "base tables must be int64");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "block ids must be int64");
  TORCH_CHECK(paged_bases.is_contiguous() && host_bases.is_contiguous() && ids.is_contiguous(),
              "tables must be contiguous");
  TORCH_CHECK(paged_bases.numel() == host_bases.numel(), "one paged and one host base per layer");
  const int64_t num_layers = paged_bases.numel();
  const int64_t num = ids.numel();
  const int64_t* paged = paged_bases.data_ptr<int64_t>();
  const int64_t* host = host_bases.data_ptr<int64_t>();
  const int64_t* block = ids.data_ptr<int64_t>();
  const int64_t total = num_layers * num * outer;
  // One task per run; runs are tens of KiB, so the grain keeps tasks coarse.
  at::parallel_for(0, total, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t layer = task / (num * outer);
      const int64_t rest = task % (num * outer);
      const int64_t i = rest / outer;
      const int64_t o = rest % outer;
      auto* p = reinterpret_cast<char*>(paged[layer] + o * outer_stride + block[i] * block_stride);
      auto* h = reinterpret_cast<char*>(host[layer] + i * row + o * inner);
      if (gather) {
        std::memcpy(h, p, inner);
      } else {
        std::memcpy(p, h, inner);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(cwm_ext, m) {
  m.def(
      "copy_blocks(Tensor paged_bases, Tensor host_bases, Tensor ids, int outer, "
      "int outer_stride, int block_stride, int inner, int row, int word, bool gather) -> ()");
}

TORCH_LIBRARY_IMPL(cwm_ext, CPU, m) { m.impl("copy_blocks", &copy_blocks_cpu); }
