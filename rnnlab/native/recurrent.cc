// The sequential loops of the LSTM and the GRU as XLA FFI custom calls on CPU, float32, with the hidden units split
// over threads.
//
// What XLA cannot do here: its per-step matmul [B, H] @ [H, 4H] runs on one core, so at the small shapes of RNN
// research the loops use half of a 2-core machine. Each kernel below owns the whole time loop; every thread owns a
// contiguous range of hidden units (in chunks of 16), holds its slice of W_h packed in its own panel (in cache from
// step to step), and computes its units' matmul columns, gates and state. The threads meet at one barrier per step,
// after which the new state row is complete for everyone's next matmul.
//
// lstm_forward(w_h [H, 4H], h0 [B, H], c0 [B, H], px [T, B, 4H]) -> hs [T, B, H], cs [T, B, H], gates [T, B, 4H]
//   z = px_t + h_{t-1} W_h; (i, f, g, o) = (σ, σ, tanh, σ)(z); c_t = f c_{t-1} + i g; h_t = o tanh c_t
// lstm_backward(w_h, gates, cs, c0, g_hs [T, B, H], g_h [B, H], g_c [B, H]) -> g_px [T, B, 4H], g_h0, g_c0
//   the transpose of the LSTM's tangent recurrence (rnnlab/fused.py) for cotangents g_hs of every h_t and
//   (g_h, g_c) of the final carry: g_px_t is the cotangent of the step's pre-activation z.
// gru_forward(w_h [H, 3H], b_h [3H], h0 [B, H], px [T, B, 3H]) -> hs [T, B, H], saved [T, B, 4H]
//   a = h_{t-1} W_h + b_h; r = σ(px_r + a_r); z = σ(px_z + a_z); n = tanh(px_n + r a_n); h_t = (1 - z) n + z h_{t-1}
//   saved = [r, z, n, a_n]
// gru_backward(w_h, saved, hs, h0, g_hs [T, B, H], g_h [B, H]) -> g_u [T, B, 3H], g_h0
//   the transpose of the GRU's tangent recurrence (rnnlab/fused.py): g_u_t is the cotangent of the tangent's input
//   u_t = ṗx_t + [ȧ_r, ȧ_z, r ȧ_n].
// rnn_forward(w_h [H, H], h0 [B, H], px [T, B, H]) -> hs [T, B, H]: h_t = φ(px_t + h_{t-1} W_h), φ tanh, relu or
//   linear (the `activation` attribute)
// rnn_backward(w_h, hs, g_hs [T, B, H], g_h [B, H]) -> g_u [T, B, H], g_h0: the transpose of the tangent recurrence
//   ḣ_t = φ'(z_t) (u_t + ḣ_{t-1} W_h), with φ' written through h_t.
// `reverse` runs time from the last step to the first, as `lax.scan(..., reverse=True)`.

#include <algorithm>
#include <chrono>
#include <memory>
#include <string_view>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include <sched.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{} + x; }

