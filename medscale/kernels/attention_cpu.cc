// Dense attention for XLA:CPU through the XLA FFI: forward and backward, float32, one (batch, head) pair
// per task on XLA's own intra-op thread pool.
//
// Why: in the compiled training step XLA:CPU runs attention as separate batched matmuls (64 small
// 256x256x64 products per layer) and elementwise passes over the [B, H, Lq, Lk] scores; at the benchmark
// shape that was ~30% of the step. Here each task keeps one head's score tile in cache from the QK^T
// product through the softmax to the PV product (docs/model.md, "Speed").
//
// Layouts (row-major): q [B, Lq, H, D] (already multiplied by 1/sqrt(D)), k and v [B, Lk, H, D],
// bias [B, Lb, Lk] with Lb == 1 (one bias per key) or Lb == Lq, rows [B, Lq] (1 where a query has an
// allowed key, else 0). Forward returns o [B, Lq, H, D] and the probabilities p [B, H, Lq, Lk] (the
// backward's only Lq x Lk residual). Backward takes q, k, v, p, o, do and returns dq (already multiplied by
// 1/sqrt(D)), dk, dv. Same equations as attention._fused: dV = P^T dO, dP = dO V^T,
// dS = P (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q.
//
// The backward visits query rows in blocks of kRowBlock, so its scratch is kRowBlock x Lk per task at any
// length (dK and dV accumulate over the blocks). Every task writes only its own head's outputs and the work
// split is fixed, so results do not depend on thread timing (bit-identical reruns).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using medscale::ParallelFor;

