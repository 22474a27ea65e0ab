// The sequential loops of the LSTM, the GRU and the Elman RNN as XLA FFI custom calls on CPU, float32, with the
// rows or the hidden units split over threads.
//
// What XLA cannot do here: its per-step matmul [B, H] @ [H, 4H] runs on one core, so at the small shapes of RNN
// research the loops use half of a 2-core machine. Each kernel below owns the whole time loop. From 8 rows a thread
// (`split_of`) each thread runs whole groups of rows, every step of them, with W_h packed in its own panel (in cache
// from step to step) and no barrier: each row's recurrence is its own. With fewer rows every thread owns a contiguous
// range of hidden units (in chunks of 16), holds its slice of W_h, and computes its units' matmul columns, gates and
// state; the threads meet at one barrier per step, after which the new state row is complete for everyone's next
// matmul.
//
// lstm_forward(w_h [H, 4H], h0 [B, H], c0 [B, H], px [T, B, 4H]) -> hs [T, B, H], cs [T, B, H], gates [T, B, 4H]
//   z = px_t + h_{t-1} W_h; (i, f, g, o) = (σ, σ, tanh, σ)(z); c_t = f c_{t-1} + i g; h_t = o tanh c_t
// lstm_forward_inputs(w_h, w_x [I, 4H], b [4H], h0, c0, xs [T, B, I]) -> hs, cs, gates: the same on px = xs W_x + b,
//   each step's projection in its matmul; lstm_infer(the same operands) -> hs, c [B, H]: the forward pass alone.
// lstm_backward(w_h, gates, cs, c0, hs, h0, g_hs [T, B, H], g_h [B, H], g_c [B, H]) -> g_px [T, B, 4H], g_w [H, 4H],
//   g_h0, g_c0
//   the transpose of the LSTM's tangent recurrence (rnnlab/fused.py) for cotangents g_hs of every h_t and
//   (g_h, g_c) of the final carry: g_px_t is the cotangent of the step's pre-activation z.
// gru_forward(w_h [H, 3H], b_h [3H], h0 [B, H], px [T, B, 3H]) -> hs [T, B, H], gates [T, B, 3H], a_n [T, B, H]
//   a = h_{t-1} W_h + b_h; r = σ(px_r + a_r); z = σ(px_z + a_z); n = tanh(px_n + r a_n); h_t = (1 - z) n + z h_{t-1}
//   gates = [r, z, n] (the same shape as px, so XLA can hand px's buffer to it)
// gru_forward_inputs(w_h, b_h, w_x [I, 3H], b_x [3H], h0, xs [T, B, I]) -> hs, gates, a_n: the same on
//   px = xs W_x + b_x, each step's projection in a matmul of its own.
// gru_backward(w_h, gates, a_n, hs, h0, g_hs [T, B, H], g_h [B, H]) -> g_u [T, B, 3H], g_w [H + 1, 3H], g_h0
//   the transpose of the GRU's tangent recurrence (rnnlab/fused.py): g_u_t is the cotangent of the tangent's input
//   u_t = ṗx_t (besides [ȧ_r, ȧ_z, r ȧ_n] from the weights' tangent, ȧ = h_{t-1} Ẇ_h + ḃ_h); g_w stacks W_h's
//   gradient and, as row H, b_h's.
// rnn_forward(w_h [H, H], h0 [B, H], px [T, B, H]) -> hs [T, B, H]: h_t = φ(px_t + h_{t-1} W_h), φ tanh, relu or
//   linear (the `activation` attribute)
// rnn_backward(w_h, hs, h0, g_hs [T, B, H], g_h [B, H]) -> g_u [T, B, H], g_w [H, H], g_h0: the transpose of the
//   tangent recurrence
//   ḣ_t = φ'(z_t) (u_t + ḣ_{t-1} W_h), with φ' written through h_t.
// Each backward kernel also returns W_h's gradient g_w = Σ_t h_{t-1}ᵀ (the step's cotangent of h_{t-1} W_h), the
//   transpose of the tangent's h_{t-1} Ẇ_h term (the GRU's with b_h's below it; `weight_grad` false: zeros, for the
//   caller to form).
// `reverse` runs time from the last step to the first, as `lax.scan(..., reverse=True)`.
// Each kernel also comes masked (`*_masked`): one more operand, valid [T, B] booleans, after the forward kernel's
//   operands and after the backward kernel's saved ones (before g_hs). At a step where valid[t, b] is false, row b
//   keeps its carry (hs[t] = h_{t-1}, and cs[t] = c_{t-1} for the LSTM; what else the step saves is never read),
//   and the backward kernel hands the carry's cotangent, g_hs[t] included, on to the step before unchanged, with a
//   zero cotangent for the step's pre-activation. Padded sequences (`rnnlab.scan(..., lengths=...)`) run so.

#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <string>
#include <chrono>
#include <memory>
#include <string_view>
#include <utility>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <sched.h>
#ifdef __AVX512F__
#include <immintrin.h>  // vexp's rounding and scaling
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The vector width: 16 floats (one 512-bit register) with AVX-512, else 8 (AVX2's 256-bit registers); kRows rows of
// a block of the matmul keep 2·kRows accumulators and 2 rows of B in the 32 (AVX-512) or 16 (AVX2) registers.
#ifdef __AVX512F__
constexpr int kLanes = 16;
constexpr int kRows = 8;
#else
constexpr int kLanes = 8;
constexpr int kRows = 6;
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{} + x; }

