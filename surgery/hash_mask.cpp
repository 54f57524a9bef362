// Fused CPU kernel of dropwise's counter-based dropout masks (see dropwise/surgery/hash_kernel.py).
//
// Bit-identical to the torch path of dropwise.surgery.masks: word w of a row with site key k is
// lowbias32(k ^ codes[w]) (Wellons' 32-bit hash); position 2w is decided by its low 16 bits, position
// 2w + 1 by its high 16 bits; a position is kept when its 16-bit value u >= thr and then gets `scale`,
// else 0. `hash_product` multiplies the activation by that factor in the same pass.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>

namespace {

inline uint32_t mix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352dU;
  h ^= h >> 15;
  h *= 0x846ca68bU;
  h ^= h >> 16;
  return h;
}

template <bool WithX>
inline void row(uint32_t key, const uint32_t* codes, int64_t n_pos, uint32_t thr, float scale,
                const float* x, float* out) {
  const int64_t pairs = n_pos / 2;
  for (int64_t w = 0; w < pairs; ++w) {
    const uint32_t h = mix(key ^ codes[w]);
    const float f0 = (h & 0xffffU) >= thr ? scale : 0.0f;
    const float f1 = (h >> 16) >= thr ? scale : 0.0f;
    out[2 * w] = WithX ? x[2 * w] * f0 : f0;
    out[2 * w + 1] = WithX ? x[2 * w + 1] * f1 : f1;
  }
  if (n_pos & 1) {
    const uint32_t h = mix(key ^ codes[pairs]);
    const float f0 = (h & 0xffffU) >= thr ? scale : 0.0f;
    out[n_pos - 1] = WithX ? x[n_pos - 1] * f0 : f0;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void factors_rows(const uint32_t* keys, int64_t n, const uint32_t* codes, int64_t n_pos, uint32_t thr,
                  float scale, float* out) {
  for (int64_t r = 0; r < n; ++r) row<false>(keys[r], codes, n_pos, thr, scale, nullptr, out + r * n_pos);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void product_rows(const uint32_t* keys, int64_t n, const uint32_t* codes, int64_t n_pos, uint32_t thr,
                  float scale, const float* x, float* out) {
  for (int64_t r = 0; r < n; ++r) row<true>(keys[r], codes, n_pos, thr, scale, x + r * n_pos, out + r * n_pos);
}

void check(const at::Tensor& keys, const at::Tensor& codes, int64_t n_pos, int64_t thr) {
  TORCH_CHECK(keys.device().is_cpu() && keys.scalar_type() == at::kInt && keys.is_contiguous() && keys.dim() == 1,
              "keys: contiguous int32 [N] on the CPU");
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kInt && codes.is_contiguous() &&
                  codes.numel() == (n_pos + 1) / 2,
              "codes: contiguous int32 [(P + 1) / 2] on the CPU");
  TORCH_CHECK(thr > 0 && thr < 65536, "thr must be in (0, 65536)");
}

at::Tensor hash_factors(const at::Tensor& keys, const at::Tensor& codes, int64_t n_pos, int64_t thr, double scale) {
  check(keys, codes, n_pos, thr);
  at::Tensor out = at::empty({keys.size(0), n_pos}, keys.options().dtype(at::kFloat));
  factors_rows(reinterpret_cast<const uint32_t*>(keys.data_ptr<int32_t>()), keys.size(0),
               reinterpret_cast<const uint32_t*>(codes.data_ptr<int32_t>()), n_pos, static_cast<uint32_t>(thr),
               static_cast<float>(scale), out.data_ptr<float>());
  return out;
}

at::Tensor hash_product(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& codes, int64_t thr,
                        double scale) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 &&
                  x.size(0) == keys.size(0),
              "x: contiguous float32 [N, P] on the CPU");
  const int64_t n_pos = x.size(1);
  check(keys, codes, n_pos, thr);
  at::Tensor out = at::empty({x.size(0), n_pos}, x.options());
  product_rows(reinterpret_cast<const uint32_t*>(keys.data_ptr<int32_t>()), keys.size(0),
               reinterpret_cast<const uint32_t*>(codes.data_ptr<int32_t>()), n_pos, static_cast<uint32_t>(thr),
               static_cast<float>(scale), x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY(dropwise_kernels, m) {
  m.def("hash_factors(Tensor keys, Tensor codes, int n_pos, int thr, float scale) -> Tensor");
  m.def("hash_product(Tensor x, Tensor keys, Tensor codes, int thr, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(dropwise_kernels, CPU, m) {
  m.impl("hash_factors", &hash_factors);
  m.impl("hash_product", &hash_product);
}
