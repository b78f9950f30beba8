// float32 matmul for XLA:CPU through the XLA FFI: C[M, N] = op(A) op(B), op = identity or transpose, by
// OpenBLAS's sgemm (the scipy-openblas32 wheel), with the output cut into blocks that run as single-threaded
// sgemm calls on XLA's own intra-op thread pool.
//
// Why: on a two-core AVX2 machine XLA:CPU's matmuls (YNNPACK, Eigen) ran at ~100 GFLOP/s inside the training
// step where OpenBLAS and PyTorch reach ~130 (docs/model.md, "Speed"). OpenBLAS's own threads would compete
// with XLA's pool, which runs independent operations at the same time; here OpenBLAS is set to one thread
// and the parallelism is XLA's: the output's rows (or, when it is wider than tall, its columns) in blocks
// taken in turn by the caller and whichever pool threads are free.
//
// Layouts (row-major): A is [M, K], or [K, M] with trans_a; B is [K, N], or [N, K] with trans_b; C [M, N].
// Each block is computed by one call over its whole K, so results do not depend on thread timing.

#include <algorithm>
#include <cstdint>

#include "cblas.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using medscale::ParallelFor;

namespace {

constexpr int64_t kAlign = 16;      // block edges on multiples of 16 rows or columns
constexpr int64_t kMinBlock = 64;   // no block thinner than this (sgemm's packing must pay off)
constexpr int64_t kBlocksPerThread = 2;  // a little slack for a thread that is busy elsewhere

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c, int64_t trans_a, int64_t trans_b) {
  const auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2)
    return ffi::Error::InvalidArgument("matmul_cpu: operands must be rank 2");
  const int64_t M = trans_a ? ad[1] : ad[0], K = trans_a ? ad[0] : ad[1];
  const int64_t N = trans_b ? bd[0] : bd[1], Kb = trans_b ? bd[1] : bd[0];
  if (K != Kb || cd[0] != M || cd[1] != N)
    return ffi::Error::InvalidArgument("matmul_cpu: operand shapes do not match");
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  float* C = c->typed_data();
  const int64_t lda = ad[1], ldb = bd[1];
  const auto ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  if (K == 0) {
    std::fill(C, C + M * N, 0.0f);
    return ffi::Error::Success();
  }
  // split the longer side of C
  const bool by_rows = M >= N;
  const int64_t side = by_rows ? M : N;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  int64_t blocks = std::min(threads * kBlocksPerThread, std::max<int64_t>(side / kMinBlock, 1));
  int64_t size = (side + blocks - 1) / blocks;
  size = (size + kAlign - 1) / kAlign * kAlign;
  blocks = (side + size - 1) / size;
  ParallelFor(pool, blocks, [=](int64_t t) {
    const int64_t lo = t * size, n = std::min(size, side - lo);
    if (by_rows) {  // rows lo..lo+n of C: rows of A (columns when transposed)
      const float* a0 = trans_a ? A + lo : A + lo * lda;
      scipy_cblas_sgemm(CblasRowMajor, ta, tb, n, N, K, 1.0f, a0, lda, B, ldb, 0.0f, C + lo * N, N);
    } else {  // columns lo..lo+n of C: columns of B (rows when transposed)
      const float* b0 = trans_b ? B + lo * ldb : B + lo;
      scipy_cblas_sgemm(CblasRowMajor, ta, tb, M, n, K, 1.0f, A, lda, b0, ldb, 0.0f, C + lo, N);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void MedscaleMatmulInit() { scipy_openblas_set_num_threads(1); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedscaleMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b"));