// exp(x), Cephes' single-precision polynomial (≈ 1 ulp on [-87, 88]). Without AVX-512 (the second definition) the
// input is clamped to [-87.3, 88.4], and the clamps let a nan through (a comparison with nan is false), so that nan
// gives nan here and in the sigmoid and tanh built on it, as in XLA: clamped, a nan input became exp(88), a sigmoid
// of 0 or 1 and a tanh of 1, hiding it. There exp saturates at about 1.2e-38 and 2.4e38 (a sigmoid of -89 is
// 2.9e-39), where the AVX-512 one gives 0 and inf.
//
// With AVX-512 the rounding to n and the scaling by 2^n are one instruction each (vrndscaleps, vscalefps), in place
// of the magic-number rounding and the exponent's integer arithmetic. vscalefps overflows to inf and goes through
// the subnormals to 0 as expf does, so the clamps only keep the reduction's argument small (-104 is past the last
// subnormal); exp itself is within 8.1e-8 relative of double precision on [-87, 88.7]. In L1 the LSTM's gate maths
// (3 sigmoids and 2 tanh a unit) took 93-95 cycles per 16 units against 111-113, with the same largest errors
// (sigmoid 1.4e-7, tanh 1.3e-7 relative) (2026-11-27, benchmarks/README.md).
#ifdef __AVX512F__
inline vf vexp(vf x) {
  // vmaxps and vminps return their second operand where either is a nan: x's nan passes.
  __m512 v = _mm512_max_ps(_mm512_set1_ps(-104.0f), reinterpret_cast<__m512>(x));
  v = _mm512_min_ps(_mm512_set1_ps(89.0f), v);
  // Every product-sum an explicit FMA: left to the compiler, the two copies of a loop that inlines this (the
  // gradient-flow kernel's forward steps and their rerun under remat) fused different ones and parted by an ulp.
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r);
  y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
  return reinterpret_cast<vf>(_mm512_scalef_ps(y, n));
}
#else
inline vf vexp(vf x) {
  x = x > splat(88.3762626647949f) ? splat(88.3762626647949f) : x;
  x = x < splat(-87.3365478515625f) ? splat(-87.3365478515625f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  vf n = (x * splat(1.44269504088896341f) + magic) - magic;
  x = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  vf y = splat(1.9875691500e-4f);
  y = y * x + splat(1.3981999507e-3f);
  y = y * x + splat(8.3334519073e-3f);
  y = y * x + splat(4.1665795894e-2f);
  y = y * x + splat(1.6666665459e-1f);
  y = y * x + splat(5.0000001201e-1f);
  y = y * x * x + x + splat(1.0f);
  n = n == n ? n : splat(0.0f);  // a nan's y is nan already; converting nan to int is undefined
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
#endif

inline vf vsigmoid(vf x) { return splat(1.0f) / (splat(1.0f) + vexp(-x)); }

// tanh(x): Cephes' odd polynomial for |x| < 0.625, 1 - 2 / (exp(2|x|) + 1) with x's sign above.
inline vf vtanh(vf x) {
  vf a = x < splat(0.0f) ? -x : x;
  vf z = x * x;
  vf p = splat(-5.70498872745e-3f);
  p = p * z + splat(2.06390887954e-2f);
  p = p * z + splat(-5.37397155531e-2f);
  p = p * z + splat(1.33314422036e-1f);
  p = p * z + splat(-3.33332819422e-1f);
  vf small = p * z * x + x;
  vf large = splat(1.0f) - splat(2.0f) / (vexp(a + a) + splat(1.0f));
  large = x < splat(0.0f) ? -large : large;
  return a < splat(0.625f) ? small : large;
}

// One block of MR rows and NV vectors of columns of C[m, n] = A[m, k] @ B[k, n] (row-major, leading dimensions),
// or, Packed, C += Aᵀ B with A's columns read from a panel [k][kRows] (`weight_grad_add`).
template <int MR, int NV, bool Packed>
inline void block(int k_size, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  vf acc[MR][NV] = {};
  if (Packed) {
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = load(c + i * ldc + v * kLanes);
  }
  for (int k = 0; k < k_size; ++k) {
    vf bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = load(b + k * ldb + v * kLanes);
    for (int i = 0; i < MR; ++i) {
      const float aik = Packed ? a[k * kRows + i] : a[i * lda + k];
      for (int v = 0; v < NV; ++v) acc[i][v] += aik * bk[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) store(c + i * ldc + v * kLanes, acc[i][v]);
}

// All m rows of one column block: blocks of kRows rows, then 4, 2, 1. Packed, the panel for rows [i, i + kRows)
// starts at a + i·k; m is then a hidden size, a multiple of 16, which leaves at most one of those (4 or 2 rows with
// kRows = 6), at the start of the last, zero-padded panel.
template <int NV, bool Packed>
inline void rows(int m, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  const int row_step = Packed ? k : lda;  // from one row of C to the next, in A
  int i = 0;
  for (; i + kRows <= m; i += kRows) block<kRows, NV, Packed>(k, a + i * row_step, lda, b, ldb, c + i * ldc, ldc);
  if (i + 4 <= m) block<4, NV, Packed>(k, a + i * row_step, lda, b, ldb, c + i * ldc, ldc), i += 4;
  if (i + 2 <= m) block<2, NV, Packed>(k, a + i * row_step, lda, b, ldb, c + i * ldc, ldc), i += 2;
  if (i < m) block<1, NV, Packed>(k, a + i * row_step, lda, b, ldb, c + i * ldc, ldc);
}

// B[k, n] (n a multiple of 16) packed for `matmul` into `packed`: column blocks of 32 (the last may be 16), each
// [k, width] contiguous, so a block's k rows stream through L1 in order. `at(kk, j)` reads B[kk, j].
template <typename At>
void pack_into(std::vector<float>& packed, int k, int n, At at) {
  packed.resize(static_cast<size_t>(k) * n);
  for (int j = 0; j < n; j += 2 * kLanes) {
    const int width = std::min(2 * kLanes, n - j);
    float* out = &packed[static_cast<size_t>(j) * k];
    for (int kk = 0; kk < k; ++kk)
      for (int jj = 0; jj < width; ++jj) out[kk * width + jj] = at(kk, j + jj);
  }
}

// The columns of W [.., gates·H] that hold units [u0, u0 + nu) of each gate block, in order of gate: a part's
// columns, as `pack` reads them (a table, so that packing divides nothing per element).
std::vector<int> unit_columns(int H, int gates, int u0, int nu) {
  std::vector<int> columns(static_cast<size_t>(gates) * nu);
  for (int q = 0; q < gates; ++q)
    for (int u = 0; u < nu; ++u) columns[static_cast<size_t>(q) * nu + u] = q * H + u0 + u;
  return columns;
}

template <typename At>
std::vector<float> pack(int k, int n, At at) {
  std::vector<float> packed;
  pack_into(packed, k, n, at);
  return packed;
}

// C[m, n] = A[m, k] @ B[k, n], B as from `pack`; Packed, C += Aᵀ B with A's columns in panels (`rows`).
template <bool Packed = false>
void matmul(int m, int n, int k, const float* a, int lda, const float* packed, float* c, int ldc) {
  for (int j = 0; j < n; j += 2 * kLanes) {
    const float* b = packed + static_cast<size_t>(j) * k;
    if (n - j >= 2 * kLanes) {
      rows<2, Packed>(m, k, a, lda, b, 2 * kLanes, c + j, ldc);
    } else {
      rows<1, Packed>(m, k, a, lda, b, kLanes, c + j, ldc);
    }
  }
}

// --- W_h's gradient: C += Σ_r a_rᵀ b_r over rows r of the steps' h_{t-1} and recurrent cotangents ----------------
//
// Summed step by step straight from the rows, the sum ran at 28-41 GFLOP/s on one AVX2 core (a part's share at
// the benchmark's shapes, operands fresh from memory): every row of a block's k-loop touched a new cache line of A
// and of B (rows a page apart), and every step read and wrote the whole of C. It now runs over kGradRows rows
// (several steps) at a time, both operands packed into panels as `matmul` packs W_h, so the k-loop reads them in
// order: 40-62 GFLOP/s in the same test (2026-11-26). In the whole gradient that was 14 % off the GRU at
// 128,50,256,512 and the tanh RNN at 64,200,128,256 (medians of 5 processes each).

constexpr int kGradDepth = 256;  // rows of the sum packed at a time
constexpr int kGradRows = 512;   // rows summed at a time: whole steps of the batch, at least one

// Steps of `batch` rows whose contributions to W_h's gradient are summed at once.
int grad_steps(int batch) { return std::max(1, kGradRows / batch); }

// A part's columns of W_h's gradient: for each gate block q < gates and unit u < nu,
//   g_w[i, q·H + u0 + u] += Σ_{r < k} a(r)[i] · b(r)[q·H + u0 + u],   i < H,
// with a(r) the r-th row [H] (an h_{t-1}) and b(r) the r-th row [gates·H] (the step's recurrent cotangent), which
// `a_row` and `b_row` return. A's columns are packed kRows at a time into `pa`, B's into `pb` as `matmul`'s W_h
// (`pack_into`): the caller's buffers, kept from one sum to the next.
template <typename ARow, typename BRow>
void weight_grad_add(int H, int gates, int u0, int nu, int k, ARow a_row, BRow b_row, float* g_w,
                     std::vector<float>& pa, std::vector<float>& pb) {
  const int G = gates * H, groups = (H + kRows - 1) / kRows;
  pa.resize(static_cast<size_t>(groups) * kRows * kGradDepth);
  const float* b_rows[kGradDepth];
  for (int k0 = 0; k0 < k; k0 += kGradDepth) {
    const int kc = std::min(kGradDepth, k - k0);
    for (int kk = 0; kk < kc; ++kk) {
      const float* row = a_row(k0 + kk);
      for (int g = 0; g < groups; ++g) {
        float* out = &pa[(static_cast<size_t>(g) * kc + kk) * kRows];
        const int width = std::min(kRows, H - g * kRows);
        for (int r = 0; r < width; ++r) out[r] = row[g * kRows + r];
        for (int r = width; r < kRows; ++r) out[r] = 0.0f;
      }
      b_rows[kk] = b_row(k0 + kk);
    }
    for (int q = 0; q < gates; ++q) {
      const int col = q * H + u0;
      pack_into(pb, kc, nu, [&](int kk, int j) { return b_rows[kk][col + j]; });
      matmul<true>(H, nu, kc, pa.data(), 0, pb.data(), g_w + col, G);
    }
  }
}

// A barrier for a fixed team: spins briefly, then yields (the team may share cores with other work).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spin = 0; generation_.load(std::memory_order_acquire) == generation; ++spin) {
      if (spin > 4000) sched_yield();
    }
  }

 private:
  const int count_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// Linux may queue a woken thread on the CPU of the thread that woke it, even while another CPU is idle, and leave it
// there until the next scheduler tick (4 ms here): the idle CPU looked for work before the thread was queued, and a
// busy enough system skips the search for an idle CPU at a wake-up. A kernel's caller and its helper then share one
// CPU, each at half speed (or one waits for the other), while the other CPU idles. Measured on the 2-core AVX-512
// CPU (2026-11-28, `jax.grad` of the LSTM at 32,100,64,128, each thread's CPU recorded as it started): in 14 % of the
// kernels' calls the helper started on its caller's CPU, 2-4 ms late, and the call took twice as long. Only a thread
// that is running can act, so one of the two steps aside (`step_aside`): a helper that starts on its caller's CPU
// (it preempted its caller there), or else a caller whose helpers have not started within kHelperStart (one queued
// behind it, most likely). One thread a call at most: two that both stepped aside could land on the same CPU. The
// caller spins while it waits, noting its CPU for the helpers; a yield would hand its CPU to whatever is queued there.
// (A caller moved by the scheduler between its last note and a helper's start leaves a stale CPU: that helper then
// steps aside onto the caller's new CPU, where the load balancer, the masks being wide, can part them again.)
// Helpers that start normally do so within 20-80 µs here; a step aside that was not needed costs a migration, and
// the CPU it leaves goes idle and takes over a thread queued elsewhere at once.
constexpr auto kHelperStart = std::chrono::microseconds(250);

// kHelperStart, or $RNNLAB_NATIVE_HELPER_START_US where it is a whole number from 0 to 100000 (read once; 0: a caller
// steps aside whenever its helpers have not started at once, which the tests use to run that path).
std::chrono::microseconds helper_start() {
  static const std::chrono::microseconds wait = [] {
    const char* value = std::getenv("RNNLAB_NATIVE_HELPER_START_US");
    if (value == nullptr || *value == '\0') return kHelperStart;
    char* end = nullptr;
    const long long us = std::strtoll(value, &end, 10);
    return *end == '\0' && us >= 0 && us <= 100000 ? std::chrono::microseconds(us) : kHelperStart;
  }();
  return wait;
}

// The moves `step_aside` has made since the library was loaded (for rnnlab.native.steps_aside).
std::atomic<int64_t> steps_aside{0};

// Whether the calling thread may run on more than one CPU (else there is nowhere to step aside to).
bool may_move() {
  cpu_set_t mask;
  return sched_getaffinity(0, sizeof(mask), &mask) == 0 && CPU_COUNT(&mask) > 1;
}

// Moves the calling thread off `cpu`, the one it runs on, to another CPU of its affinity mask (if there is one): it
// narrows the mask to the others, which migrates it at once, then widens it again, which does not move it back.
// Returns whether it moved. (Widening sets the mask just read; it could fail only where the thread's cpuset shrank
// meanwhile, and the narrowed mask would then stay.)
bool step_aside(int cpu) {
  cpu_set_t mask;
  if (cpu < 0 || sched_getaffinity(0, sizeof(mask), &mask) != 0) return false;
  if (!CPU_ISSET(cpu, &mask) || CPU_COUNT(&mask) < 2) return false;
  cpu_set_t others = mask;
  CPU_CLR(cpu, &others);
  if (sched_setaffinity(0, sizeof(others), &others) != 0) return false;
  sched_setaffinity(0, sizeof(mask), &mask);
  steps_aside.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// How a kernel's helper tasks start, shared by its caller and its helpers.
struct Starts {
  std::atomic<int> caller_cpu{-1};
  std::atomic<int> count{0};
  std::atomic<bool> stepped{false};  // a thread has stepped aside (or is trying to) in this call; reset if it could not

  // The caller, before it wakes the helpers.
  void before_wake() { caller_cpu.store(sched_getcpu(), std::memory_order_relaxed); }
  // Each helper's first act.
  void on_helper_start() {
    const int cpu = sched_getcpu();
    if (cpu >= 0 && cpu == caller_cpu.load(std::memory_order_relaxed) && !stepped.exchange(true) && !step_aside(cpu))
      stepped.store(false);
    count.fetch_add(1, std::memory_order_relaxed);
  }
  // The caller, once it has woken `helpers` helpers.
  void wait_for_helpers(int helpers) {
    if (helpers == 0 || !may_move()) return;
    const auto deadline = std::chrono::steady_clock::now() + helper_start();
    while (count.load(std::memory_order_relaxed) < helpers) {
      caller_cpu.store(sched_getcpu(), std::memory_order_relaxed);
      if (std::chrono::steady_clock::now() >= deadline) {
        if (!stepped.exchange(true) && !step_aside(sched_getcpu())) stepped.store(false);
        return;
      }
    }
  }
};

// Runs body(part, parts, barrier) for part = 0 .. parts - 1: part 0 on the calling thread, the others as tasks on
// XLA's intra-op thread pool (threads of our own would compete for the cores with that pool's, which spin while
// idle). The parts must run at once (they meet at a barrier every step), so a task that has not started within a
// few milliseconds (the pool busy with other work, or the caller one of its threads) is abandoned and part 0 does
// all the work alone: slower, never a deadlock. The shared state lives on the heap, since an abandoned task may run
// after this function has returned.
struct TeamState {
  explicit TeamState(int parts) : joined(parts) {}
  std::vector<std::atomic<int>> joined;  // 0: not started, 1: joined, 2: abandoned
  std::atomic<int> go{0};                // 1: run, 2: stand down
  std::atomic<int> finished{0};
  Starts starts;
};

template <typename Body>
void team(ffi::ThreadPool& pool, int parts, Body body) {
  parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(parts, pool.num_threads())));
  if (parts == 1) {
    Barrier barrier(1);
    body(0, 1, barrier);
    return;
  }
  auto state = std::make_shared<TeamState>(parts);
  std::atomic<Barrier*> barrier_ptr{nullptr};
  state->starts.before_wake();
  for (int p = 1; p < parts; ++p) {
    pool.Schedule([state, p, parts, &body, &barrier_ptr] {
      state->starts.on_helper_start();
      int expected = 0;
      if (!state->joined[p].compare_exchange_strong(expected, 1)) return;  // abandoned: touch nothing else
      int go;
      while ((go = state->go.load(std::memory_order_acquire)) == 0) sched_yield();
      if (go == 1) body(p, parts, *barrier_ptr.load(std::memory_order_acquire));
      state->finished.fetch_add(1, std::memory_order_release);
    });
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(5);
  state->starts.wait_for_helpers(parts - 1);
  int joined = 0;
  for (int p = 1; p < parts; ++p) {
    while (state->joined[p].load(std::memory_order_acquire) == 0 && std::chrono::steady_clock::now() < deadline)
      sched_yield();
    int expected = 0;
    if (!state->joined[p].compare_exchange_strong(expected, 2)) ++joined;
  }
  Barrier barrier(joined == parts - 1 ? parts : 1);
  barrier_ptr.store(&barrier, std::memory_order_release);
  state->go.store(joined == parts - 1 ? 1 : 2, std::memory_order_release);
  if (joined == parts - 1) {
    body(0, parts, barrier);
  } else {
    body(0, 1, barrier);
  }
  for (int spin = 0; state->finished.load(std::memory_order_acquire) != joined; ++spin) {
    if (spin > 4000) sched_yield();
  }
}

// Runs body(i, slot) for i = 0 .. count - 1 on up to share_slots(...) threads, each i whole on one: the calling
// thread (slot 0) and tasks on XLA's pool (slots 1, 2, ...) take the next i in turn until none is left, so no thread
// waits for another to start (where the pool is busy, the caller does the rest). A slot is one thread's: what it
// keeps from one i to the next (a workspace) is its own. The shared state lives on the heap, since a task may start
// after this function has returned; such a task takes no i and touches nothing else.
struct ShareState {
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  Starts starts;
};

int share_slots(ffi::ThreadPool& pool, int count, int64_t threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({threads, count, pool.num_threads()})));
}