namespace {

// ------------------------------------------------------------------------------------------------ SIMD
// The same code for two instruction sets, chosen at compile time (-march=native): AVX-512 (16 float lanes,
// mask registers, 32 vector registers: an 8 x 32 matmul tile) or AVX2 with FMA (8 lanes, lane masks in a
// vector, 16 registers: a 6 x 16 tile). Masked loads read 0 in inactive lanes and never touch their memory.

#if defined(__AVX512F__)
using VF = __m512;
using VM = __mmask16;
constexpr int kW = 16;  // lanes
constexpr int kMR = 8;  // rows of the matmul tile
inline VM Mask(int64_t n) { return n >= kW ? VM(0xFFFF) : n <= 0 ? VM(0) : VM((1u << n) - 1); }
inline VF LoadM(VM m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline VF Load(const float* p) { return _mm512_loadu_ps(p); }
inline void StoreM(float* p, VM m, VF v) { _mm512_mask_storeu_ps(p, m, v); }
inline void Store(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF Set1(float x) { return _mm512_set1_ps(x); }
inline VF Fma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF Fnma(VF a, VF b, VF c) { return _mm512_fnmadd_ps(a, b, c); }
inline VF Add(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF Sub(VF a, VF b) { return _mm512_sub_ps(a, b); }
inline VF Mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF Max(VF a, VF b) { return _mm512_max_ps(a, b); }
inline VF Select(VM m, VF a, VF b) { return _mm512_mask_blend_ps(m, b, a); }  // m ? a : b
inline float HMax(VF v) { return _mm512_reduce_max_ps(v); }
inline float HSum(VF v) { return _mm512_reduce_add_ps(v); }
inline VM Below(VF a, VF b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline VF Round(VF x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF Pow2Times(VF p, VF n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
// lanes i < active of (src[i * ld]): one column of a row-major block
inline VF GatherColumn(VM m, const float* src, int64_t ld) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(int(ld)));
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, src, 4);
}
#elif defined(__AVX2__) && defined(__FMA__)
using VF = __m256;
using VM = __m256i;  // all-ones lanes are active
constexpr int kW = 8;
constexpr int kMR = 6;
inline VM Mask(int64_t n) {
  const int c = int(std::max<int64_t>(0, std::min<int64_t>(n, kW)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline VF LoadM(VM m, const float* p) { return _mm256_maskload_ps(p, m); }
inline VF Load(const float* p) { return _mm256_loadu_ps(p); }
inline void StoreM(float* p, VM m, VF v) { _mm256_maskstore_ps(p, m, v); }
inline void Store(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF Set1(float x) { return _mm256_set1_ps(x); }
inline VF Fma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF Fnma(VF a, VF b, VF c) { return _mm256_fnmadd_ps(a, b, c); }
inline VF Add(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF Sub(VF a, VF b) { return _mm256_sub_ps(a, b); }
inline VF Mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF Max(VF a, VF b) { return _mm256_max_ps(a, b); }
inline VF Select(VM m, VF a, VF b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }
inline float HMax(VF v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
inline float HSum(VF v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
inline VM Below(VF a, VF b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
inline VF Round(VF x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF Pow2Times(VF p, VF n) {  // p * 2^n for integral n in [-126, 127]: n into the exponent bits
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
inline VF GatherColumn(VM m, const float* src, int64_t ld) {
  const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(int(ld)));
  return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), src, idx, _mm256_castsi256_ps(m), 4);
}
#else
#error "attention_cpu.cc needs AVX-512 or AVX2 with FMA"
#endif

inline VF Zero() { return Set1(0.0f); }

// the first min(n, kW) lanes at p (0 beyond): a plain load when all lanes are in range (masked stores, and
// masked loads less so, are slow on AMD's AVX2 cores)
inline VF LoadN(const float* p, int64_t n) { return n >= kW ? Load(p) : LoadM(Mask(n), p); }
inline void StoreN(float* p, int64_t n, VF v) {
  if (n >= kW)
    Store(p, v);
  else
    StoreM(p, Mask(n), v);
}

// ------------------------------------------------------------------------------------------------ matmul

// C[R x 2kW] (+)= A[R x K] B[K x 2kW], of which the first ``cols`` columns exist (FULL: all 2kW of them,
// plain loads in the inner loop). AT: A is stored transposed (element (i, k) at A[k * lda + i]).
template <int R, bool AT, bool FULL>
inline void Micro(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                  int64_t ldc, int64_t cols, bool accumulate) {
  const VM m0 = Mask(cols), m1 = Mask(cols - kW);
  VF c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    c0[r] = Zero();
    c1[r] = Zero();
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    const VF b0 = FULL ? Load(b) : LoadM(m0, b);
    const VF b1 = FULL ? Load(b + kW) : LoadM(m1, b + kW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const VF a = Set1(AT ? A[k * lda + r] : A[r * lda + k]);
      c0[r] = Fma(a, b0, c0[r]);
      c1[r] = Fma(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* c = C + r * ldc;
    if (accumulate) {
      c0[r] = Add(c0[r], LoadN(c, cols));
      c1[r] = Add(c1[r], LoadN(c + kW, cols - kW));
    }
    StoreN(c, cols, c0[r]);
    StoreN(c + kW, cols - kW, c1[r]);
  }
}

template <int R, bool AT>
inline void MicroAny(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                     int64_t ldc, int64_t cols, bool acc) {
  if (cols >= 2 * kW)
    Micro<R, AT, true>(K, A, lda, B, ldb, C, ldc, cols, acc);
  else
    Micro<R, AT, false>(K, A, lda, B, ldb, C, ldc, cols, acc);
}

template <bool AT>
void MicroRows(int rows, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc, int64_t cols, bool acc) {
  switch (rows) {
#if defined(__AVX512F__)
    case 8: return MicroAny<8, AT>(K, A, lda, B, ldb, C, ldc, cols, acc);
    case 7: return MicroAny<7, AT>(K, A, lda, B, ldb, C, ldc, cols, acc);
#endif
    case 6: return MicroAny<6, AT>(K, A, lda, B, ldb, C, ldc, cols, acc);
    case 5: return MicroAny<5, AT>(K, A, lda, B, ldb, C, ldc, cols, acc);
    case 4: return MicroAny<4, AT>(K, A, lda, B, ldb, C, ldc, cols, acc);
    case 3: return MicroAny<3, AT>(K, A, lda, B, ldb, C, ldc, cols, acc);
    case 2: return MicroAny<2, AT>(K, A, lda, B, ldb, C, ldc, cols, acc);
    default: return MicroAny<1, AT>(K, A, lda, B, ldb, C, ldc, cols, acc);
  }
}

// C[M x N] (+)= op(A) B, B [K x N]; op(A) = A [M x K] or (AT) A^T with A [K x M].
template <bool AT>
void Gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate = false) {
  for (int64_t j = 0; j < N; j += 2 * kW) {
    for (int64_t i = 0; i < M; i += kMR) {
      const int rows = int(std::min<int64_t>(kMR, M - i));
      const float* a = AT ? A + i : A + i * lda;
      MicroRows<AT>(rows, K, a, lda, B + j, ldb, C + i * ldc + j, ldc, N - j, accumulate);
    }
  }
}

// dst [cols x rows] = src^T, src rows strided by ld: kW rows at a time, one gather per column.
void Transpose(int64_t rows, int64_t cols, const float* src, int64_t ld, float* dst) {
  for (int64_t r = 0; r < rows; r += kW) {
    const VM m = Mask(rows - r);
    const float* s = src + r * ld;
    for (int64_t c = 0; c < cols; ++c) StoreN(dst + c * rows + r, rows - r, GatherColumn(m, s + c, ld));
  }
}

// ------------------------------------------------------------------------------------------------ softmax

// exp(x) for x <= 0 (softmax arguments): 2^n * poly(r), |r| <= ln2/2, degree-7 Taylor (relative error below
// float epsilon); arguments below -87 give exactly 0, as XLA's exp of a masked score does.
inline VF Exp(VF x) {
  const VF lo = Set1(-87.0f);
  const VM tiny = Below(x, lo);
  x = Max(lo, x);
  const VF n = Round(Mul(x, Set1(1.44269504088896341f)));
  VF r = Fnma(n, Set1(0.693359375f), x);
  r = Fnma(n, Set1(-2.12194440e-4f), r);
  VF p = Set1(1.0f / 5040.0f);
  p = Fma(p, r, Set1(1.0f / 720.0f));
  p = Fma(p, r, Set1(1.0f / 120.0f));
  p = Fma(p, r, Set1(1.0f / 24.0f));
  p = Fma(p, r, Set1(1.0f / 6.0f));
  p = Fma(p, r, Set1(0.5f));
  p = Fma(p, r, Set1(1.0f));
  p = Fma(p, r, Set1(1.0f));
  return Select(tiny, Zero(), Pow2Times(p, n));
}

// row[0:n] = rowscale * softmax(row + bias)
void SoftmaxRow(float* row, const float* bias, int64_t n, float rowscale) {
  const VF ninf = Set1(-INFINITY);
  VF mx = ninf;
  for (int64_t j = 0; j < n; j += kW) {
    const VF s = Add(LoadN(row + j, n - j), LoadN(bias + j, n - j));
    StoreN(row + j, n - j, s);
    mx = Max(mx, n - j >= kW ? s : Select(Mask(n - j), s, ninf));
  }
  const VF vmax = Set1(HMax(mx));
  VF sum = Zero();
  for (int64_t j = 0; j < n; j += kW) {
    const VF e = Exp(Sub(LoadN(row + j, n - j), vmax));
    StoreN(row + j, n - j, e);
    sum = Add(sum, n - j >= kW ? e : Select(Mask(n - j), e, Zero()));
  }
  const VF f = Set1(rowscale / HSum(sum));
  for (int64_t j = 0; j < n; j += kW) StoreN(row + j, n - j, Mul(LoadN(row + j, n - j), f));
}

float Dot(const float* a, const float* b, int64_t n) {
  VF s = Zero();
  for (int64_t j = 0; j < n; j += kW) s = Fma(LoadN(a + j, n - j), LoadN(b + j, n - j), s);
  return HSum(s);
}

// ------------------------------------------------------------------------------------------------ handlers

constexpr int64_t kRowBlock = 64;  // query rows per backward block

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> rows,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> p) {
  const auto qd = q.dimensions(), kd = k.dimensions(), bd = bias.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || bd.size() != 3)
    return ffi::Error::InvalidArgument("attention_cpu: q, k, v must be rank 4 and bias rank 3");
  const int64_t B = qd[0], Lq = qd[1], H = qd[2], D = qd[3], Lk = kd[1], Lb = bd[1];
  const float* Q = q.typed_data();
  const float* K = k.typed_data();
  const float* V = v.typed_data();
  const float* bias_ = bias.typed_data();
  const float* rows_ = rows.typed_data();
  float* O = o->typed_data();
  float* P = p->typed_data();
  const int64_t ld = H * D;
  ParallelFor(pool, B * H, [=](int64_t t) {
    const int64_t b = t / H, h = t % H;
    const float* qh = Q + b * Lq * ld + h * D;
    const float* kh = K + b * Lk * ld + h * D;
    const float* vh = V + b * Lk * ld + h * D;
    float* ph = P + t * Lq * Lk;
    std::vector<float> kt(D * Lk);
    Transpose(Lk, D, kh, ld, kt.data());
    Gemm<false>(Lq, Lk, D, qh, ld, kt.data(), Lk, ph, Lk);
    for (int64_t i = 0; i < Lq; ++i)
      SoftmaxRow(ph + i * Lk, bias_ + (b * Lb + (Lb == 1 ? 0 : i)) * Lk, Lk, rows_[b * Lq + i]);
    Gemm<false>(Lq, D, Lk, ph, Lk, vh, ld, O + b * Lq * ld + h * D, ld);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> o,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4)
    return ffi::Error::InvalidArgument("attention_cpu: q, k, v must be rank 4");
  const int64_t B = qd[0], Lq = qd[1], H = qd[2], D = qd[3], Lk = kd[1];
  const float scale = 1.0f / std::sqrt(float(D));
  const float* Q = q.typed_data();
  const float* K = k.typed_data();
  const float* V = v.typed_data();
  const float* P = p.typed_data();
  const float* O = o.typed_data();
  const float* DO = dout.typed_data();
  float* DQ = dq->typed_data();
  float* DK = dk->typed_data();
  float* DV = dv->typed_data();
  const int64_t ld = H * D;
  ParallelFor(pool, B * H, [=](int64_t t) {
    const int64_t b = t / H, h = t % H;
    const int64_t qoff = b * Lq * ld + h * D, koff = b * Lk * ld + h * D;
    const float* ph = P + t * Lq * Lk;
    const float* doh = DO + qoff;
    const float* oh = O + qoff;
    float* dqh = DQ + qoff;
    float* dkh = DK + koff;
    float* dvh = DV + koff;
    std::vector<float> vt(D * Lk), ds(kRowBlock * Lk);
    Transpose(Lk, D, V + koff, ld, vt.data());
    // query rows in blocks, so the scratch is kRowBlock x Lk whatever the length; dK and dV accumulate
    for (int64_t i0 = 0; i0 < Lq; i0 += kRowBlock) {
      const int64_t m = std::min<int64_t>(kRowBlock, Lq - i0);
      const bool acc = i0 > 0;
      const float* pb = ph + i0 * Lk;
      const float* dob = doh + i0 * ld;
      // dV += P^T dO
      Gemm<true>(Lk, D, m, pb, Lk, dob, ld, dvh, ld, acc);
      // dP = dO V^T, then dS = P (dP - rowsum(dO * O)) in place
      Gemm<false>(m, Lk, D, dob, ld, vt.data(), Lk, ds.data(), Lk);
      for (int64_t i = 0; i < m; ++i) {
        const VF delta = Set1(Dot(dob + i * ld, oh + (i0 + i) * ld, D));
        float* row = ds.data() + i * Lk;
        const float* prow = pb + i * Lk;
        for (int64_t j = 0; j < Lk; j += kW)
          StoreN(row + j, Lk - j, Mul(LoadN(prow + j, Lk - j), Sub(LoadN(row + j, Lk - j), delta)));
      }
      // dQ = dS K / sqrt(D);  dK += dS^T Q
      Gemm<false>(m, D, Lk, ds.data(), Lk, K + koff, ld, dqh + i0 * ld, ld);
      for (int64_t i = i0; i < i0 + m; ++i)
        for (int64_t d = 0; d < D; ++d) dqh[i * ld + d] *= scale;
      Gemm<true>(Lk, D, m, ds.data(), Lk, Q + qoff + i0 * ld, ld, dkh, ld, acc);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedscaleAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedscaleAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
