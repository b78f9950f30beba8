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
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ------------------------------------------------------------------------------------------------ matmul

// C[R x 32] (+)= A[R x K] B[K x 32] with masks for a partial last column block. AT: A is stored transposed
// (element (i, k) at A[k * lda + i]).
template <int R, bool AT>
inline void Micro(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                  int64_t ldc, __mmask16 m0, __mmask16 m1, bool accumulate) {
  __m512 c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    c0[r] = _mm512_setzero_ps();
    c1[r] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, b);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, b + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(AT ? A[k * lda + r] : A[r * lda + k]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* c = C + r * ldc;
    if (accumulate) {
      c0[r] = _mm512_add_ps(c0[r], _mm512_maskz_loadu_ps(m0, c));
      c1[r] = _mm512_add_ps(c1[r], _mm512_maskz_loadu_ps(m1, c + 16));
    }
    _mm512_mask_storeu_ps(c, m0, c0[r]);
    _mm512_mask_storeu_ps(c + 16, m1, c1[r]);
  }
}

template <bool AT>
void MicroRows(int rows, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc, __mmask16 m0, __mmask16 m1, bool acc) {
  switch (rows) {
    case 8: return Micro<8, AT>(K, A, lda, B, ldb, C, ldc, m0, m1, acc);
    case 7: return Micro<7, AT>(K, A, lda, B, ldb, C, ldc, m0, m1, acc);
    case 6: return Micro<6, AT>(K, A, lda, B, ldb, C, ldc, m0, m1, acc);
    case 5: return Micro<5, AT>(K, A, lda, B, ldb, C, ldc, m0, m1, acc);
    case 4: return Micro<4, AT>(K, A, lda, B, ldb, C, ldc, m0, m1, acc);
    case 3: return Micro<3, AT>(K, A, lda, B, ldb, C, ldc, m0, m1, acc);
    case 2: return Micro<2, AT>(K, A, lda, B, ldb, C, ldc, m0, m1, acc);
    default: return Micro<1, AT>(K, A, lda, B, ldb, C, ldc, m0, m1, acc);
  }
}

inline __mmask16 Mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? 0 : __mmask16((1u << n) - 1); }

// C[M x N] (+)= op(A) B, B [K x N]; op(A) = A [M x K] or (AT) A^T with A [K x M].
template <bool AT>
void Gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate = false) {
  for (int64_t j = 0; j < N; j += 32) {
    const __mmask16 m0 = Mask(N - j), m1 = Mask(N - j - 16);
    for (int64_t i = 0; i < M; i += 8) {
      const int rows = int(std::min<int64_t>(8, M - i));
      const float* a = AT ? A + i : A + i * lda;
      MicroRows<AT>(rows, K, a, lda, B + j, ldb, C + i * ldc + j, ldc, m0, m1, accumulate);
    }
  }
}

// dst [cols x rows] = src^T, src rows strided by ld: 16 rows at a time, one gather per column.
void Transpose(int64_t rows, int64_t cols, const float* src, int64_t ld, float* dst) {
  const __m512i step = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(int(ld)));
  for (int64_t r = 0; r < rows; r += 16) {
    const __mmask16 m = Mask(rows - r);
    const float* s = src + r * ld;
    for (int64_t c = 0; c < cols; ++c)
      _mm512_mask_storeu_ps(dst + c * rows + r, m,
                            _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, step, s + c, 4));
  }
}

// ------------------------------------------------------------------------------------------------ softmax

// exp(x) for x <= 0 (softmax arguments): 2^n * poly(r), |r| <= ln2/2, degree-7 Taylor (relative error below
// float epsilon); arguments below -87 give exactly 0, as XLA's exp of a masked score does.
inline __m512 Exp(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(lo, x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_mask_mov_ps(_mm512_scalef_ps(p, n), tiny, _mm512_setzero_ps());
}

// row[0:n] = rowscale * softmax(row + bias)
void SoftmaxRow(float* row, const float* bias, int64_t n, float rowscale) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = Mask(n - j);
    const __m512 s = _mm512_add_ps(_mm512_maskz_loadu_ps(m, row + j), _mm512_maskz_loadu_ps(m, bias + j));
    _mm512_mask_storeu_ps(row + j, m, s);
    mx = _mm512_mask_max_ps(mx, m, mx, s);
  }
  const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = Mask(n - j);
    const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), vmax));
    _mm512_mask_storeu_ps(row + j, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  const __m512 f = _mm512_set1_ps(rowscale / _mm512_reduce_add_ps(sum));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = Mask(n - j);
    _mm512_mask_storeu_ps(row + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), f));
  }
}

float Dot(const float* a, const float* b, int64_t n) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = Mask(n - j);
    s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_maskz_loadu_ps(m, b + j), s);
  }
  return _mm512_reduce_add_ps(s);
}

// ------------------------------------------------------------------------------------------------ threads

// Runs body(0..n-1) on the caller and on up to num_threads - 1 helpers from XLA's pool. The caller waits
// only for tasks that have started, never for a helper to be scheduled, so two such calls running at once
// on a small pool cannot wait on each other.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> body) {
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct State {
    std::function<void(int64_t)> body;
    int64_t n;
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  st->body = std::move(body);
  st->n = n;
  auto work = [](const std::shared_ptr<State>& s) {
    for (int64_t i; (i = s->next.fetch_add(1)) < s->n;) {
      s->body(i);
      std::lock_guard<std::mutex> lock(s->mu);
      if (++s->done == s->n) s->cv.notify_all();
    }
  };
  for (int64_t w = 1; w < workers; ++w) pool.Schedule([st, work]() { work(st); });
  work(st);
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done == st->n; });
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
        const __m512 delta = _mm512_set1_ps(Dot(dob + i * ld, oh + (i0 + i) * ld, D));
        float* row = ds.data() + i * Lk;
        const float* prow = pb + i * Lk;
        for (int64_t j = 0; j < Lk; j += 16) {
          const __mmask16 mk = Mask(Lk - j);
          const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, row + j), delta);
          _mm512_mask_storeu_ps(row + j, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, prow + j), x));
        }
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