template <typename Body>
void share_out(ffi::ThreadPool& pool, int count, int64_t threads, Body body) {
  auto state = std::make_shared<ShareState>();
  const auto take = [count](ShareState& shared, Body& run, int slot) {
    for (int i; (i = shared.next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      run(i, slot);
      shared.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int slots = share_slots(pool, count, threads);
  state->starts.before_wake();
  for (int slot = 1; slot < slots; ++slot)
    pool.Schedule([state, take, &body, slot] {
      state->starts.on_helper_start();
      take(*state, body, slot);
    });
  state->starts.wait_for_helpers(slots - 1);
  take(*state, body, 0);
  for (int spin = 0; state->done.load(std::memory_order_acquire) != count; ++spin) {
    if (spin > 4000) sched_yield();
  }
}

// The hidden units of part p: chunks of 16 shared out as evenly as possible.
void units_of(int hidden, int part, int parts, int* begin, int* end) {
  const int chunks = hidden / kLanes;
  *begin = (chunks * part / parts) * kLanes;
  *end = (chunks * (part + 1) / parts) * kLanes;
}

// How many parts to split a loop into: at most `threads`, one chunk of units each, and at least kMinWork
// multiply-adds of the per-step matmul [batch, hidden] @ [hidden, gates·hidden] each, since below that the
// barrier and the exchange of the state between cores cost more than the second core gives. So two threads from
// 2^19 multiply-adds a step. Until 2026-11-27 it took 2^20 (kMinWork 2^19); measured then on the 2-core AVX2 CPU
// (T = 100, input 64, `jax.grad` of a loss on the outputs, median of 4 alternating processes), two threads took the
// LSTM at batch 32, hidden 64 (2^19) from 11.3 to 9.6 ms, the LSTM at 8, 128 (2^19) from 8.7 to 6.7 ms, the tanh
// RNN at 32, 128 (2^19) from 8.8 to 7.9 ms (its forward pass alone from 3.5 to 3.9 ms) and the GRU at 16, 128
// (2^19.6) from 13.4 to 10.9 ms. Two threads from 2^18 did not help consistently.
constexpr int64_t kMinWork = 1 << 18;

int team_size(int64_t batch, int hidden, int gates, int64_t threads) {
  const int64_t work = batch * hidden * gates * static_cast<int64_t>(hidden);
  const int64_t parts = std::min<int64_t>({threads, hidden / kLanes, std::max<int64_t>(1, work / kMinWork)});
  return static_cast<int>(std::max<int64_t>(1, parts));
}

// One recurrence's sizes and time order: T steps of B rows of H units, `gates` blocks of H columns in W_h.
struct Loop {
  int steps, batch, hidden, gates;
  bool reverse;
  int64_t threads;
  const bool* valid = nullptr;  // [T, B], or null: every step valid

  // Whether row b keeps its carry at step t (a masked kernel's invalid step).
  bool keeps(int t, int b) const { return valid != nullptr && !valid[row(t, b)]; }

  // The step taken s-th (forward: s = t), and the one before it in time order (-1: the initial carry).
  int time(int s) const { return reverse ? steps - 1 - s : s; }
  int previous(int s) const { return s == 0 ? -1 : time(s - 1); }
  size_t row(int t, int b) const { return static_cast<size_t>(t) * batch + b; }
};

ffi::Error loop_of(const ffi::AnyBuffer::Dimensions& seq, int64_t width, int gates, bool reverse, int64_t threads,
                   Loop* loop) {
  // seq: [T, B, width] with width = gates·H (or the saved width of the cell).
  if (width % gates != 0 || (width / gates) % kLanes != 0)
    return ffi::Error::InvalidArgument("rnnlab native kernel: the hidden size must be a multiple of 16");
  *loop = Loop{static_cast<int>(seq[0]), static_cast<int>(seq[1]), static_cast<int>(width / gates), gates, reverse,
               threads};
  return ffi::Error::Success();
}

// A masked kernel's valid [T, B] for `loop` (null: unmasked).
ffi::Error mask_of(const ffi::Buffer<ffi::PRED>* valid, Loop* loop) {
  if (valid == nullptr) return ffi::Error::Success();
  const auto dims = valid->dimensions();
  if (dims.size() != 2 || dims[0] != loop->steps || dims[1] != loop->batch)
    return ffi::Error::InvalidArgument("rnnlab native kernel: valid must have shape [T, B], the steps and rows of "
                                       "the sequence");
  loop->valid = valid->typed_data();
  return ffi::Error::Success();
}

// Row b's units [u0, u0 + nu) of a carry kept through a masked step: `to` = `from`.
inline void hold(float* to, const float* from, int nu) { std::memcpy(to, from, nu * sizeof(float)); }

// The rows among [b0, b1) of step t that a masked kernel computes (its valid ones), in `live`, counted from b0;
// returns how many (b1 - b0, with `live` left as it is, when none is kept). A step's matmul then runs on those rows
// alone, gathered: padded rows cost a copy of their carry, not their share of the matmul.
int live_rows(const Loop& loop, int t, int b0, int b1, std::vector<int>& live) {
  if (loop.valid == nullptr) return b1 - b0;
  live.clear();
  for (int b = b0; b < b1; ++b)
    if (!loop.keeps(t, b)) live.push_back(b - b0);
  return static_cast<int>(live.size());
}

// C[n, width] = A[live rows, k] @ B (rows of C `ldc` apart; default width): the rows `live` of `a` [B, k] (all B of
// them when n = B) gathered into `gathered` first where some are missing.
void live_matmul(int batch, int n, const std::vector<int>& live, int width, int k, const float* a,
                 const float* packed, float* c, std::vector<float>& gathered, int ldc = 0) {
  ldc = ldc == 0 ? width : ldc;
  if (n == batch) return matmul(batch, width, k, a, k, packed, c, ldc);
  gathered.resize(static_cast<size_t>(n) * k);
  for (int i = 0; i < n; ++i)
    std::memcpy(&gathered[static_cast<size_t>(i) * k], a + static_cast<size_t>(live[i]) * k, k * sizeof(float));
  if (n > 0) matmul(n, width, k, gathered.data(), k, packed, c, ldc);
}

// The fewest rows of a group that one thread runs whole, in the cell kernels (`split_of`) and the gradient-flow
// kernel (`flow_groups`): fewer leave the AVX-512 block of 8 rows part empty.
constexpr int kGroupRows = 8;

// How a cell's loop shares its work among threads: in `parts` groups of rows, each group the whole recurrence of
// its rows on one thread (`by_rows`: each row's recurrence is its own, so no thread waits for another; the threads
// take the groups in turn, `share_out`), or as a team of `parts` threads that meet at a barrier every step, each
// computing its share of the hidden units of every row (`team_size`). By rows from kGroupRows rows a thread, and
// from kMinGroupWork multiply-adds of the recurrence a group (steps x rows x hidden x gates·hidden; 2^22, about
// 50 µs on one core), since a helper thread's start costs tens of µs. Measured on the 2-core AVX-512 CPU
// (2026-11-27, `benchmarks/probe_cell_rows.py`, three alternating rounds, the fastest of 45 calls against the team,
// `jax.grad` of a loss on the outputs): 1.04-1.42x faster at the benchmark's shapes (the tanh RNN at 16,1000,32,128
// from 20.1 to 14.2 ms, the GRU from 75.1 to 63.6 ms), the LSTM at hidden 256 and 512 the same within noise.
constexpr int64_t kMinGroupWork = int64_t{1} << 22;

struct Split {
  int parts;
  bool by_rows;
};

Split split_of(const Loop& loop) {
  const int64_t work = static_cast<int64_t>(loop.steps) * loop.batch * loop.hidden * loop.gates * loop.hidden;
  const int64_t groups = std::min<int64_t>({loop.threads, loop.batch / kGroupRows, work / kMinGroupWork});
  if (groups > 1) return {static_cast<int>(groups), true};
  return {team_size(loop.batch, loop.hidden, loop.gates, loop.threads), false};
}

// Rows [begin, end) of group g of `groups` over N rows, shared out as evenly as possible.
void group_rows(int N, int g, int groups, int* begin, int* end) {
  *begin = static_cast<int>(static_cast<int64_t>(N) * g / groups);
  *end = static_cast<int>(static_cast<int64_t>(N) * (g + 1) / groups);
}

// Runs run(b0, b1, u0, u1, group, barrier) for each part of `split`'s: each group of rows (all units, no barrier:
// null; `share_out`), or each member's units of every row (group 0) on a team of `split.parts` threads.
template <typename Run>
void run_split(ffi::ThreadPool& pool, const Loop& loop, const Split& split, Run run) {
  if (split.by_rows) {
    return share_out(pool, split.parts, split.parts, [&](int group, int) {
      int b0, b1;
      group_rows(loop.batch, group, split.parts, &b0, &b1);
      run(b0, b1, 0, loop.hidden, group, static_cast<Barrier*>(nullptr));
    });
  }
  team(pool, split.parts, [&](int part, int parts, Barrier& barrier) {
    int u0, u1;
    units_of(loop.hidden, part, parts, &u0, &u1);
    run(0, loop.batch, u0, u1, 0, &barrier);
  });
}

// Inputs a forward loop projects itself (`lstm_forward_inputs`, `lstm_infer`, `gru_forward_inputs`): xs [T, B, size]
// and W_x [size, gates·H]; with a bias [gates·H] (`apart`: the GRU, whose n gate takes h W_hn alone), in a matmul
// of their own, not joined to the recurrent one, and the bias added to it.
struct Inputs {
  const float* xs;
  const float* w_x;
  int size;
  const float* apart = nullptr;
};

// The loop and the inputs of a kernel that projects xs [T, B, I] by w_x [I, gates·H] itself (w_h [H, gates·H]),
// masked by `valid` where given (`mask_of`).
ffi::Error inputs_loop(const ffi::Buffer<ffi::F32>& w_h, const ffi::Buffer<ffi::F32>& w_x,
                       const ffi::Buffer<ffi::F32>& xs, int gates, const ffi::Buffer<ffi::PRED>* valid, bool reverse,
                       int64_t threads, Loop* loop, Inputs* inputs) {
  *inputs = Inputs{xs.typed_data(), w_x.typed_data(), static_cast<int>(xs.dimensions()[2])};
  if (auto error = loop_of(xs.dimensions(), w_h.dimensions()[1], gates, reverse, threads, loop); error.failure())
    return error;
  return mask_of(valid, loop);
}

// The forward loop of a cell. Each part owns rows [b0, b1) and hidden units [u0, u0 + nu) (`split_of`) and the
// columns of W_h that make those units (of every gate block, packed in order of gate); per step it computes
// z = h_{t-1} W_h for its rows and columns and calls step(t, prev, b, u0, nu, z_b, keep) for each of its rows b
// (z_b: [gates·nu], gate blocks of nu), which writes h_t's units among whatever else the cell keeps. With keep the
// step is masked out: the loop has copied h_{t-1}'s units to h_t's, the cell copies on its other carries, and z_b
// is null (a masked kernel's matmul skips such rows). A team that splits the units meets at a barrier after each
// step, after which h_t is whole. With `inputs` z also holds x_t W_x: one matmul of the rows [h_{t-1}, x_t] by
// [W_h; W_x], so no projection of all steps is written to memory and read back; with `inputs->apart` z_b is
// [h_{t-1} W_h's gate blocks of nu, then x_t W_x + bias's], two matmuls. A masked step projects its valid rows'
// inputs alone.
template <typename Step>
void forward_loop(ffi::ThreadPool& pool, const Loop& loop, const float* w_h, const float* h0, float* hs,
                  Step step, const Inputs* inputs = nullptr) {
  const bool joins = inputs != nullptr && inputs->apart == nullptr, apart = inputs != nullptr && !joins;
  const int H = loop.hidden, G = loop.gates * H, I = inputs == nullptr ? 0 : inputs->size, K = H + (joins ? I : 0);
  run_split(pool, loop, split_of(loop), [&](int b0, int b1, int u0, int u1, int, Barrier* barrier) {
    const int nu = u1 - u0, width = loop.gates * nu, rows = b1 - b0, z_row = apart ? 2 * width : width;
    const std::vector<int> columns = unit_columns(H, loop.gates, u0, nu);
    const std::vector<float> panel = pack(K, width, [&](int k, int j) {
      return k < H ? w_h[k * G + columns[j]] : inputs->w_x[(k - H) * G + columns[j]];
    });
    std::vector<float> panel_x, bias_x;  // apart: W_x's columns of this part, and the bias's
    if (apart) {
      panel_x = pack(I, width, [&](int k, int j) { return inputs->w_x[k * G + columns[j]]; });
      for (int j = 0; j < width; ++j) bias_x.push_back(inputs->apart[columns[j]]);
    }
    std::vector<float> z(static_cast<size_t>(rows) * z_row), gathered, gathered_x,
        joined(joins ? static_cast<size_t>(rows) * K : 0);
    std::vector<int> live;
    for (int s = 0; s < loop.steps; ++s) {
      const int t = loop.time(s), prev = loop.previous(s);
      const float* h_prev = prev < 0 ? h0 : hs + loop.row(prev, 0) * H;
      const float* a = h_prev + static_cast<size_t>(b0) * H;
      const float* x = inputs == nullptr ? nullptr : inputs->xs + loop.row(t, b0) * I;
      const int n = live_rows(loop, t, b0, b1, live);  // the rows computed (a masked step's valid ones)
      if (joins) {  // row i of [h_{t-1}, x_t], the i-th computed row's
        for (int i = 0; i < n; ++i) {
          const size_t row = n == rows ? i : live[i];
          std::memcpy(&joined[static_cast<size_t>(i) * K], a + row * H, H * sizeof(float));
          std::memcpy(&joined[static_cast<size_t>(i) * K + H], x + row * I, I * sizeof(float));
        }
        if (n > 0) matmul(n, width, K, joined.data(), K, panel.data(), z.data(), z_row);
      } else {
        live_matmul(rows, n, live, width, H, a, panel.data(), z.data(), gathered, z_row);
      }
      if (apart) {  // x_t W_x + bias, after the recurrent gate blocks of each row
        live_matmul(rows, n, live, width, I, x, panel_x.data(), z.data() + width, gathered_x, z_row);
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < width; j += kLanes) {
            float* zx = &z[static_cast<size_t>(i) * z_row + width + j];
            store(zx, load(zx) + load(&bias_x[j]));
          }
      }
      for (int b = b0, i = 0; b < b1; ++b) {  // z's row i is the i-th computed row's
        const bool keep = loop.keeps(t, b);
        if (keep) hold(hs + loop.row(t, b) * H + u0, h_prev + static_cast<size_t>(b) * H + u0, nu);
        step(t, prev, b, u0, nu, keep ? nullptr : &z[static_cast<size_t>(i++) * z_row], keep);
      }
      if (barrier != nullptr) barrier->wait();
    }
  });
}

// The backward loop of a cell: the transpose of its tangent recurrence. Each part owns rows [b0, b1) and hidden
// units [u0, u0 + nu) (`split_of`) and the rows of W_h those units feed. `make_part(b0, b1, u0, nu)` returns the
// cell's per-part state, with
//   step(s, b, dh_b, keep): from this part's units of row b's g_h_t (dh_b, the carry's cotangent plus nothing yet
//     from the step's own output; the cell adds g_hs) writes its columns of the step's recurrent cotangent, the row
//     that multiplies W_hᵀ, and whatever else the cell returns; with keep (a masked-out step) zeros there, and the
//     cell's other carries' cotangents pass unchanged (the loop hands on h's, g_hs[t] + dh_b);
//   row(s): that recurrent cotangent, [B, gates·H] (complete, where a team splits the units, after the barrier);
//   carry(dh): adds to g_h_{t-1} = row(s) W_hᵀ (already in dh, [b1 - b0, nu]) the direct terms of the cell;
//   finish(): writes the cotangents of the initial carry other than h's.
// g_h0 gets this part's rows and units of the hidden state's cotangent at the end. With g_w (not null), each part
// also accumulates its columns of W_h's gradient, Σ_t h_{t-1}ᵀ row(s) over its rows (masked: its valid rows), from
// its own columns of the rows, every grad_steps(b1 - b0) steps, before the barrier (hs [T, B, H] and h0 give
// h_{t-1}); row(s) must stay readable, in this part's rows and columns, for that many steps. Groups of rows each
// form the whole gradient over their rows, the first in g_w and the others in buffers of their own, added to g_w at
// the end. With `bias_row` g_w has one more row, H, where the same rows of row(s) are summed: the gradient of a bias
// added to h_{t-1} W_h (the GRU's b_h), as if h_{t-1} had one more unit, always 1.
template <typename MakePart>
void backward_loop(ffi::ThreadPool& pool, const Loop& loop, const float* w_h, const float* hs, const float* h0,
                   const float* g_hs, const float* g_h, float* g_h0, float* g_w, MakePart make_part,
                   bool bias_row = false) {
  const int H = loop.hidden, G = loop.gates * H, weight_rows = H + (bias_row ? 1 : 0);
  const Split split = split_of(loop);
  // Each group's but the first W_h gradient, allocated (and zeroed below) by the group.
  std::vector<std::vector<float>> other_g_w(g_w != nullptr && split.by_rows ? split.parts - 1 : 0);
  run_split(pool, loop, split, [&](int b0, int b1, int u0, int u1, int group, Barrier* barrier) {
    const int nu = u1 - u0, rows = b1 - b0;
    if (g_w != nullptr && group > 0) other_g_w[group - 1].resize(static_cast<size_t>(weight_rows) * G);
    float* gw = g_w == nullptr || group == 0 ? g_w : other_g_w[group - 1].data();
    // panel[k, u] = W_h[u0 + u, k], so that this part's units of g_h_{t-1} are row(s) @ panel.
    const std::vector<float> panel = pack(G, nu, [&](int k, int u) { return w_h[(u0 + u) * G + k]; });
    // dh, kept: this part's rows and units, [rows, nu]; row b at (b - b0)·nu.
    std::vector<float> dh(static_cast<size_t>(rows) * nu), kept(loop.valid != nullptr ? dh.size() : 0), gathered,
        live_dh;
    std::vector<int> live, summed;
    for (int b = b0; b < b1; ++b) std::memcpy(&dh[(b - b0) * nu], g_h + b * H + u0, nu * sizeof(float));
    if (gw != nullptr) {
      for (int k = 0; k < weight_rows; ++k)
        for (int q = 0; q < loop.gates; ++q) std::memset(gw + k * G + q * H + u0, 0, nu * sizeof(float));
    }
    auto cell = make_part(b0, b1, u0, nu);
    std::vector<float> panel_a, panel_b;
    const int flush = grad_steps(rows);
    int pending = loop.steps;  // steps [s + 1, pending) are not yet in gw
    for (int s = loop.steps - 1; s >= 0; --s) {
      const int t = loop.time(s);
      for (int b = b0; b < b1; ++b) {
        float* dh_b = &dh[static_cast<size_t>(b - b0) * nu];
        const bool keep = loop.keeps(t, b);
        if (keep) {  // the cotangent of h_t, handed on to h_{t-1} after the matmul
          const float* g = g_hs + loop.row(t, b) * H + u0;
          for (int j = 0; j < nu; ++j) kept[(b - b0) * nu + j] = g[j] + dh_b[j];
        }
        cell.step(s, b, dh_b, keep);
      }
      if (gw != nullptr && (pending - s == flush || s == 0)) {
        // The sum's rows r: step s + r / rows, row b0 + r % rows; masked, only the valid ones (`summed`), since a
        // kept row's recurrent cotangent is zero.
        if (loop.valid != nullptr) {
          summed.clear();
          for (int r = 0; r < (pending - s) * rows; ++r)
            if (!loop.keeps(loop.time(s + r / rows), b0 + r % rows)) summed.push_back(r);
        }
        const int count = loop.valid != nullptr ? static_cast<int>(summed.size()) : (pending - s) * rows;
        auto index = [&](int i) { return loop.valid != nullptr ? summed[i] : i; };
        auto h_prev = [&](int i) {
          const int r = index(i), prev = loop.previous(s + r / rows);
          return (prev < 0 ? h0 : hs + loop.row(prev, 0) * H) + static_cast<size_t>(b0 + r % rows) * H;
        };
        auto cotangent = [&](int i) {
          const int r = index(i);
          return cell.row(s + r / rows) + static_cast<size_t>(b0 + r % rows) * G;
        };
        weight_grad_add(H, loop.gates, u0, nu, count, h_prev, cotangent, gw, panel_a, panel_b);
        if (bias_row) {
          float* bias = gw + static_cast<size_t>(H) * G;
          for (int i = 0; i < count; ++i) {
            const float* row = cotangent(i);
            for (int q = 0; q < loop.gates; ++q)
              for (int j = 0; j < nu; j += kLanes) {
                const int col = q * H + u0 + j;
                store(bias + col, load(bias + col) + load(row + col));
              }
          }
        }
        pending = s;
      }
      if (barrier != nullptr) barrier->wait();  // every unit's recurrent cotangent of the step is written
      // The kept rows' recurrent cotangents are zero: only the others' enter the matmul, scattered to dh after.
      const int n = live_rows(loop, t, b0, b1, live);
      if (n < rows) live_dh.resize(static_cast<size_t>(n) * nu);
      live_matmul(rows, n, live, nu, G, cell.row(s) + static_cast<size_t>(b0) * G, panel.data(),
                  n == rows ? dh.data() : live_dh.data(), gathered);
      if (n < rows)
        for (int i = 0; i < n; ++i)
          hold(&dh[static_cast<size_t>(live[i]) * nu], &live_dh[static_cast<size_t>(i) * nu], nu);
      cell.carry(dh);
      for (int b = b0; b < b1; ++b)
        if (loop.keeps(t, b)) hold(&dh[(b - b0) * nu], &kept[(b - b0) * nu], nu);
    }
    for (int b = b0; b < b1; ++b) std::memcpy(g_h0 + b * H + u0, &dh[(b - b0) * nu], nu * sizeof(float));
    cell.finish();
  });
  for (const std::vector<float>& other : other_g_w)  // in order of group: the same sum whichever thread ran which
    for (size_t k = 0; k < other.size(); ++k) g_w[k] += other[k];
}

// W_h's gradient, or nothing when the caller computes it itself (`weight_grad` off: under vmap, one per example).
float* weight_gradient(ffi::Result<ffi::Buffer<ffi::F32>>& g_w, bool weight_grad) {
  if (weight_grad) return g_w->typed_data();
  std::memset(g_w->typed_data(), 0, g_w->element_count() * sizeof(float));
  return nullptr;
}

using Buffer = ffi::Buffer<ffi::F32>;
using Result = ffi::ResultBuffer<ffi::F32>;
using Mask = ffi::Buffer<ffi::PRED>;

// A cell kernel's loop over `seq` [T, B, gates·H] (its px, or what it saved of the same width), masked by `valid`
// where given (`mask_of`).
ffi::Error sequence_loop(const Buffer& seq, int gates, const Mask* valid, bool reverse, int64_t threads, Loop* loop) {
  if (auto error = loop_of(seq.dimensions(), seq.dimensions()[2], gates, reverse, threads, loop); error.failure())
    return error;
  return mask_of(valid, loop);
}
const vf kOne = splat(1.0f);

// A function whose every call must run the same machine code: neither inlined nor (GCC) cloned for constant
// arguments. Clang has no `noclone`.
#if defined(__clang__)
#define RNNLAB_ONE_COPY __attribute__((noinline))
#else
#define RNNLAB_ONE_COPY __attribute__((noinline, noclone))
#endif

// --- LSTM: z = px_t + h_{t-1} W_h, gates (i, f, g, o) ------------------------------------------------------------

// One vector of units of an LSTM step: the gates from the recurrent matmul's z (gate blocks of nu) and the input's
// share px (gate blocks of H), and the new cell state from the one before.
struct LstmUnits {
  vf i, f, g, o, c;
};

inline LstmUnits lstm_units(const float* z, int nu, const float* px, int H, vf c_prev) {
  const vf i = vsigmoid(load(z) + load(px)), f = vsigmoid(load(z + nu) + load(px + H));
  const vf g = vtanh(load(z + 2 * nu) + load(px + 2 * H)), o = vsigmoid(load(z + 3 * nu) + load(px + 3 * H));
  return {i, f, g, o, f * c_prev + i * g};
}

// The LSTM's forward loop: each step's input share read from px [T, B, 4H] (`px_rows` 4H), or, with `inputs`, its
// projection in the step's matmul and px the bias [4H] (`px_rows` 0: every row reads it).
void lstm_forward(ffi::ThreadPool& pool, const Loop& loop, const float* w_h, const float* H0, const float* C0,
                  const float* PX, size_t px_rows, const Inputs* inputs, float* HS, float* CS, float* GATES) {
  const int H = loop.hidden, G = 4 * H;
  forward_loop(pool, loop, w_h, H0, HS, [&](int t, int prev, int b, int u0, int nu, const float* z, bool keep) {
    const float* pxb = PX + loop.row(t, b) * px_rows + u0;
    const float* c_prev = (prev < 0 ? C0 + b * H : CS + loop.row(prev, b) * H) + u0;
    float* gb = GATES + loop.row(t, b) * G + u0;
    const size_t at = loop.row(t, b) * H + u0;
    if (keep) {  // the saved gates of a kept step are never used: zeros, so that nothing stale is left there
      hold(CS + at, c_prev, nu);
      for (int q = 0; q < 4; ++q) std::memset(gb + q * H, 0, nu * sizeof(float));
      return;
    }
    for (int j = 0; j < nu; j += kLanes) {
      const LstmUnits u = lstm_units(z + j, nu, pxb + j, H, load(c_prev + j));
      store(gb + j, u.i);
      store(gb + H + j, u.f);
      store(gb + 2 * H + j, u.g);
      store(gb + 3 * H + j, u.o);
      store(CS + at + j, u.c);
      store(HS + at + j, u.o * vtanh(u.c));
    }
  }, inputs);
}

ffi::Error LstmForward(ffi::ThreadPool pool, Buffer w, Buffer h0, Buffer c0, Buffer px, const Mask* valid, Result hs,
                       Result cs, Result gates, bool reverse, int64_t threads) {
  Loop loop;
  if (auto error = sequence_loop(px, 4, valid, reverse, threads, &loop); error.failure()) return error;
  lstm_forward(pool, loop, w.typed_data(), h0.typed_data(), c0.typed_data(), px.typed_data(), 4 * loop.hidden,
               nullptr, hs->typed_data(), cs->typed_data(), gates->typed_data());
  return ffi::Error::Success();
}

// lstm_forward_inputs(w_h, w_x [I, 4H], b [4H], h0, c0, xs [T, B, I]) -> hs, cs, gates: lstm_forward on
// px = xs W_x + b, each step's projection in the step's matmul (`Inputs`), so that no [T, B, 4H] projection is
// written to memory and read back: what a differentiated `rnnlab.scan` of an LSTM runs.
ffi::Error LstmForwardInputs(ffi::ThreadPool pool, Buffer w, Buffer w_x, Buffer b, Buffer h0, Buffer c0, Buffer xs,
                             const Mask* valid, Result hs, Result cs, Result gates, bool reverse, int64_t threads) {
  Loop loop;
  Inputs inputs;
  if (auto error = inputs_loop(w, w_x, xs, 4, valid, reverse, threads, &loop, &inputs); error.failure()) return error;
  lstm_forward(pool, loop, w.typed_data(), h0.typed_data(), c0.typed_data(), b.typed_data(), 0, &inputs,
               hs->typed_data(), cs->typed_data(), gates->typed_data());
  return ffi::Error::Success();
}

// lstm_infer(w_h [H, 4H], w_x [I, 4H], b [4H], h0 [B, H], c0 [B, H], xs [T, B, I]) -> hs [T, B, H], c [B, H]: the
// forward pass alone, with each step's input projected in the loop (`Inputs`), and nothing kept for a backward pass
// but the outputs and the final cell state (each row's c updated in place). `rnnlab.scan` of an LSTM runs it where
// nothing differentiates it: at 16,1000,32,128 it took the forward pass from 36-43 to 16 ms, 1.06-1.27x faster than
// torch's at the benchmark's four shapes (benchmarks/bench_forward.py): no projection of all steps and no gates
// written to memory, nor their page faults.
ffi::Error LstmInfer(ffi::ThreadPool pool, Buffer w, Buffer w_x, Buffer b, Buffer h0, Buffer c0, Buffer xs,
                     const Mask* valid, Result hs, Result c_last, bool reverse, int64_t threads) {
  Loop loop;
  Inputs inputs;
  if (auto error = inputs_loop(w, w_x, xs, 4, valid, reverse, threads, &loop, &inputs); error.failure()) return error;
  const int H = loop.hidden;
  float *HS = hs->typed_data(), *C = c_last->typed_data();
  const float* bias = b.typed_data();
  std::memcpy(C, c0.typed_data(), c0.element_count() * sizeof(float));
  forward_loop(pool, loop, w.typed_data(), h0.typed_data(), HS, [&](int t, int, int row, int u0, int nu,
                                                                    const float* z, bool keep) {
    if (keep) return;  // the row's c stays as it is
    const float* bb = bias + u0;
    float* c = C + static_cast<size_t>(row) * H + u0;
    float* h = HS + loop.row(t, row) * H + u0;
    for (int j = 0; j < nu; j += kLanes) {
      const LstmUnits u = lstm_units(z + j, nu, bb + j, H, load(c + j));
      store(c + j, u.c);
      store(h + j, u.o * vtanh(u.c));
    }
  }, &inputs);
  return ffi::Error::Success();
}

ffi::Error LstmBackward(ffi::ThreadPool pool, Buffer w, Buffer gates, Buffer cs, Buffer c0, Buffer hs, Buffer h0,
                        const Mask* valid, Buffer g_hs, Buffer g_h, Buffer g_c, Result g_px, Result g_w, Result g_h0,
                        Result g_c0, bool reverse, int64_t threads, bool weight_grad) {
  Loop loop;
  if (auto error = sequence_loop(gates, 4, valid, reverse, threads, &loop); error.failure()) return error;
  const int H = loop.hidden;
  const float *GATES = gates.typed_data(), *CS = cs.typed_data(), *C0 = c0.typed_data(), *GHS = g_hs.typed_data();
  float *GPX = g_px->typed_data(), *GC0 = g_c0->typed_data();
  struct Part {
    // The cell state's cotangent for this part's rows and units, [b1 - b0, nu].
    std::vector<float> dc;
    int b0, b1, u0, nu;
    const Loop& loop;
    const float *GATES, *CS, *C0, *GHS;
    float *GPX, *GC0;

    void step(int s, int b, float* dh, bool keep) {
      const int H = loop.hidden, G = 4 * H, t = loop.time(s), prev = loop.previous(s);
      const float* gb = GATES + loop.row(t, b) * G + u0;
      const float* c_prev = (prev < 0 ? C0 + b * H : CS + loop.row(prev, b) * H) + u0;
      float* gz = GPX + loop.row(t, b) * G + u0;
      if (keep) {  // the cell state's cotangent passes as it is
        for (int q = 0; q < 4; ++q) std::memset(gz + q * H, 0, nu * sizeof(float));
        return;
      }
      const size_t at = loop.row(t, b) * H + u0;
      float* dcb = &dc[static_cast<size_t>(b - b0) * nu];
      for (int j = 0; j < nu; j += kLanes) {
        const vf i = load(gb + j), f = load(gb + H + j), g = load(gb + 2 * H + j), o = load(gb + 3 * H + j);
        const vf tc = vtanh(load(CS + at + j));
        const vf gh = load(GHS + at + j) + load(dh + j);
        const vf gc = load(dcb + j) + o * (kOne - tc * tc) * gh;
        store(gz + j, gc * g * i * (kOne - i));
        store(gz + H + j, gc * load(c_prev + j) * f * (kOne - f));
        store(gz + 2 * H + j, gc * i * (kOne - g * g));
        store(gz + 3 * H + j, gh * tc * o * (kOne - o));
        store(dcb + j, f * gc);
      }
    }
    const float* row(int s) const { return GPX + loop.row(loop.time(s), 0) * 4 * loop.hidden; }
    void carry(std::vector<float>&) const {}
    void finish() const {
      for (int b = b0; b < b1; ++b)
        std::memcpy(GC0 + b * loop.hidden + u0, &dc[static_cast<size_t>(b - b0) * nu], nu * sizeof(float));
    }
  };
  backward_loop(pool, loop, w.typed_data(), hs.typed_data(), h0.typed_data(), GHS, g_h.typed_data(),
                g_h0->typed_data(), weight_gradient(g_w, weight_grad), [&](int b0, int b1, int u0, int nu) {
    Part part{std::vector<float>(static_cast<size_t>(b1 - b0) * nu), b0, b1, u0, nu, loop, GATES, CS, C0, GHS, GPX,
              GC0};
    for (int b = b0; b < b1; ++b)
      std::memcpy(&part.dc[(b - b0) * nu], g_c.typed_data() + b * H + u0, nu * sizeof(float));
    return part;
  });
  return ffi::Error::Success();
}

// --- GRU (cuDNN / PyTorch convention): a = h_{t-1} W_h + b_h, gates (r, z, n) ---------------------------------------

// The GRU's forward loop: each step's input share read from px [T, B, 3H], or, with `inputs` (apart: the n gate takes
// r ⊙ (h W_hn + b_hn), without the input's part), from the step's own matmul, b_x added by the loop.
void gru_forward(ffi::ThreadPool& pool, const Loop& loop, const float* w_h, const float* BH, const float* H0,
                 const float* PX, const Inputs* inputs, float* HS, float* GATES, float* AN) {
  const int H = loop.hidden, G = 3 * H;
  forward_loop(pool, loop, w_h, H0, HS, [&](int t, int prev, int b, int u0, int nu, const float* a, bool keep) {
    float* gb = GATES + loop.row(t, b) * G + u0;
    const size_t at = loop.row(t, b) * H + u0;
    if (keep) {  // a is null
      for (int q = 0; q < 3; ++q) std::memset(gb + q * H, 0, nu * sizeof(float));
      std::memset(AN + at, 0, nu * sizeof(float));
      return;
    }
    // The input's share: gate blocks of nu after the recurrent ones in a step's own matmul, of H in px.
    const float* xb = inputs != nullptr ? a + 3 * nu : PX + loop.row(t, b) * G + u0;
    const int x_gate = inputs != nullptr ? nu : H;
    const float* h_prev = (prev < 0 ? H0 + b * H : HS + loop.row(prev, b) * H) + u0;
    for (int j = 0; j < nu; j += kLanes) {
      const vf r = vsigmoid(load(xb + j) + load(a + j) + load(BH + u0 + j));
      const vf z = vsigmoid(load(xb + x_gate + j) + load(a + nu + j) + load(BH + H + u0 + j));
      const vf a_n = load(a + 2 * nu + j) + load(BH + 2 * H + u0 + j);
      const vf n = vtanh(load(xb + 2 * x_gate + j) + r * a_n);
      store(gb + j, r);
      store(gb + H + j, z);
      store(gb + 2 * H + j, n);
      store(AN + at + j, a_n);
      store(HS + at + j, (kOne - z) * n + z * load(h_prev + j));
    }
  }, inputs);
}

ffi::Error GruForward(ffi::ThreadPool pool, Buffer w, Buffer b_h, Buffer h0, Buffer px, const Mask* valid, Result hs,
                      Result gates, Result a_n_out, bool reverse, int64_t threads) {
  Loop loop;
  if (auto error = sequence_loop(px, 3, valid, reverse, threads, &loop); error.failure()) return error;
  gru_forward(pool, loop, w.typed_data(), b_h.typed_data(), h0.typed_data(), px.typed_data(), nullptr,
              hs->typed_data(), gates->typed_data(), a_n_out->typed_data());
  return ffi::Error::Success();
}

// gru_forward_inputs(w_h, b_h, w_x [I, 3H], b_x [3H], h0, xs [T, B, I]) -> hs, gates, a_n: gru_forward on
// px = xs W_x + b_x, each step's projection in a matmul of its own, b_x added (`Inputs::apart`).
ffi::Error GruForwardInputs(ffi::ThreadPool pool, Buffer w, Buffer b_h, Buffer w_x, Buffer b_x, Buffer h0, Buffer xs,
                            const Mask* valid, Result hs, Result gates, Result a_n, bool reverse, int64_t threads) {
  Loop loop;
  Inputs inputs;
  if (auto error = inputs_loop(w, w_x, xs, 3, valid, reverse, threads, &loop, &inputs); error.failure()) return error;
  inputs.apart = b_x.typed_data();
  gru_forward(pool, loop, w.typed_data(), b_h.typed_data(), h0.typed_data(), nullptr, &inputs, hs->typed_data(),
              gates->typed_data(), a_n->typed_data());
  return ffi::Error::Success();
}

ffi::Error GruBackward(ffi::ThreadPool pool, Buffer w, Buffer gates, Buffer a_n, Buffer hs, Buffer h0,
                       const Mask* valid, Buffer g_hs, Buffer g_h, Result g_u, Result g_w, Result g_h0, bool reverse,
                       int64_t threads, bool weight_grad) {
  Loop loop;
  if (auto error = sequence_loop(gates, 3, valid, reverse, threads, &loop); error.failure()) return error;
  const int H = loop.hidden, B = loop.batch;
  const float *GATES = gates.typed_data(), *AN = a_n.typed_data(), *HS = hs.typed_data(), *H0 = h0.typed_data(),
              *GHS = g_hs.typed_data();
  float* GU = g_u->typed_data();
  // The cotangent of each step's h W_h, [B, 3H], in `slots` buffers used in turn: two, since a part of a team may
  // write the next step's while another still reads this one's, or, when the kernel forms W_h's gradient, the
  // grad_steps(rows) steps whose contributions to it are summed at once if more (rows: the fewest of a part's).
  const Split split = split_of(loop);
  const int slots = weight_grad ? std::max(2, grad_steps(split.by_rows ? B / split.parts : B)) : 2;
  std::vector<float> recurrent(static_cast<size_t>(slots) * B * 3 * H);
  struct Part {
    // z ⊙ g_h_t for this part's rows and units, [b1 - b0, nu]: the direct path from h_{t-1} to h_t.
    std::vector<float> direct;
    int b0, u0, nu, slots;
    const Loop& loop;
    const float *GATES, *AN, *HS, *H0, *GHS;
    float *GU, *recurrent;

    void step(int s, int b, const float* dh, bool keep) {
      const int H = loop.hidden, G = 3 * H, t = loop.time(s), prev = loop.previous(s);
      const float* gb = GATES + loop.row(t, b) * G + u0;
      const float* h_prev = (prev < 0 ? H0 + b * H : HS + loop.row(prev, b) * H) + u0;
      float* gu = GU + loop.row(t, b) * G + u0;
      float* ga = recurrent + (static_cast<size_t>(s % slots) * loop.batch + b) * G + u0;
      const size_t at = loop.row(t, b) * H + u0;
      if (keep) {
        for (int q = 0; q < 3; ++q) {
          std::memset(gu + q * H, 0, nu * sizeof(float));
          std::memset(ga + q * H, 0, nu * sizeof(float));
        }
        return;
      }
      for (int j = 0; j < nu; j += kLanes) {
        // g_u is written over the gates (aliased): each unit's gates are read before its g_u is written.
        const vf r = load(gb + j), z = load(gb + H + j), n = load(gb + 2 * H + j), a_n = load(AN + at + j);
        const vf gh = load(GHS + at + j) + load(dh + j);
        const vf g_n = (kOne - z) * (kOne - n * n) * gh;
        const vf g_r = g_n * r * (kOne - r) * a_n;
        const vf g_z = (load(h_prev + j) - n) * z * (kOne - z) * gh;
        store(gu + j, g_r);
        store(gu + H + j, g_z);
        store(gu + 2 * H + j, g_n);
        store(ga + j, g_r);
        store(ga + H + j, g_z);
        store(ga + 2 * H + j, g_n * r);
        store(&direct[static_cast<size_t>(b - b0) * nu + j], z * gh);
      }
    }
    const float* row(int s) const {
      return recurrent + static_cast<size_t>(s % slots) * loop.batch * 3 * loop.hidden;
    }
    void carry(std::vector<float>& dh) const {
      for (size_t k = 0; k < dh.size(); ++k) dh[k] += direct[k];
    }
    void finish() const {}
  };
  backward_loop(pool, loop, w.typed_data(), HS, H0, GHS, g_h.typed_data(), g_h0->typed_data(),
                weight_gradient(g_w, weight_grad), [&](int b0, int b1, int u0, int nu) {
    return Part{std::vector<float>(static_cast<size_t>(b1 - b0) * nu), b0, u0, nu, slots, loop, GATES, AN, HS, H0,
                GHS, GU, recurrent.data()};
  }, /*bias_row=*/true);
  return ffi::Error::Success();
}

// --- Elman RNN: h_t = φ(px_t + h_{t-1} W_h) ------------------------------------------------------------------------

// The activation of an Elman RNN, by name, and its derivative written through its output h = φ(z).
enum class Activation { kTanh, kRelu, kLinear };

ffi::Error activation_of(std::string_view name, Activation* activation) {
  if (name == "tanh") {
    *activation = Activation::kTanh;
  } else if (name == "relu") {
    *activation = Activation::kRelu;
  } else if (name == "linear") {
    *activation = Activation::kLinear;
  } else {
    return ffi::Error::InvalidArgument("rnnlab rnn kernel: activation must be tanh, relu or linear");
  }
  return ffi::Error::Success();
}

inline vf activate(Activation a, vf z) {
  if (a == Activation::kTanh) return vtanh(z);
  if (a == Activation::kRelu) return z <= splat(0.0f) ? splat(0.0f) : z;  // nan stays nan, as in jax.nn.relu
  return z;
}

inline vf derivative(Activation a, vf h) {
  if (a == Activation::kTanh) return splat(1.0f) - h * h;
  if (a == Activation::kRelu) return h > splat(0.0f) ? splat(1.0f) : splat(0.0f);
  return splat(1.0f);
}

ffi::Error RnnForward(ffi::ThreadPool pool, Buffer w, Buffer h0, Buffer px, const Mask* valid, Result hs, bool reverse,
                      int64_t threads, std::string_view activation_name) {
  Loop loop;
  Activation act;
  if (auto error = activation_of(activation_name, &act); error.failure()) return error;
  if (auto error = sequence_loop(px, 1, valid, reverse, threads, &loop); error.failure()) return error;
  const int H = loop.hidden;
  const float *PX = px.typed_data(), *H0 = h0.typed_data();
  float* HS = hs->typed_data();
  forward_loop(pool, loop, w.typed_data(), H0, HS, [&](int t, int, int b, int u0, int nu, const float* z,
                                                      bool keep) {
    if (keep) return;  // px's buffer is hs's (aliased): a kept step's px_t is not read
    const size_t at = loop.row(t, b) * H + u0;
    for (int j = 0; j < nu; j += kLanes) store(HS + at + j, activate(act, load(z + j) + load(PX + at + j)));
  });
  return ffi::Error::Success();
}

ffi::Error RnnBackward(ffi::ThreadPool pool, Buffer w, Buffer hs, Buffer h0, const Mask* valid, Buffer g_hs, Buffer g_h,
                       Result g_u, Result g_w, Result g_h0, bool reverse, int64_t threads, bool weight_grad,
                       std::string_view activation_name) {
  Loop loop;
  Activation act;
  if (auto error = activation_of(activation_name, &act); error.failure()) return error;
  if (auto error = sequence_loop(hs, 1, valid, reverse, threads, &loop); error.failure()) return error;
  struct Part {
    int u0, nu;
    const Loop& loop;
    Activation act;
    const float *HS, *GHS;
    float* GU;

    void step(int s, int b, const float* dh, bool keep) const {
      const size_t at = loop.row(loop.time(s), b) * loop.hidden + u0;
      if (keep) {
        std::memset(GU + at, 0, nu * sizeof(float));
        return;
      }
      for (int j = 0; j < nu; j += kLanes)
        store(GU + at + j, (load(GHS + at + j) + load(dh + j)) * derivative(act, load(HS + at + j)));
    }
    const float* row(int s) const { return GU + loop.row(loop.time(s), 0) * loop.hidden; }
    void carry(std::vector<float>&) const {}
    void finish() const {}
  };
  backward_loop(pool, loop, w.typed_data(), hs.typed_data(), h0.typed_data(), g_hs.typed_data(), g_h.typed_data(),
                g_h0->typed_data(), weight_gradient(g_w, weight_grad), [&](int, int, int u0, int nu) {
    return Part{u0, nu, loop, act, hs.typed_data(), g_hs.typed_data(), g_u->typed_data()};
  });
  return ffi::Error::Success();
}

// --- gradient flow: log10 ||∂L/∂h_t|| of L = Σ h_T² / N for every step and configuration ---------------------------
//
// gradflow(w_h [C, H, G], b_h [C, G], w_x [C, I, G], b_x [C, G], h0 [C, N, H], c0 [C, N, H], xs [T, U, N, I],
//          which [C] int32) -> log10 ||∂L/∂h_t|| [C, T], for C configurations of one cell (`cell`: lstm, gru, tanh,
//   relu, linear; b_h is the GRU's and zero for the others, c0 the LSTM's), configuration c on inputs
//   xs[:, which[c]], as rnnlab/gradflow.py's `grad_norms` with its default loss.
// Each configuration runs as groups of 8 to 15 of its rows (`flow_groups`; whole below 16 rows), each group whole on
// one thread (the threads share out the groups, with no barrier), the groups' squared norms added at the end. A
// single configuration of fewer than 16 rows runs on a team of threads that split its hidden units as the cell
// kernels do, meeting at barriers (one per forward step, two per backward step: the norm is a sum over every
// unit). The forward loop projects each step's input and keeps the states and gates in the workspace, then the
// backward loop applies each step's transposed Jacobian to the carry's cotangent, renormalised every step with the
// log10 of its norm summed in double precision, so vanishing and exploding gradients are exact far past float32's
// range. Each thread's columns of W_x, W_h and W_hᵀ stay packed in its cache for all 2T steps. With `chunk` (a
// divisor of T; 0 or T: none) the forward loop keeps only the carry before every chunk of that many steps, and the
// backward loop runs each chunk's forward steps again (the last chunk's are still there) before its transposed
// steps: the workspace holds T / chunk carries and one chunk's states and gates instead of T's.

enum class Cell { kLstm, kGru, kTanh, kRelu, kLinear };

ffi::Error cell_of(std::string_view name, Cell* cell, int* gates) {
  if (name == "lstm") {
    *cell = Cell::kLstm, *gates = 4;
  } else if (name == "gru") {
    *cell = Cell::kGru, *gates = 3;
  } else if (Activation activation; activation_of(name, &activation).success()) {
    *cell = activation == Activation::kTanh ? Cell::kTanh : activation == Activation::kRelu ? Cell::kRelu
                                                                                            : Cell::kLinear;
    *gates = 1;
  } else {
    return ffi::Error::InvalidArgument("rnnlab gradflow kernel: cell must be lstm, gru, tanh, relu or linear");
  }
  return ffi::Error::Success();
}

Activation activation_of(Cell cell) {
  return cell == Cell::kTanh ? Activation::kTanh : cell == Cell::kRelu ? Activation::kRelu : Activation::kLinear;
}

// Floats of one thread's workspace for a configuration: the carry before every chunk of `chunk` steps, a chunk's
// carries before every step and after its last (h, and c for the LSTM) and what its steps' Jacobians need (the
// LSTM's gates, the GRU's gates and a_n), whether each carry is finite, and per-step rows.
size_t flow_workspace(Cell cell, int steps, int rows, int hidden, int gates, int chunk) {
  const size_t per_step = static_cast<size_t>(rows) * hidden, carry = per_step * (cell == Cell::kLstm ? 2 : 1);
  const size_t saved = static_cast<size_t>(chunk) * per_step * (cell == Cell::kLstm || cell == Cell::kGru ? 4 : 0);
  return (steps / chunk) * carry + (chunk + 1) * carry + saved + (steps + 1) + per_step * gates * 3 + per_step * 3;
}

// Σ x² over units [u0, u0 + nu) of the N rows of x [N, H] (nu a multiple of the vector width), summed in float32
// as the plain-JAX engine sums (a square past float32's range is inf there too), lanes added in double.
inline double sum_squares(const float* x, int N, int H, int u0, int nu) {
  vf acc = splat(0.0f);
  for (int b = 0; b < N; ++b)
    for (int j = 0; j < nu; j += kLanes) {
      const vf v = load(x + static_cast<size_t>(b) * H + u0 + j);
      acc += v * v;
    }
  double total = 0.0;
  for (int lane = 0; lane < kLanes; ++lane) total += acc[lane];
  return total;
}

// Whether no lane of a running sum of (x - x) saw inf or nan.
inline bool none_bad(vf bad) {
  for (int lane = 0; lane < kLanes; ++lane)
    if (bad[lane] != 0.0f) return false;
  return true;
}

// The steps per chunk of the gradient-flow kernel: `chunk`, or all `steps` for 0 (no remat) or more than there are.
int flow_chunk(int steps, int64_t chunk) {
  return chunk <= 0 || chunk >= steps ? std::max(steps, 1) : static_cast<int>(chunk);
}

struct Flow {
  Cell cell;
  int steps, sequences, rows, inputs, hidden, gates;  // sequences: U, the inputs' second axis
  int chunk;                                          // steps per chunk, a divisor of steps
  int all_rows;  // N, the rows of the inputs and the carry; `rows` of them, from `row0`, are measured (a group)
  int row0;
};

// A configuration's team: part `part` of `parts` threads, each owning hidden units [u0, u0 + nu) (`units_of`) of
// every carry and cotangent and those units' columns of every gate block; they meet at `barrier`. Shared scratch:
// `partial` (2 · planned doubles: the sums of squares of the cotangents of h and c over each of the `planned`
// parts' units) and `flags` (2 · parts floats: whether each part's units of the state after a step are finite, for
// steps of each parity). `planned`: the team asked for; `parts` is 1 where it did not form (`team`), and that one
// thread then sums the squares over the planned parts' units one by one, so that the numbers do not depend on
// whether the team formed.
struct FlowTeam {
  int part, parts, planned;
  Barrier& barrier;
  double* partial;
  float* flags;
};

// Adds the direct cotangent d [N, H] of a step (a loss of the user's) to the cotangent held as gh (and gc) at log10
// scale `log_scale` (the true cotangent is 10^log_scale · gh): both are brought to the larger scale m of the two, so
// neither a tiny (1e-900) nor a huge scale under- or overflows, and m is returned. A d of zero changes nothing.
// `undefined` (the step's direct cotangent over every row of the configuration, not only this group's, has squares
// summing past float32's range: `direct_overflows`) makes the cotangent nan, so the step and every earlier one are
// nan: the rule of the XLA engine, whose float32 sum is inf there, and of the default loss's 2 h_T / N past 1e19.
double add_direct(const float* d, int N, int H, bool undefined, float* gh, float* gc, double log_scale) {
  const size_t NH = static_cast<size_t>(N) * H;
  if (undefined) {
    for (size_t i = 0; i < NH; ++i) gh[i] = std::numeric_limits<float>::quiet_NaN();
    return 0.0;
  }
  double squares = 0.0;
  for (size_t i = 0; i < NH; ++i) squares += static_cast<double>(d[i]) * d[i];
  if (squares == 0.0) return log_scale;
  const double log_d = 0.5 * std::log10(squares), m = std::max(log_scale, log_d);
  const float old_weight = log_scale == -std::numeric_limits<double>::infinity()
                               ? 0.0f : static_cast<float>(std::pow(10.0, log_scale - m));
  const double d_weight = std::pow(10.0, log_d - m) / std::sqrt(squares);  // d's unit vector, scaled
  for (size_t i = 0; i < NH; ++i) gh[i] = gh[i] * old_weight + static_cast<float>(d[i] * d_weight);
  if (gc != nullptr)
    for (size_t i = 0; i < NH; ++i) gc[i] *= old_weight;
  return m;
}

// What a group's backward step says besides its log10 norm (`flow_one`'s `state`): whether a state of its rows that
// the step's Jacobian reads is not finite, and whether its cotangent is not exactly zero (its log scale not -inf).
constexpr unsigned char kStateNotFinite = 1, kCotangentNonZero = 2;

// Configuration c's rows [f.row0, f.row0 + f.rows) of its N = f.all_rows: the log10 norms of their part of ∂L/∂h_t
// (L's 1 / N kept, so the groups' squared norms add up to the whole's) into `result` [T], in double, nan where the
// cotangent's norm is not finite in float32, and each step's `state` flags; `combine_groups` applies the rule for
// undefined gradients to the whole.
void flow_one(const Flow& f, int c, int sequence, const float* w_h_all, const float* b_h_all, const float* w_x_all,
              const float* b_x_all, const float* h0_all, const float* c0_all, const float* xs,
              const float* direct_all, const unsigned char* direct_overflows, double* result, unsigned char* state,
              float* work, const FlowTeam& team) {
  const int N = f.rows, H = f.hidden, G = f.gates * H, I = f.inputs, T = f.steps;
  const size_t NH = static_cast<size_t>(N) * H, first = (static_cast<size_t>(c) * f.all_rows + f.row0) * H;
  const float *w_h = w_h_all + static_cast<size_t>(c) * H * G, *b_h = b_h_all + static_cast<size_t>(c) * G,
              *w_x = w_x_all + static_cast<size_t>(c) * I * G, *b_x = b_x_all + static_cast<size_t>(c) * G;
  const bool lstm = f.cell == Cell::kLstm, gru = f.cell == Cell::kGru;
  const Activation act = activation_of(f.cell);
  int u0, u1;
  units_of(H, team.part, team.parts, &u0, &u1);
  const int nu = u1 - u0, width = f.gates * nu;
  // The planned parts whose sums of squares this part forms: its own, or all where the team did not form.
  const bool formed = team.parts == team.planned;
  const int sums_from = formed ? team.part : 0, sums_to = formed ? team.part + 1 : team.planned;
  // This part's columns of W_x and W_h (its units of every gate block, in order of gate) and its columns of W_hᵀ.
  const std::vector<int> columns = unit_columns(H, f.gates, u0, nu);
  const std::vector<float> panel_x =
      pack(I, width, [&](int k, int j) { return w_x[static_cast<size_t>(k) * G + columns[j]]; });
  const std::vector<float> panel_h =
      pack(H, width, [&](int k, int j) { return w_h[static_cast<size_t>(k) * G + columns[j]]; });
  const std::vector<float> panel_t =
      pack(G, nu, [&](int k, int u) { return w_h[static_cast<size_t>(u0 + u) * G + k]; });
  // bounds: the carry before each chunk (h, then c for the LSTM); hs[l], cs[l]: the carry before step l of the chunk
  // in hand (l = K: after its last step), saved[l] what its Jacobian needs; finite[t]: whether the carry before step
  // t (of the whole sequence) is finite; zx, zh: each part's [N, width] block of a step's pre-activations.
  const int K = f.chunk, chunks = T / K;
  const size_t carry_floats = (lstm ? 2 : 1) * NH;
  float* bounds = work;
  float* hs = bounds + chunks * carry_floats;
  float* cs = hs + (K + 1) * NH;
  float* saved = cs + (lstm ? (K + 1) * NH : 0);
  const size_t saved_width = (lstm || gru ? 4 : 0) * static_cast<size_t>(H);
  float* finite = saved + K * N * saved_width;
  float* zx = finite + T + 1 + static_cast<size_t>(N) * f.gates * u0;
  float* zh = zx + static_cast<size_t>(N) * G;
  float* dz = finite + T + 1 + 2 * static_cast<size_t>(N) * G;
  float *gh = dz + static_cast<size_t>(N) * G, *gc = gh + NH, *direct = gc + NH;
  // Copies this part's units of every row of a carry [N, H].
  const auto copy_units = [&](float* to, const float* from) {
    for (size_t b = 0; b < static_cast<size_t>(N); ++b) hold(to + b * H + u0, from + b * H + u0, nu);
  };
  copy_units(bounds, h0_all + first);
  if (lstm) copy_units(bounds + NH, c0_all + first);
  if (team.part == 0) finite[0] = 1.0f;  // the initial carry only meets the cotangent after step 0

  // Runs chunk `chunk_index`'s steps from its carry in `bounds`, keeping their carries and gates; on the first pass
  // also whether each state is finite (a rerun finds the same). Neither inlined nor cloned: the first pass and the
  // rerun under remat must run the same machine code, or the compiler may fuse a different multiply and add into an
  // FMA in each copy and the rerun part from the first pass by an ulp (it did, 2.4e-7, with an `exp` left to it).
  const auto forward_chunk = [&](int chunk_index, bool first_pass) RNNLAB_ONE_COPY {
    copy_units(hs, bounds + chunk_index * carry_floats);
    if (lstm) copy_units(cs, bounds + chunk_index * carry_floats + NH);
    team.barrier.wait();  // every unit of the chunk's first carry, for everyone's first matmul
    for (int l = 0; l < K; ++l) {
      const int t = chunk_index * K + l;
      const float* x_t = xs + ((static_cast<size_t>(t) * f.sequences + sequence) * f.all_rows + f.row0) * I;
      matmul(N, width, I, x_t, I, panel_x.data(), zx, width);
      matmul(N, width, H, hs + l * NH, H, panel_h.data(), zh, width);
      vf bad = splat(0.0f);
      for (int b = 0; b < N; ++b) {
        const float *px = zx + b * width, *ph = zh + b * width, *h_prev = hs + l * NH + b * H + u0;
        float* h = hs + (l + 1) * NH + b * H + u0;
        float* s = saved + (static_cast<size_t>(l) * N + b) * saved_width + u0;
        const float *bx = b_x + u0, *bh = b_h + u0;
        for (int j = 0; j < nu; j += kLanes) {
          vf h_new;
          if (lstm) {
            const vf i = vsigmoid(load(px + j) + load(bx + j) + load(ph + j));
            const vf fg = vsigmoid(load(px + nu + j) + load(bx + H + j) + load(ph + nu + j));
            const vf g = vtanh(load(px + 2 * nu + j) + load(bx + 2 * H + j) + load(ph + 2 * nu + j));
            const vf o = vsigmoid(load(px + 3 * nu + j) + load(bx + 3 * H + j) + load(ph + 3 * nu + j));
            const size_t at = static_cast<size_t>(b) * H + u0 + j;
            const vf cell_state = fg * load(cs + l * NH + at) + i * g;
            const vf tc = vtanh(cell_state);
            store(s + j, i), store(s + H + j, fg), store(s + 2 * H + j, g), store(s + 3 * H + j, o);
            store(cs + (l + 1) * NH + at, cell_state);
            bad += cell_state - cell_state;
            h_new = o * tc;
          } else if (gru) {
            const vf a_n = load(ph + 2 * nu + j) + load(bh + 2 * H + j);
            const vf r = vsigmoid(load(px + j) + load(bx + j) + load(ph + j) + load(bh + j));
            const vf z = vsigmoid(load(px + nu + j) + load(bx + H + j) + load(ph + nu + j) + load(bh + H + j));
            const vf n = vtanh(load(px + 2 * nu + j) + load(bx + 2 * H + j) + r * a_n);
            store(s + j, r), store(s + H + j, z), store(s + 2 * H + j, n), store(s + 3 * H + j, a_n);
            h_new = (kOne - z) * n + z * load(h_prev + j);
          } else {
            h_new = activate(act, load(px + j) + load(bx + j) + load(ph + j));
          }
          store(h + j, h_new);
          bad += h_new - h_new;
        }
      }
      // Each part's flag for the step, in the slot of its parity: a part can be one step ahead, not two.
      if (first_pass) team.flags[2 * team.part + t % 2] = none_bad(bad) ? 1.0f : 0.0f;
      team.barrier.wait();  // the state after the step is whole
      if (first_pass && team.part == 0) {  // read after the barriers to come (finite[T]: the first backward one)
        float all = 1.0f;
        for (int q = 0; q < team.parts; ++q) all = std::min(all, team.flags[2 * q + t % 2]);
        finite[t + 1] = all;
      }
    }
  };
  for (int j = 0; j < chunks; ++j) {
    forward_chunk(j, true);
    if (j + 1 < chunks) {
      copy_units(bounds + (j + 1) * carry_floats, hs + K * NH);
      if (lstm) copy_units(bounds + (j + 1) * carry_floats + NH, cs + K * NH);
    }
  }

  // The default loss's gradient 2 h_T / N starts the backward pass with log10 scale 0. Before each transposed step
  // the cotangent is renormalised (its inverse norm folded into the step) and its log10 norm added to the scale; a
  // zero cotangent gets scale -inf, one of norm inf or nan (the loss's gradient at an overflowed state) nan. Every
  // part sums the parts' sums of squares in the same order, so all keep the same scale.
  // With a loss of the user's, its direct cotangents (`direct_all` [C, T, N, H]) enter at every step instead, from a
  // zero cotangent (scale -inf); a team never runs them (`flow_team`), so this thread holds every unit.
  const float* h_final = hs + K * NH;
  const double minus_inf = -std::numeric_limits<double>::infinity();
  double log_scale = direct_all == nullptr ? 0.0 : minus_inf;
  for (int b = 0; b < N; ++b)
    for (int j = 0; j < nu; ++j)
      gh[b * H + u0 + j] = direct_all == nullptr ? 2.0f * h_final[b * H + u0 + j] / f.all_rows : 0.0f;
  if (lstm)
    for (int b = 0; b < N; ++b) std::memset(gc + b * H + u0, 0, nu * sizeof(float));
  for (int t = T - 1; t >= 0; --t) {
    const int l = t % K;  // the step within its chunk, whose forward steps run again unless it is the last
    if (l == K - 1 && t + 1 < T) forward_chunk(t / K, false);
    if (direct_all != nullptr)
      log_scale = add_direct(direct_all + ((static_cast<size_t>(c) * T + t) * f.all_rows + f.row0) * H, N, H,
                             direct_overflows[static_cast<size_t>(c) * T + t] != 0, gh,
                             lstm ? gc : nullptr, log_scale);
    for (int q = sums_from; q < sums_to; ++q) {
      int q0, q1;
      units_of(H, q, team.planned, &q0, &q1);
      team.partial[2 * q] = sum_squares(gh, N, H, q0, q1 - q0);
      team.partial[2 * q + 1] = lstm ? sum_squares(gc, N, H, q0, q1 - q0) : 0.0;
    }
    team.barrier.wait();  // every part's sums
    double squares_h = 0.0, squares_c = 0.0;
    for (int q = 0; q < team.planned; ++q) squares_h += team.partial[2 * q], squares_c += team.partial[2 * q + 1];
    const double squares = squares_h + squares_c;
    float inverse_f = 1.0f;
    if (squares == 0.0) {
      log_scale = minus_inf;
    } else {
      inverse_f = static_cast<float>(1.0 / std::sqrt(squares));
      log_scale += 0.5 * std::log10(squares);
    }
    if (team.part == 0) {
      result[t] = !std::isfinite(squares) ? std::numeric_limits<double>::quiet_NaN()
                  : log_scale + (squares == 0.0 ? 0.0 : 0.5 * std::log10(squares_h / squares));
      state[t] = (finite[t + 1] == 0.0f ? kStateNotFinite : 0) | (log_scale != minus_inf ? kCotangentNonZero : 0);
    }
    const vf inverse = splat(inverse_f);
    // The carry the step before meets (the LSTM's cell state before it, the GRU's h before it, the plain RNN's h
    // after it), with its saved rows prefetched below while this step computes.
    const float* met_before = l == 0 ? nullptr : lstm ? cs + (l - 1) * NH : hs + (gru ? l - 1 : l) * NH;
    for (int b = 0; b < N; ++b) {
      const size_t row = static_cast<size_t>(b) * H + u0;
      const float* s = saved + (static_cast<size_t>(l) * N + b) * saved_width + u0;
      float *ghb = gh + row, *dzb = dz + static_cast<size_t>(b) * G + u0;
      if (met_before != nullptr)  // this row's share of what the step before reads, from memory meanwhile
        for (int j = 0; j < nu; j += kLanes) {
          for (size_t q = 0; q < saved_width; q += H) __builtin_prefetch(s - N * saved_width + q + j);
          __builtin_prefetch(met_before + row + j);
        }
      if (lstm) {
        // The tangent's transpose (rnnlab/fused.py): the cell state's cotangent gathers h's through o·tanh'.
        const float* c_old = cs + l * NH + row;
        float* gcb = gc + row;
        for (int j = 0; j < nu; j += kLanes) {
          const vf i = load(s + j), fg = load(s + H + j), g = load(s + 2 * H + j), o = load(s + 3 * H + j);
          const vf tc = vtanh(load(c_old + NH + j)), dh = load(ghb + j) * inverse;
          const vf dc = load(gcb + j) * inverse + o * (kOne - tc * tc) * dh;
          store(dzb + j, dc * g * i * (kOne - i));
          store(dzb + H + j, dc * load(c_old + j) * fg * (kOne - fg));
          store(dzb + 2 * H + j, dc * i * (kOne - g * g));
          store(dzb + 3 * H + j, dh * tc * o * (kOne - o));
          store(gcb + j, fg * dc);
        }
      } else if (gru) {
        const float* h_prev = hs + l * NH + row;
        for (int j = 0; j < nu; j += kLanes) {
          const vf r = load(s + j), z = load(s + H + j), n = load(s + 2 * H + j), a_n = load(s + 3 * H + j);
          const vf dh = load(ghb + j) * inverse, g_n = (kOne - z) * (kOne - n * n) * dh;
          store(dzb + j, g_n * r * (kOne - r) * a_n);
          store(dzb + H + j, (load(h_prev + j) - n) * z * (kOne - z) * dh);
          store(dzb + 2 * H + j, g_n * r);
          store(direct + row + j, z * dh);
        }
      } else {
        const float* h_new = hs + (l + 1) * NH + row;
        for (int j = 0; j < nu; j += kLanes)
          store(dzb + j, load(ghb + j) * inverse * derivative(act, load(h_new + j)));
      }
    }
    team.barrier.wait();  // every column of the step's pre-activation cotangent
    matmul(N, nu, G, dz, G, panel_t.data(), gh + u0, H);
    if (gru)
      for (int b = 0; b < N; ++b)
        for (int j = 0; j < nu; j += kLanes) {
          float* g = gh + static_cast<size_t>(b) * H + u0 + j;
          store(g, load(g) + load(direct + static_cast<size_t>(b) * H + u0 + j));
        }
  }
}

// The threads that split each configuration's hidden units in the gradient-flow kernel: 1 (configurations, or their
// groups of rows, shared out) unless there is one configuration of fewer than 16 rows and its steps hold enough
// work (`team_size`). Two configurations on two threads run side by side, each whole, in the time of one; split,
// they would take two team runs (a team of two ran a configuration 1.4-1.5x faster than one thread, not 2x).
int flow_team(int64_t configs, int rows, int hidden, int gates, int64_t threads);

// The groups of rows a configuration is measured in, each whole on one thread (no barrier), the groups' squared
// norms added at the end (each row's backward pass is its own: the default loss is a mean over rows): 8 to 15 rows
// a group, however many threads, so the numbers do not depend on the thread count. A configuration with fewer than
// 16 rows runs whole, or on a team (`flow_team`). Measured on the 2-core AVX-512 CPU (2026-11-27, one
// configuration's `grad_norms`, ms, `benchmarks/probe_flow_groups.py`, the team that split hidden units against
// groups of rows): LSTM 16 rows, hidden 128, T 1000: 56-88 against 29; LSTM 64, 128: 221-329 against 114-127 (two
// groups of 32: 165); GRU 32, 128: 89-94 against 66; LSTM 16, 512, T 300: 131-136 against 107. Groups of 8 beat
// groups of 32 where a group's saved rows and W_h's panels crowd the core's L2 (2 of 32 rows: 165 ms; 8 of 8: 114);
// groups of 4 lost (LSTM 32, 512: 358 against 212 ms for 4 of 8: each group streams all of W_h and Wᵀ_h). In the
// sweep (24 configurations of 16 rows, T 500) two groups a configuration were as fast as one. Tried and not kept:
// a number of groups that divides among the threads (24 rows on 2 threads in 2 groups of 12: 72 ms, against 56 in
// 3 groups of 8 with one thread taking two; 28 rows in 2 of 14: 83 against 72 in 9, 9, 10): a group of 12-14 rows
// took 3.0 ms a row where one of 8 took 1.8 (LSTM, hidden 128, T 1000), so the imbalance costs less.
int flow_groups(int rows) { return std::max(1, rows / kGroupRows); }

int flow_team(int64_t configs, int rows, int hidden, int gates, int64_t threads) {
  return configs == 1 && flow_groups(rows) == 1 ? team_size(rows, hidden, gates, threads) : 1;
}

// The workspace, in floats, that each thread measuring groups of a configuration of `rows` rows holds, kept from
// one group to its next: the largest group's (the whole's, or its team's, below 16 rows).
size_t group_workspace(Cell cell, int steps, int rows, int hidden, int gates, int chunk) {
  const int groups = flow_groups(rows);
  return flow_workspace(cell, steps, (rows + groups - 1) / groups, hidden, gates, chunk);
}

// One configuration's log10 norms [T] into `out` from its `count` groups' (`results` and `states`, [count, T]):
// ½ log10 Σ_g 10^(2 l_g), scaled by the largest (-inf where every group's is: no gradient passes). Undefined (nan)
// at step t and every earlier one: a cotangent whose norm is not finite in float32 (the loss's gradient at a state
// past 1e19), or a non-zero cotangent of the whole meeting a state of any row that is not finite — the whole's
// rule, so that the numbers and their kind do not depend on how the rows are grouped.
void combine_groups(const double* results, const unsigned char* states, int count, int T, float* out) {
  bool diverged = false;
  for (int t = T - 1; t >= 0; --t) {
    unsigned char any = 0;
    double top = -std::numeric_limits<double>::infinity();
    for (int g = 0; g < count; ++g) {
      const double l = results[static_cast<size_t>(g) * T + t];
      any |= states[static_cast<size_t>(g) * T + t];
      diverged = diverged || std::isnan(l);
      top = std::max(top, l);
    }
    diverged = diverged || ((any & kStateNotFinite) && (any & kCotangentNonZero));
    double value = top;
    if (diverged) {
      value = std::numeric_limits<double>::quiet_NaN();
    } else if (count > 1 && top != -std::numeric_limits<double>::infinity()) {
      double sum = 0.0;
      for (int g = 0; g < count; ++g) sum += std::pow(10.0, 2.0 * (results[static_cast<size_t>(g) * T + t] - top));
      value = top + 0.5 * std::log10(sum);
    }
    out[t] = static_cast<float>(value);
  }
}

// The gradient-flow kernel, with the default loss (`direct` null) or a loss of the user's given by its direct
// cotangents `direct` [C, T, N, H].
ffi::Error Gradflow(ffi::ThreadPool& pool, Buffer& w_h, Buffer& b_h, Buffer& w_x, Buffer& b_x, Buffer& h0, Buffer& c0,
                    Buffer& xs, ffi::Buffer<ffi::S32>& which, const float* direct, Result& out, int64_t threads,
                    std::string_view cell_name, int64_t chunk) {
  Flow f;
  if (auto error = cell_of(cell_name, &f.cell, &f.gates); error.failure()) return error;
  const auto dims = xs.dimensions();  // [T, U, N, I]
  const int configs = static_cast<int>(which.element_count());
  f.steps = static_cast<int>(dims[0]), f.sequences = static_cast<int>(dims[1]), f.rows = static_cast<int>(dims[2]);
  for (int c = 0; c < configs; ++c)
    if (which.typed_data()[c] < 0 || which.typed_data()[c] >= f.sequences)
      return ffi::Error::InvalidArgument("rnnlab gradflow kernel: an index in `which` is outside the inputs");
  f.inputs = static_cast<int>(dims[3]), f.hidden = static_cast<int>(h0.dimensions()[2]);
  f.all_rows = f.rows, f.row0 = 0;
  if (f.hidden % kLanes != 0)
    return ffi::Error::InvalidArgument("rnnlab gradflow kernel: the hidden size must be a multiple of 16");
  f.chunk = flow_chunk(f.steps, chunk);
  if (f.steps % f.chunk != 0)
    return ffi::Error::InvalidArgument("rnnlab gradflow kernel: chunk must divide the number of steps");
  // Work items: each configuration's groups of rows (`flow_groups`), each measured into its own row of `results`.
  const int groups = flow_groups(f.rows), items = configs * groups;
  const size_t floats = group_workspace(f.cell, f.steps, f.rows, f.hidden, f.gates, f.chunk);
  const size_t per_item = static_cast<size_t>(f.steps);
  std::unique_ptr<double[]> results(new (std::nothrow) double[items * per_item]);
  std::unique_ptr<unsigned char[]> states(new (std::nothrow) unsigned char[items * per_item]);
  if (!results || !states)
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "rnnlab gradflow kernel: no memory for the results");
  // Where each step's direct cotangent, over all rows of its configuration, has squares past float32's range.
  std::vector<unsigned char> direct_overflows(direct != nullptr ? static_cast<size_t>(configs) * f.steps : 0);
  const size_t step_floats = static_cast<size_t>(f.rows) * f.hidden;
  for (size_t i = 0; i < direct_overflows.size(); ++i) {
    double squares = 0.0;
    for (size_t k = 0; k < step_floats; ++k) squares += static_cast<double>(direct[i * step_floats + k]) *
                                                        direct[i * step_floats + k];
    direct_overflows[i] = !(squares <= std::numeric_limits<float>::max());
  }
  std::atomic<bool> out_of_memory{false};
  const auto run = [&](int item, float* work, const FlowTeam& flow_team) {
    const int c = item / groups;
    Flow g = f;
    int end;
    group_rows(f.rows, item % groups, groups, &g.row0, &end);
    g.rows = end - g.row0;
    flow_one(g, c, which.typed_data()[c], w_h.typed_data(), b_h.typed_data(), w_x.typed_data(), b_x.typed_data(),
             h0.typed_data(), c0.typed_data(), xs.typed_data(), direct, direct_overflows.data(),
             &results[item * per_item], &states[item * per_item], work, flow_team);
  };
  // One configuration of fewer than 16 rows: a team that splits its hidden units (where its steps hold enough work
  // for that, as for the cell kernels); else the threads take the groups in turn (`share_out`).
  // (At most the pool's threads, so that the team forms whole or not at all: `FlowTeam`'s planned parts.)
  const int split = direct != nullptr ? 1 : static_cast<int>(std::min<int64_t>(
      flow_team(configs, f.rows, f.hidden, f.gates, threads), pool.num_threads()));
  if (split > 1) {
    std::unique_ptr<float[]> work(new (std::nothrow) float[floats]);
    if (!work) out_of_memory = true;
    std::vector<double> partial(2 * split);
    std::vector<float> flags(2 * split);
    if (!out_of_memory)
      team(pool, split, [&](int part, int parts, Barrier& barrier) {
        run(0, work.get(), FlowTeam{part, parts, split, barrier, partial.data(), flags.data()});
      });
  } else {  // each thread's workspace allocated at its first group, kept for its next
    std::vector<std::unique_ptr<float[]>> works(share_slots(pool, items, threads));
    share_out(pool, items, threads, [&](int item, int slot) {
      if (!works[slot]) works[slot].reset(new (std::nothrow) float[floats]);
      if (!works[slot]) {
        out_of_memory = true;
        return;
      }
      Barrier alone(1);
      double partial[2];
      float flags[2];
      run(item, works[slot].get(), FlowTeam{0, 1, 1, alone, partial, flags});
    });
  }
  if (out_of_memory)
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "rnnlab gradflow kernel: no memory for the workspace (" +
                      std::to_string(floats * sizeof(float) >> 20) + " MiB per thread); use remat");
  for (int c = 0; c < configs; ++c)
    combine_groups(&results[c * groups * per_item], &states[c * groups * per_item], groups, f.steps,
                   out->typed_data() + c * per_item);
  return ffi::Error::Success();
}