// exp(x), Cephes' single-precision polynomial (≈ 1 ulp on [-87, 88]).
inline vf vexp(vf x) {
  x = x < splat(88.3762626647949f) ? x : splat(88.3762626647949f);
  x = x > splat(-87.3365478515625f) ? x : splat(-87.3365478515625f);
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
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

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

// C[m, n] = A[m, k] @ B[k, n] for one block of MR rows and NV vectors of columns (row-major, leading dimensions).
template <int MR, int NV>
inline void block(int k_size, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  vf acc[MR][NV] = {};
  for (int k = 0; k < k_size; ++k) {
    vf bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = load(b + k * ldb + v * kLanes);
    for (int i = 0; i < MR; ++i) {
      const float aik = a[i * lda + k];
      for (int v = 0; v < NV; ++v) acc[i][v] += aik * bk[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) store(c + i * ldc + v * kLanes, acc[i][v]);
}

template <int NV>
inline void rows(int m, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  int i = 0;
  for (; i + 8 <= m; i += 8) block<8, NV>(k, a + i * lda, lda, b, ldb, c + i * ldc, ldc);
  if (i + 4 <= m) block<4, NV>(k, a + i * lda, lda, b, ldb, c + i * ldc, ldc), i += 4;
  if (i + 2 <= m) block<2, NV>(k, a + i * lda, lda, b, ldb, c + i * ldc, ldc), i += 2;
  if (i < m) block<1, NV>(k, a + i * lda, lda, b, ldb, c + i * ldc, ldc);
}

// B[k, n] (n a multiple of 16) packed for `matmul`: column blocks of 32 (the last may be 16), each [k, width]
// contiguous, so a block's k rows stream through L1 in order. `at(kk, j)` reads B[kk, j].
template <typename At>
std::vector<float> pack(int k, int n, At at) {
  std::vector<float> packed(static_cast<size_t>(k) * n);
  for (int j = 0; j < n; j += 2 * kLanes) {
    const int width = std::min(2 * kLanes, n - j);
    float* out = &packed[static_cast<size_t>(j) * k];
    for (int kk = 0; kk < k; ++kk)
      for (int jj = 0; jj < width; ++jj) out[kk * width + jj] = at(kk, j + jj);
  }
  return packed;
}

// C[m, n] = A[m, k] @ B[k, n], B as from `pack`.
void matmul(int m, int n, int k, const float* a, int lda, const float* packed, float* c, int ldc) {
  for (int j = 0; j < n; j += 2 * kLanes) {
    const float* b = packed + static_cast<size_t>(j) * k;
    if (n - j >= 2 * kLanes) {
      rows<2>(m, k, a, lda, b, 2 * kLanes, c + j, ldc);
    } else {
      rows<1>(m, k, a, lda, b, kLanes, c + j, ldc);
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
  for (int p = 1; p < parts; ++p) {
    pool.Schedule([state, p, parts, &body, &barrier_ptr] {
      int expected = 0;
      if (!state->joined[p].compare_exchange_strong(expected, 1)) return;  // abandoned: touch nothing else
      int go;
      while ((go = state->go.load(std::memory_order_acquire)) == 0) sched_yield();
      if (go == 1) body(p, parts, *barrier_ptr.load(std::memory_order_acquire));
      state->finished.fetch_add(1, std::memory_order_release);
    });
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(5);
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

// The hidden units of part p: chunks of 16 shared out as evenly as possible.
void units_of(int hidden, int part, int parts, int* begin, int* end) {
  const int chunks = hidden / kLanes;
  *begin = (chunks * part / parts) * kLanes;
  *end = (chunks * (part + 1) / parts) * kLanes;
}

// How many parts to split a loop into: at most `threads`, one chunk of units each, and at least kMinWork
// multiply-adds of the per-step matmul [batch, hidden] @ [hidden, gates·hidden] each, since below that the
// barrier and the exchange of the state between cores cost more than the second core gives (measured: the tanh RNN
// at batch 32, hidden 128 ran slower on two threads than on one).
constexpr int64_t kMinWork = 1 << 19;

int team_size(int64_t batch, int hidden, int gates, int64_t threads) {
  const int64_t work = batch * hidden * gates * static_cast<int64_t>(hidden);
  const int64_t parts = std::min<int64_t>({threads, hidden / kLanes, std::max<int64_t>(1, work / kMinWork)});
  return static_cast<int>(std::max<int64_t>(1, parts));
}

struct Dims {
  int64_t steps, batch, hidden;
};

ffi::Error check(const Dims& d) {
  if (d.hidden % kLanes != 0) return ffi::Error::InvalidArgument("rnnlab lstm kernel: hidden size must be a multiple of 16");
  return ffi::Error::Success();
}

ffi::Error LstmForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                           ffi::Buffer<ffi::F32> px, ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> cs,
                           ffi::ResultBuffer<ffi::F32> gates, bool reverse, int64_t threads) {
  const auto dims = px.dimensions();
  const Dims d{dims[0], dims[1], dims[2] / 4};
  if (auto error = check(d); error.failure()) return error;
  const int T = d.steps, B = d.batch, H = d.hidden, G = 4 * H;
  const float* W = w.typed_data();
  float* HS = hs->typed_data();
  float* CS = cs->typed_data();
  float* GATES = gates->typed_data();
  const float* PX = px.typed_data();
  team(pool, team_size(B, H, 4, threads), [&](int part, int parts, Barrier& barrier) {
    int u0, u1;
    units_of(H, part, parts, &u0, &u1);
    const int nu = u1 - u0;
    // This part's columns of W_h, gate by gate: panel[k, q·nu + u] = W_h[k, q·H + u0 + u].
    const std::vector<float> panel =
        pack(H, 4 * nu, [&](int k, int j) { return W[k * G + (j / nu) * H + u0 + j % nu]; });
    std::vector<float> z(static_cast<size_t>(B) * 4 * nu);
    for (int s = 0; s < T; ++s) {
      const int t = reverse ? T - 1 - s : s;
      const int prev = reverse ? t + 1 : t - 1;
      const float* h_prev = s == 0 ? h0.typed_data() : HS + static_cast<size_t>(prev) * B * H;
      const float* c_prev = s == 0 ? c0.typed_data() : CS + static_cast<size_t>(prev) * B * H;
      matmul(B, 4 * nu, H, h_prev, H, panel.data(), z.data(), 4 * nu);
      for (int b = 0; b < B; ++b) {
        const float* zb = &z[b * 4 * nu];
        const float* pxb = PX + (static_cast<size_t>(t) * B + b) * G + u0;
        float* gb = GATES + (static_cast<size_t>(t) * B + b) * G + u0;
        const size_t row = (static_cast<size_t>(t) * B + b) * H + u0;
        for (int j = 0; j < nu; j += kLanes) {
          const vf i = vsigmoid(load(zb + j) + load(pxb + j));
          const vf f = vsigmoid(load(zb + nu + j) + load(pxb + H + j));
          const vf g = vtanh(load(zb + 2 * nu + j) + load(pxb + 2 * H + j));
          const vf o = vsigmoid(load(zb + 3 * nu + j) + load(pxb + 3 * H + j));
          const vf c = f * load(c_prev + b * H + u0 + j) + i * g;
          store(gb + j, i);
          store(gb + H + j, f);
          store(gb + 2 * H + j, g);
          store(gb + 3 * H + j, o);
          store(CS + row + j, c);
          store(HS + row + j, o * vtanh(c));
        }
      }
      barrier.wait();
    }
  });
  return ffi::Error::Success();
}

ffi::Error LstmBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> gates, ffi::Buffer<ffi::F32> cs,
                            ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> g_hs, ffi::Buffer<ffi::F32> g_h,
                            ffi::Buffer<ffi::F32> g_c, ffi::ResultBuffer<ffi::F32> g_px,
                            ffi::ResultBuffer<ffi::F32> g_h0, ffi::ResultBuffer<ffi::F32> g_c0, bool reverse,
                            int64_t threads) {
  const auto dims = gates.dimensions();
  const Dims d{dims[0], dims[1], dims[2] / 4};
  if (auto error = check(d); error.failure()) return error;
  const int T = d.steps, B = d.batch, H = d.hidden, G = 4 * H;
  const float* W = w.typed_data();
  const float* GATES = gates.typed_data();
  const float* CS = cs.typed_data();
  const float* GHS = g_hs.typed_data();
  float* GPX = g_px->typed_data();
  float* GH0 = g_h0->typed_data();
  float* GC0 = g_c0->typed_data();
  team(pool, team_size(B, H, 4, threads), [&](int part, int parts, Barrier& barrier) {
    int u0, u1;
    units_of(H, part, parts, &u0, &u1);
    const int nu = u1 - u0;
    // This part's rows of W_h, transposed: panel[k, u] = W_h[u0 + u, k], so that g_h = g_z @ panel.
    const std::vector<float> panel = pack(G, nu, [&](int k, int u) { return W[(u0 + u) * G + k]; });
    // The carry's cotangent for this part's units, [B, nu] each.
    std::vector<float> dh(static_cast<size_t>(B) * nu), dc(static_cast<size_t>(B) * nu);
    for (int b = 0; b < B; ++b) {
      std::memcpy(&dh[b * nu], g_h.typed_data() + b * H + u0, nu * sizeof(float));
      std::memcpy(&dc[b * nu], g_c.typed_data() + b * H + u0, nu * sizeof(float));
    }
    for (int s = T - 1; s >= 0; --s) {
      const int t = reverse ? T - 1 - s : s;
      const int prev = reverse ? t + 1 : t - 1;
      const float* c_prev = s == 0 ? c0.typed_data() : CS + static_cast<size_t>(prev) * B * H;
      for (int b = 0; b < B; ++b) {
        const float* gb = GATES + (static_cast<size_t>(t) * B + b) * G + u0;
        float* gz = GPX + (static_cast<size_t>(t) * B + b) * G + u0;
        const size_t row = (static_cast<size_t>(t) * B + b) * H + u0;
        for (int j = 0; j < nu; j += kLanes) {
          const vf i = load(gb + j), f = load(gb + H + j), g = load(gb + 2 * H + j), o = load(gb + 3 * H + j);
          const vf tc = vtanh(load(CS + row + j));
          const vf gh = load(GHS + row + j) + load(&dh[b * nu + j]);
          const vf gc = load(&dc[b * nu + j]) + o * (splat(1.0f) - tc * tc) * gh;
          store(gz + j, gc * g * i * (splat(1.0f) - i));
          store(gz + H + j, gc * load(c_prev + b * H + u0 + j) * f * (splat(1.0f) - f));
          store(gz + 2 * H + j, gc * i * (splat(1.0f) - g * g));
          store(gz + 3 * H + j, gh * tc * o * (splat(1.0f) - o));
          store(&dc[b * nu + j], f * gc);
        }
      }
      barrier.wait();  // every unit's g_z_t is written
      matmul(B, nu, G, GPX + static_cast<size_t>(t) * B * G, G, panel.data(), dh.data(), nu);
    }
    for (int b = 0; b < B; ++b) {
      std::memcpy(GH0 + b * H + u0, &dh[b * nu], nu * sizeof(float));
      std::memcpy(GC0 + b * H + u0, &dc[b * nu], nu * sizeof(float));
    }
  });
  return ffi::Error::Success();
}


ffi::Error GruForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b_h,
                          ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> px, ffi::ResultBuffer<ffi::F32> hs,
                          ffi::ResultBuffer<ffi::F32> saved, bool reverse, int64_t threads) {
  const auto dims = px.dimensions();
  const Dims d{dims[0], dims[1], dims[2] / 3};
  if (auto error = check(d); error.failure()) return error;
  const int T = d.steps, B = d.batch, H = d.hidden, G = 3 * H;
  const float* W = w.typed_data();
  const float* BH = b_h.typed_data();
  const float* PX = px.typed_data();
  float* HS = hs->typed_data();
  float* SAVED = saved->typed_data();
  team(pool, team_size(B, H, 3, threads), [&](int part, int parts, Barrier& barrier) {
    int u0, u1;
    units_of(H, part, parts, &u0, &u1);
    const int nu = u1 - u0;
    // This part's columns of W_h, gate by gate: panel[k, q·nu + u] = W_h[k, q·H + u0 + u].
    const std::vector<float> panel =
        pack(H, 3 * nu, [&](int k, int j) { return W[k * G + (j / nu) * H + u0 + j % nu]; });
    std::vector<float> a(static_cast<size_t>(B) * 3 * nu);
    for (int s = 0; s < T; ++s) {
      const int t = reverse ? T - 1 - s : s;
      const int prev = reverse ? t + 1 : t - 1;
      const float* h_prev = s == 0 ? h0.typed_data() : HS + static_cast<size_t>(prev) * B * H;
      matmul(B, 3 * nu, H, h_prev, H, panel.data(), a.data(), 3 * nu);
      for (int b = 0; b < B; ++b) {
        const float* ab = &a[b * 3 * nu];
        const float* pxb = PX + (static_cast<size_t>(t) * B + b) * G + u0;
        float* sb = SAVED + (static_cast<size_t>(t) * B + b) * 4 * H + u0;
        const size_t row = (static_cast<size_t>(t) * B + b) * H + u0;
        for (int j = 0; j < nu; j += kLanes) {
          const vf r = vsigmoid(load(pxb + j) + load(ab + j) + load(BH + u0 + j));
          const vf z = vsigmoid(load(pxb + H + j) + load(ab + nu + j) + load(BH + H + u0 + j));
          const vf a_n = load(ab + 2 * nu + j) + load(BH + 2 * H + u0 + j);
          const vf n = vtanh(load(pxb + 2 * H + j) + r * a_n);
          store(sb + j, r);
          store(sb + H + j, z);
          store(sb + 2 * H + j, n);
          store(sb + 3 * H + j, a_n);
          store(HS + row + j, (splat(1.0f) - z) * n + z * load(h_prev + b * H + u0 + j));
        }
      }
      barrier.wait();
    }
  });
  return ffi::Error::Success();
}

ffi::Error GruBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> saved,
                           ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> g_hs,
                           ffi::Buffer<ffi::F32> g_h, ffi::ResultBuffer<ffi::F32> g_px,
                           ffi::ResultBuffer<ffi::F32> g_h0, bool reverse, int64_t threads) {
  const auto dims = saved.dimensions();
  const Dims d{dims[0], dims[1], dims[2] / 4};
  if (auto error = check(d); error.failure()) return error;
  const int T = d.steps, B = d.batch, H = d.hidden, G = 3 * H;
  const float* W = w.typed_data();
  const float* SAVED = saved.typed_data();
  const float* HS = hs.typed_data();
  const float* GHS = g_hs.typed_data();
  float* GPX = g_px->typed_data();
  float* GH0 = g_h0->typed_data();
  // The cotangent of each step's h W_h, [B, 3H], in two buffers used in turn: a part may write the next step's
  // while another still reads this one's.
  std::vector<float> recurrent(static_cast<size_t>(2) * B * G);
  team(pool, team_size(B, H, 3, threads), [&](int part, int parts, Barrier& barrier) {
    int u0, u1;
    units_of(H, part, parts, &u0, &u1);
    const int nu = u1 - u0;
    // This part's rows of W_h, transposed: panel[k, u] = W_h[u0 + u, k], so that g_h = g_a @ panel.
    const std::vector<float> panel = pack(G, nu, [&](int k, int u) { return W[(u0 + u) * G + k]; });
    std::vector<float> dh(static_cast<size_t>(B) * nu), direct(static_cast<size_t>(B) * nu);
    for (int b = 0; b < B; ++b) std::memcpy(&dh[b * nu], g_h.typed_data() + b * H + u0, nu * sizeof(float));
    for (int s = T - 1; s >= 0; --s) {
      const int t = reverse ? T - 1 - s : s;
      const int prev = reverse ? t + 1 : t - 1;
      const float* h_prev = s == 0 ? h0.typed_data() : HS + static_cast<size_t>(prev) * B * H;
      float* ga = &recurrent[static_cast<size_t>(s % 2) * B * G];
      for (int b = 0; b < B; ++b) {
        const float* sb = SAVED + (static_cast<size_t>(t) * B + b) * 4 * H + u0;
        float* gu = GPX + (static_cast<size_t>(t) * B + b) * G + u0;
        float* gab = ga + b * G + u0;
        const size_t row = (static_cast<size_t>(t) * B + b) * H + u0;
        for (int j = 0; j < nu; j += kLanes) {
          const vf r = load(sb + j), z = load(sb + H + j), n = load(sb + 2 * H + j), a_n = load(sb + 3 * H + j);
          const vf gh = load(GHS + row + j) + load(&dh[b * nu + j]);
          const vf g_n = (splat(1.0f) - z) * (splat(1.0f) - n * n) * gh;
          const vf g_r = g_n * r * (splat(1.0f) - r) * a_n;
          const vf g_z = (load(h_prev + b * H + u0 + j) - n) * z * (splat(1.0f) - z) * gh;
          store(gu + j, g_r);
          store(gu + H + j, g_z);
          store(gu + 2 * H + j, g_n);
          store(gab + j, g_r);
          store(gab + H + j, g_z);
          store(gab + 2 * H + j, g_n * r);
          store(&direct[b * nu + j], z * gh);
        }
      }
      barrier.wait();  // every unit's g_a_t is written
      matmul(B, nu, G, ga, G, panel.data(), dh.data(), nu);
      for (size_t k = 0; k < dh.size(); ++k) dh[k] += direct[k];
    }
    for (int b = 0; b < B; ++b) std::memcpy(GH0 + b * H + u0, &dh[b * nu], nu * sizeof(float));
  });
  return ffi::Error::Success();
}


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
  if (a == Activation::kRelu) return z > splat(0.0f) ? z : splat(0.0f);
  return z;
}

inline vf derivative(Activation a, vf h) {
  if (a == Activation::kTanh) return splat(1.0f) - h * h;
  if (a == Activation::kRelu) return h > splat(0.0f) ? splat(1.0f) : splat(0.0f);
  return splat(1.0f);
}

ffi::Error RnnForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> h0,
                          ffi::Buffer<ffi::F32> px, ffi::ResultBuffer<ffi::F32> hs, bool reverse, int64_t threads,
                          std::string_view activation_name) {
  const auto dims = px.dimensions();
  const Dims d{dims[0], dims[1], dims[2]};
  if (auto error = check(d); error.failure()) return error;
  Activation act;
  if (auto error = activation_of(activation_name, &act); error.failure()) return error;
  const int T = d.steps, B = d.batch, H = d.hidden;
  const float* W = w.typed_data();
  const float* PX = px.typed_data();
  float* HS = hs->typed_data();
  team(pool, team_size(B, H, 1, threads), [&](int part, int parts, Barrier& barrier) {
    int u0, u1;
    units_of(H, part, parts, &u0, &u1);
    const int nu = u1 - u0;
    const std::vector<float> panel = pack(H, nu, [&](int k, int j) { return W[k * H + u0 + j]; });
    std::vector<float> z(static_cast<size_t>(B) * nu);
    for (int s = 0; s < T; ++s) {
      const int t = reverse ? T - 1 - s : s;
      const int prev = reverse ? t + 1 : t - 1;
      const float* h_prev = s == 0 ? h0.typed_data() : HS + static_cast<size_t>(prev) * B * H;
      matmul(B, nu, H, h_prev, H, panel.data(), z.data(), nu);
      for (int b = 0; b < B; ++b) {
        const size_t row = (static_cast<size_t>(t) * B + b) * H + u0;
        for (int j = 0; j < nu; j += kLanes) store(HS + row + j, activate(act, load(&z[b * nu + j]) + load(PX + row + j)));
      }
      barrier.wait();
    }
  });
  return ffi::Error::Success();
}

ffi::Error RnnBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> hs,
                           ffi::Buffer<ffi::F32> g_hs, ffi::Buffer<ffi::F32> g_h, ffi::ResultBuffer<ffi::F32> g_px,
                           ffi::ResultBuffer<ffi::F32> g_h0, bool reverse, int64_t threads,
                           std::string_view activation_name) {
  const auto dims = hs.dimensions();
  const Dims d{dims[0], dims[1], dims[2]};
  if (auto error = check(d); error.failure()) return error;
  Activation act;
  if (auto error = activation_of(activation_name, &act); error.failure()) return error;
  const int T = d.steps, B = d.batch, H = d.hidden;
  const float* W = w.typed_data();
  const float* HS = hs.typed_data();
  const float* GHS = g_hs.typed_data();
  float* GPX = g_px->typed_data();
  float* GH0 = g_h0->typed_data();
  team(pool, team_size(B, H, 1, threads), [&](int part, int parts, Barrier& barrier) {
    int u0, u1;
    units_of(H, part, parts, &u0, &u1);
    const int nu = u1 - u0;
    // panel[k, u] = W_h[u0 + u, k], so that g_h = g_z @ panel.
    const std::vector<float> panel = pack(H, nu, [&](int k, int u) { return W[(u0 + u) * H + k]; });
    std::vector<float> dh(static_cast<size_t>(B) * nu);
    for (int b = 0; b < B; ++b) std::memcpy(&dh[b * nu], g_h.typed_data() + b * H + u0, nu * sizeof(float));
    for (int s = T - 1; s >= 0; --s) {
      const int t = reverse ? T - 1 - s : s;
      for (int b = 0; b < B; ++b) {
        const size_t row = (static_cast<size_t>(t) * B + b) * H + u0;
        for (int j = 0; j < nu; j += kLanes)
          store(GPX + row + j, (load(GHS + row + j) + load(&dh[b * nu + j])) * derivative(act, load(HS + row + j)));
      }
      barrier.wait();  // every unit's g_z_t is written
      matmul(B, nu, H, GPX + static_cast<size_t>(t) * B * H, H, panel.data(), dh.data(), nu);
    }
    for (int b = 0; b < B; ++b) std::memcpy(GH0 + b * H + u0, &dh[b * nu], nu * sizeof(float));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabLstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabGruForward, GruForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabGruBackward, GruBackwardImpl,
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
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabRnnForward, RnnForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("threads")
                                  .Attr<std::string_view>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnlabRnnBackward, RnnBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("threads")
                                  .Attr<std::string_view>("activation"));