ffi::Error GradflowImpl(ffi::ThreadPool pool, Buffer w_h, Buffer b_h, Buffer w_x, Buffer b_x, Buffer h0, Buffer c0,
                        Buffer xs, ffi::Buffer<ffi::S32> which, Result out, int64_t threads,
                        std::string_view cell_name, int64_t chunk) {
  return Gradflow(pool, w_h, b_h, w_x, b_x, h0, c0, xs, which, nullptr, out, threads, cell_name, chunk);
}

ffi::Error GradflowDirectImpl(ffi::ThreadPool pool, Buffer w_h, Buffer b_h, Buffer w_x, Buffer b_x, Buffer h0,
                              Buffer c0, Buffer xs, ffi::Buffer<ffi::S32> which, Buffer direct, Result out,
                              int64_t threads, std::string_view cell_name, int64_t chunk) {
  const auto dims = direct.dimensions();  // [C, T, N, H]
  if (dims.size() != 4 || dims[0] != static_cast<int64_t>(which.element_count()) || dims[1] != xs.dimensions()[0] ||
      dims[2] != xs.dimensions()[2] || dims[3] != h0.dimensions()[2])
    return ffi::Error::InvalidArgument("rnnlab gradflow kernel: direct must be [C, T, N, H]");
  return Gradflow(pool, w_h, b_h, w_x, b_x, h0, c0, xs, which, direct.typed_data(), out, threads, cell_name, chunk);
}

// The FFI signature of a kernel: the thread pool, `Args` float32 operands and `Rets` float32 results, then the
// attributes that `attributes` adds to the binding (`signature`: `reverse` and `threads`).
template <int Args, int Rets, typename Binding, typename Attributes>
auto bind(Binding binding, Attributes attributes) {
  if constexpr (Args > 0) {
    return bind<Args - 1, Rets>(std::move(binding).template Arg<Buffer>(), attributes);
  } else if constexpr (Rets > 0) {
    return bind<0, Rets - 1>(std::move(binding).template Ret<Buffer>(), attributes);
  } else {
    return attributes(std::move(binding));
  }
}

template <int Args, int Rets, typename Attributes>
auto operands(Attributes attributes) {
  return bind<Args, Rets>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>(), attributes);
}

template <int Args, int Rets>
auto signature() {
  return operands<Args, Rets>([](auto&& binding) {
    return std::move(binding).template Attr<bool>("reverse").template Attr<int64_t>("threads");
  });
}

// Each cell kernel's FFI entry points, unmasked and masked (the mask after the first `Before` operands).
ffi::Error LstmForwardImpl(ffi::ThreadPool pool, Buffer w, Buffer h0, Buffer c0, Buffer px, Result hs, Result cs,
                           Result gates, bool reverse, int64_t threads) {
  return LstmForward(pool, w, h0, c0, px, nullptr, hs, cs, gates, reverse, threads);
}
ffi::Error LstmForwardMaskedImpl(ffi::ThreadPool pool, Buffer w, Buffer h0, Buffer c0, Buffer px, Mask valid,
                                 Result hs, Result cs, Result gates, bool reverse, int64_t threads) {
  return LstmForward(pool, w, h0, c0, px, &valid, hs, cs, gates, reverse, threads);
}
ffi::Error LstmForwardInputsImpl(ffi::ThreadPool pool, Buffer w, Buffer w_x, Buffer b, Buffer h0, Buffer c0,
                                 Buffer xs, Result hs, Result cs, Result gates, bool reverse, int64_t threads) {
  return LstmForwardInputs(pool, w, w_x, b, h0, c0, xs, nullptr, hs, cs, gates, reverse, threads);
}
ffi::Error LstmForwardInputsMaskedImpl(ffi::ThreadPool pool, Buffer w, Buffer w_x, Buffer b, Buffer h0, Buffer c0,
                                       Buffer xs, Mask valid, Result hs, Result cs, Result gates, bool reverse,
                                       int64_t threads) {
  return LstmForwardInputs(pool, w, w_x, b, h0, c0, xs, &valid, hs, cs, gates, reverse, threads);
}
ffi::Error LstmInferImpl(ffi::ThreadPool pool, Buffer w, Buffer w_x, Buffer b, Buffer h0, Buffer c0, Buffer xs,
                         Result hs, Result c_last, bool reverse, int64_t threads) {
  return LstmInfer(pool, w, w_x, b, h0, c0, xs, nullptr, hs, c_last, reverse, threads);
}
ffi::Error LstmInferMaskedImpl(ffi::ThreadPool pool, Buffer w, Buffer w_x, Buffer b, Buffer h0, Buffer c0, Buffer xs,
                               Mask valid, Result hs, Result c_last, bool reverse, int64_t threads) {
  return LstmInfer(pool, w, w_x, b, h0, c0, xs, &valid, hs, c_last, reverse, threads);
}
ffi::Error LstmBackwardImpl(ffi::ThreadPool pool, Buffer w, Buffer gates, Buffer cs, Buffer c0, Buffer hs, Buffer h0,
                            Buffer g_hs, Buffer g_h, Buffer g_c, Result g_px, Result g_w, Result g_h0, Result g_c0,
                            bool reverse, int64_t threads, bool weight_grad) {
  return LstmBackward(pool, w, gates, cs, c0, hs, h0, nullptr, g_hs, g_h, g_c, g_px, g_w, g_h0, g_c0, reverse,
                      threads, weight_grad);
}
ffi::Error LstmBackwardMaskedImpl(ffi::ThreadPool pool, Buffer w, Buffer gates, Buffer cs, Buffer c0, Buffer hs,
                                  Buffer h0, Mask valid, Buffer g_hs, Buffer g_h, Buffer g_c, Result g_px, Result g_w,
                                  Result g_h0, Result g_c0, bool reverse, int64_t threads, bool weight_grad) {
  return LstmBackward(pool, w, gates, cs, c0, hs, h0, &valid, g_hs, g_h, g_c, g_px, g_w, g_h0, g_c0, reverse,
                      threads, weight_grad);
}
ffi::Error GruForwardImpl(ffi::ThreadPool pool, Buffer w, Buffer b_h, Buffer h0, Buffer px, Result hs, Result gates,
                          Result a_n, bool reverse, int64_t threads) {
  return GruForward(pool, w, b_h, h0, px, nullptr, hs, gates, a_n, reverse, threads);
}
ffi::Error GruForwardMaskedImpl(ffi::ThreadPool pool, Buffer w, Buffer b_h, Buffer h0, Buffer px, Mask valid,
                                Result hs, Result gates, Result a_n, bool reverse, int64_t threads) {
  return GruForward(pool, w, b_h, h0, px, &valid, hs, gates, a_n, reverse, threads);
}
ffi::Error GruForwardInputsImpl(ffi::ThreadPool pool, Buffer w, Buffer b_h, Buffer w_x, Buffer b_x, Buffer h0,
                                Buffer xs, Result hs, Result gates, Result a_n, bool reverse, int64_t threads) {
  return GruForwardInputs(pool, w, b_h, w_x, b_x, h0, xs, nullptr, hs, gates, a_n, reverse, threads);
}
ffi::Error GruForwardInputsMaskedImpl(ffi::ThreadPool pool, Buffer w, Buffer b_h, Buffer w_x, Buffer b_x, Buffer h0,
                                      Buffer xs, Mask valid, Result hs, Result gates, Result a_n, bool reverse,
                                      int64_t threads) {
  return GruForwardInputs(pool, w, b_h, w_x, b_x, h0, xs, &valid, hs, gates, a_n, reverse, threads);
}
ffi::Error GruBackwardImpl(ffi::ThreadPool pool, Buffer w, Buffer gates, Buffer a_n, Buffer hs, Buffer h0,
                           Buffer g_hs, Buffer g_h, Result g_u, Result g_w, Result g_h0, bool reverse, int64_t threads,
                           bool weight_grad) {
  return GruBackward(pool, w, gates, a_n, hs, h0, nullptr, g_hs, g_h, g_u, g_w, g_h0, reverse, threads, weight_grad);
}
ffi::Error GruBackwardMaskedImpl(ffi::ThreadPool pool, Buffer w, Buffer gates, Buffer a_n, Buffer hs, Buffer h0,
                                 Mask valid, Buffer g_hs, Buffer g_h, Result g_u, Result g_w, Result g_h0, bool reverse,
                                 int64_t threads, bool weight_grad) {
  return GruBackward(pool, w, gates, a_n, hs, h0, &valid, g_hs, g_h, g_u, g_w, g_h0, reverse, threads, weight_grad);
}
ffi::Error RnnForwardImpl(ffi::ThreadPool pool, Buffer w, Buffer h0, Buffer px, Result hs, bool reverse,
                          int64_t threads, std::string_view activation) {
  return RnnForward(pool, w, h0, px, nullptr, hs, reverse, threads, activation);
}
ffi::Error RnnForwardMaskedImpl(ffi::ThreadPool pool, Buffer w, Buffer h0, Buffer px, Mask valid, Result hs,
                                bool reverse, int64_t threads, std::string_view activation) {
  return RnnForward(pool, w, h0, px, &valid, hs, reverse, threads, activation);
}
ffi::Error RnnBackwardImpl(ffi::ThreadPool pool, Buffer w, Buffer hs, Buffer h0, Buffer g_hs, Buffer g_h, Result g_u,
                           Result g_w, Result g_h0, bool reverse, int64_t threads, bool weight_grad,
                           std::string_view activation) {
  return RnnBackward(pool, w, hs, h0, nullptr, g_hs, g_h, g_u, g_w, g_h0, reverse, threads, weight_grad, activation);
}
ffi::Error RnnBackwardMaskedImpl(ffi::ThreadPool pool, Buffer w, Buffer hs, Buffer h0, Mask valid, Buffer g_hs,
                                 Buffer g_h, Result g_u, Result g_w, Result g_h0, bool reverse, int64_t threads,
                                 bool weight_grad, std::string_view activation) {
  return RnnBackward(pool, w, hs, h0, &valid, g_hs, g_h, g_u, g_w, g_h0, reverse, threads, weight_grad, activation);
}

// The FFI signature of a masked kernel: `Before` float32 operands, the mask, `After` float32 operands, `Rets`
// results, then the attributes that `attributes` adds (`reverse`, `threads` and the kernel's own).
template <int Before, int After, int Rets, typename Attributes>
auto masked(Attributes attributes) {
  return operands<Before, 0>([attributes](auto&& binding) {
    return bind<After, Rets>(std::move(binding).template Arg<Mask>(), attributes);
  });
}

auto loop_attributes = [](auto&& binding) {
  return std::move(binding).template Attr<bool>("reverse").template Attr<int64_t>("threads");
};

auto backward_attributes = [](auto&& binding) {
  return std::move(binding).template Attr<bool>("reverse").template Attr<int64_t>("threads").template Attr<bool>(
      "weight_grad");
};

}  // namespace

// The gradient-flow kernel's workspace per thread for a configuration of `rows` rows, in floats (for
// rnnlab.native.flow_workspace_bytes; `group_workspace`); -1 for an unknown cell.
extern "C" int64_t RnnlabFlowWorkspaceFloats(const char* cell_name, int steps, int rows, int hidden, int chunk) {
  Cell cell;
  int gates;
  if (cell_of(cell_name, &cell, &gates).failure()) return -1;
  return static_cast<int64_t>(group_workspace(cell, steps, rows, hidden, gates, flow_chunk(steps, chunk)));
}

// How the cell kernels' loops share `steps` steps of `batch` rows of `hidden` units and `gates` gate blocks among
// `threads` threads (for rnnlab.native.cell_split): the number of groups of rows, or minus the team's size where a
// team splits the units.
extern "C" int RnnlabCellSplit(int steps, int batch, int hidden, int gates, int64_t threads) {
  Loop loop{steps, batch, hidden, gates, false, threads};
  const Split split = split_of(loop);
  return split.by_rows ? split.parts : -split.parts;
}

// Groups of rows of each configuration in the gradient-flow kernel (for rnnlab.native.flow_groups).
extern "C" int RnnlabFlowGroups(int rows) { return flow_groups(rows); }

// Threads per configuration of the gradient-flow kernel (for rnnlab.native.flow_team); -1 for an unknown cell.
extern "C" int RnnlabFlowTeam(const char* cell_name, int64_t configs, int rows, int hidden, int64_t threads) {
  Cell cell;
  int gates;
  if (cell_of(cell_name, &cell, &gates).failure()) return -1;
  return flow_team(configs, rows, hidden, gates, threads);
}

// Threads that stepped aside since the library was loaded (for rnnlab.native.steps_aside; `step_aside`).
extern "C" int64_t RnnlabStepsAside() { return steps_aside.load(std::memory_order_relaxed); }

// Floats per vector in this build (16 with AVX-512, else 8): for rnnlab.native.vector_lanes.
extern "C" int RnnlabVectorLanes() { return kLanes; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabLstmForward, LstmForwardImpl, (signature<4, 3>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabLstmInfer, LstmInferImpl, (signature<6, 2>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabLstmForwardInputs, LstmForwardInputsImpl, (signature<6, 3>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabGruForwardInputs, GruForwardInputsImpl, (signature<6, 3>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabLstmBackward, LstmBackwardImpl,
                              (signature<9, 4>().Attr<bool>("weight_grad")));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabGruForward, GruForwardImpl, (signature<4, 3>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabGruBackward, GruBackwardImpl,
                              (signature<7, 3>().Attr<bool>("weight_grad")));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabRnnForward, RnnForwardImpl,
                              (signature<3, 1>().Attr<std::string_view>("activation")));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabRnnBackward, RnnBackwardImpl,
                              (signature<5, 3>().Attr<bool>("weight_grad").Attr<std::string_view>("activation")));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabLstmForwardMasked, LstmForwardMaskedImpl, (masked<4, 0, 3>(loop_attributes)));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabLstmInferMasked, LstmInferMaskedImpl, (masked<6, 0, 2>(loop_attributes)));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabLstmForwardInputsMasked, LstmForwardInputsMaskedImpl,
                              (masked<6, 0, 3>(loop_attributes)));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabGruForwardInputsMasked, GruForwardInputsMaskedImpl,
                              (masked<6, 0, 3>(loop_attributes)));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabLstmBackwardMasked, LstmBackwardMaskedImpl,
                              (masked<6, 3, 4>(backward_attributes)));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabGruForwardMasked, GruForwardMaskedImpl, (masked<4, 0, 3>(loop_attributes)));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabGruBackwardMasked, GruBackwardMaskedImpl, (masked<5, 2, 3>(backward_attributes)));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabRnnForwardMasked, RnnForwardMaskedImpl, (masked<3, 0, 1>([](auto&& binding) {
                                return loop_attributes(std::move(binding)).template Attr<std::string_view>(
                                    "activation");
                              })));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabRnnBackwardMasked, RnnBackwardMaskedImpl, (masked<3, 2, 3>([](auto&& binding) {
                                return backward_attributes(std::move(binding)).template Attr<std::string_view>(
                                    "activation");
                              })));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabGradflow, GradflowImpl,
                              (operands<7, 0>([](auto&& binding) {
                                return std::move(binding)
                                    .template Arg<ffi::Buffer<ffi::S32>>()
                                    .template Ret<Buffer>()
                                    .template Attr<int64_t>("threads")
                                    .template Attr<std::string_view>("cell")
                                    .template Attr<int64_t>("chunk");
                              })));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabGradflowDirect, GradflowDirectImpl,
                              (operands<7, 0>([](auto&& binding) {
                                return std::move(binding)
                                    .template Arg<ffi::Buffer<ffi::S32>>()
                                    .template Arg<Buffer>()
                                    .template Ret<Buffer>()
                                    .template Attr<int64_t>("threads")
                                    .template Attr<std::string_view>("cell")
                                    .template Attr<int64_t>("chunk");
                              })));
