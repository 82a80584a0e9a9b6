/*
 * scan_cuda.cu: the selective scan of Mamba (S6), forward and backward, for star.py, which loads it
 * with torch.utils.cpp_extension.load and falls back to PyTorch when it can't. Same function as
 * state-spaces/mamba selective_scan_ref (real weights).
 *
 * The recurrence, for each batch b, channel d and state n, all math in float32:
 *     dt_t   = softplus(delta_t + delta_bias)                    (softplus optional)
 *     h_t[n] = exp(dt_t A[n]) h_{t-1}[n] + dt_t B_t[n] u_t,      h_{-1} = 0
 *     y_t    = sum_n C_t[n] h_t[n] + D u_t
 *     out_t  = y_t silu(z_t)                                     (gate optional)
 * A is (d, n); B and C are (b, g, n, l), channel d reads group d / (d / g).
 * u, delta, z, out may be float32, bfloat16 or float16; they are converted on load and store.
 *
 * Its gradients, with x_t = dLoss/dh_t running backwards in time:
 *     dy_t = dout_t silu(z_t),            dz_t = dout_t y_t silu'(z_t)
 *     x_t  = C_t dy_t + exp(dt_{t+1} A) x_{t+1}       (x_{l-1} also gets dLoss/dh_{l-1})
 *     du_t = dt_t sum_n x_t B_t + D dy_t, ddt_t = sum_n x_t (B_t u_t + A exp(dt_t A) h_{t-1})
 *     dA   = sum_{b,t} x_t dt_t exp(dt_t A) h_{t-1},  dD = sum_{b,t} dy_t u_t
 *     dB_t = sum_d x_t dt_t u_t,           dC_t = sum_d dy_t h_t
 *
 * How the work maps onto the GPU:
 *   - a block of 256 threads owns 16 channels of one (batch, group): grid (d/g / 16, g, b).
 *   - 16 consecutive threads (half a warp) own one channel. Thread `lane` of them keeps states
 *     n = lane, lane + 16, ... (NS of them: NS = 1, 2, 4 for n <= 16, 32, 64) in registers and
 *     walks the whole sequence step by step. There is no parallel scan over l: b * d * 16
 *     threads already fill the GPU at the shapes we train with.
 *   - time goes in tiles of 64 steps: the block stages u, dt, B and C of a tile in shared memory
 *     (B and C once for all 16 channels), loading the next tile while it works on this one.
 *   - y_t = sum_n C_t h_t is a sum across the 16 threads of a channel. Each thread keeps its
 *     part of 16 steps, then a butterfly reduce-scatter (15 shuffles) leaves the whole y of
 *     step `lane` at thread `lane`: about one shuffle per step instead of four.
 *
 * Why the backward recomputes: it needs h_{t-1} at every step while walking backwards. Storing
 * all of h is a (b, d, l, n) tensor, n times the size of u, and running the recurrence backwards
 * (h_{t-1} = (h_t - dt B u) / exp(dt A)) divides by an exponential that underflows to 0. So the
 * forward saves h at the end of each 64-step tile, (b, d, l/64, n), and the backward redoes each
 * tile forward from its checkpoint: once to find the state every 16 steps, then 16 steps at a
 * time keeping h and exp(dt A) in registers, which it then walks backwards. That costs two
 * exponentials per element and 1/64 of the states' memory. dB and dC are sums over channels,
 * added per warp, then per block in shared memory, then into float32 with one float4 atomicAdd
 * per 4 steps; dA, dD and ddelta_bias take one atomicAdd per thread at the end.
 */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

constexpr int CH = 16;              // channels per block
constexpr int LANES = 16;           // threads per channel
constexpr int THREADS = CH * LANES; // 256
constexpr int WARPS = THREADS / 32;
constexpr int SUB = LANES;          // steps per reduce-scatter (one per lane)
constexpr int SUBS = 4;             // sub-tiles per tile
constexpr int TILE = SUB * SUBS;    // steps per shared-memory tile and per checkpoint
constexpr int TP = TILE + 4;        // row stride: aligned rows, reads across rows skew banks
constexpr int RP = SUB + 4;         // row stride of the dB/dC reduction buffer, same reason
constexpr int MAX_N = 4 * LANES;    // largest state size
constexpr float LOG2E = 1.4426950408889634f;

struct Params {
  int batch, dim, len, dstate, groups, dgroup, ntiles, lpad;
  bool softplus, save_all;
  const void *u, *delta, *z, *dout;                // (b, d, l), input dtype
  const float *A, *B, *C, *D, *bias, *dlast;       // float32
  void *out, *du, *ddelta, *dz;                    // (b, d, l), input dtype
  float *ckpt, *dA, *dB, *dC, *dD, *dbias;         // float32
};

__device__ __forceinline__ float exp2_approx(float x) {  // 2^x in one instruction; 0 for x << 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float softplus(float x) {  // torch's threshold of 20
  return x > 20.f ? x : log1pf(__expf(x));
}
__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }
__device__ __forceinline__ float comp(const float4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
__device__ __forceinline__ float4 ld4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}

// v[k] holds this thread's part of step k; leaves in v[0] the sum over the channel's 16 threads
// for step `lane`. Each round (O = 8, 4, 2, 1) halves the steps a thread is responsible for:
// it keeps the half its bit O selects and swaps the other half with the thread O lanes away.
template <int O = SUB / 2>
__device__ __forceinline__ float reduce_scatter(float (&v)[SUB], int lane) {
  const bool hi = lane & O;
  for (int i = 0; i < O; ++i) {
    const float send = hi ? v[i] : v[i + O];
    const float keep = hi ? v[i + O] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
  }
  if constexpr (O > 1) return reduce_scatter<O / 2>(v, lane);
  return v[0];
}
__device__ __forceinline__ float channel_sum(float v) {  // sum over the 16 threads of a channel
  for (int o = LANES / 2; o >= 1; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The staged tile in shared memory, rows of TP floats: u, dt, g1 and g2 of the 16 channels, then
// B and C of the 16 NS states. g1 is silu(z) in the forward (1 without z), dy = dout silu(z) in
// the backward; g2, backward only, is dout silu'(z), so that dz = y g2.
struct Smem {
  float *u, *dt, *g1, *g2, *B, *C;
  float* hsub;  // backward: each sub-tile's first state (SUBS, NS, THREADS)
  float* red;   // backward: dB, dC of each warp (WARPS, 32 NS, 16 steps)
  static size_t bytes(int ns, bool bwd) {  // the dynamic shared memory the launch asks for
    const size_t tiles = ((bwd ? 4 : 3) * CH + 2 * ns * LANES) * TP;
    return (tiles + (bwd ? SUBS * ns * THREADS + WARPS * 32 * ns * RP : 0)) * sizeof(float);
  }
  __device__ Smem(float4* s, int ns, bool bwd) : u(reinterpret_cast<float*>(s)) {
    dt = u + CH * TP;
    g1 = dt + CH * TP;
    g2 = g1 + CH * TP;
    B = bwd ? g2 + CH * TP : g2;
    C = B + ns * LANES * TP;
    hsub = C + ns * LANES * TP;
    red = hsub + SUBS * ns * THREADS;
  }
};

// Which channel and states a thread owns.
struct Slot {
  int tid, row, lane, bi, gi, c;
  bool valid;  // channel exists (d / g need not be a multiple of 16)
  __device__ Slot(const Params& p)
      : tid(threadIdx.x), row(tid / LANES), lane(tid % LANES), bi(blockIdx.z), gi(blockIdx.y) {
    const int cg = blockIdx.x * CH + row;
    valid = cg < p.dgroup;
    c = gi * p.dgroup + (valid ? cg : 0);
  }
  __device__ size_t chan(const Params& p) const { return size_t(bi) * p.dim + c; }  // b * dim + d
  __device__ size_t group(const Params& p) const { return size_t(bi) * p.groups + gi; }  // (b, g)
  __device__ size_t seq(const Params& p) const { return chan(p) * p.len; }  // start of (b, d, :)
  __device__ int n(int i) const { return lane + LANES * i; }  // n of the thread's state i
  __device__ bool has(const Params& p, int i) const { return valid && n(i) < p.dstate; }
  // where its state i lies in row `row` of a (..., n) tensor: A, dA, ckpt, dlast
  __device__ size_t state_at(const Params& p, size_t row, int i) const {
    return row * p.dstate + lane + LANES * i;
  }
  // this thread's states i of the backward's starting point for `tile`: the forward's
  // checkpoint after the tile before, 0 for the first tile
  template <int NS> __device__ void tile_start(const Params& p, int tile, float (&h)[NS]) const {
    for (int i = 0; i < NS; ++i) {
      const size_t at = state_at(p, chan(p) * p.ntiles + tile - 1, i);
      h[i] = tile > 0 && has(p, i) ? p.ckpt[at] : 0.f;
    }
  }
};

// This thread's share of one 64-step tile, read from global memory into registers. Each kernel
// reads the next tile while it works on the current one. The values stay in the input dtype
// until store(): converting them at once would make the thread wait for the load right there.
template <typename T, int NS, bool BWD>
struct TileLoad {
  static constexpr int PER = TILE / LANES;                  // 4 steps of each channel
  static constexpr int PER_BC = NS * LANES * TILE / THREADS;  // 4 NS values of B and of C
  T u[PER], delta[PER], z[PER], dout[PER];
  float B[PER_BC], C[PER_BC], bias;

  __device__ void load(const Params& p, const Slot& s, int t0) {
    const size_t base = s.seq(p);
    bias = p.bias ? p.bias[s.c] : 0.f;
#pragma unroll
    for (int i = 0; i < PER; ++i) {  // u, delta, z (and dout) of the channel, step lane + 16 i
      const int t = t0 + s.lane + LANES * i;
      const bool ok = s.valid && t < p.len;
      u[i] = ok ? static_cast<const T*>(p.u)[base + t] : T(0.f);
      delta[i] = ok ? static_cast<const T*>(p.delta)[base + t] : T(0.f);
      z[i] = ok && p.z ? static_cast<const T*>(p.z)[base + t] : T(0.f);
      if (BWD) dout[i] = ok ? static_cast<const T*>(p.dout)[base + t] : T(0.f);
    }
    const size_t bc = s.group(p) * p.dstate * p.len;
#pragma unroll
    for (int i = 0; i < PER_BC; ++i) {  // B, C of the block's group: state e / 64, step e % 64
      const int e = s.tid + THREADS * i;
      const int n = e / TILE;
      const int t = t0 + e % TILE;
      const bool ok = n < p.dstate && t < p.len;
      B[i] = ok ? p.B[bc + size_t(n) * p.len + t] : 0.f;
      C[i] = ok ? p.C[bc + size_t(n) * p.len + t] : 0.f;
    }
  }

  // Into shared memory: u, dt (bias and softplus applied), B, C, and per step either the gate
  // silu(z) (forward: g1) or dout silu(z) and dout silu'(z) (backward: g1, g2). Steps past the
  // end get zeros, which makes them a no-op: exp(0 A) = 1 and 0 B u = 0.
  __device__ void store(const Params& p, const Slot& s, int t0, const Smem& m) const {
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int j = s.lane + LANES * i;
      const int at = s.row * TP + j;
      const bool ok = s.valid && t0 + j < p.len;
      const float zf = float(z[i]);
      const float dof = BWD ? float(dout[i]) : 0.f;
      const float sz = sigmoid(zf);
      float dt = float(delta[i]) + bias;
      if (p.softplus) dt = softplus(dt);
      m.u[at] = float(u[i]);
      m.dt[at] = ok ? dt : 0.f;
      if (!BWD) m.g1[at] = p.z ? zf * sz : 1.f;
      if (BWD) m.g1[at] = p.z ? dof * zf * sz : dof;
      if (BWD) m.g2[at] = p.z ? dof * sz * (1.f + zf * (1.f - sz)) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < PER_BC; ++i) {
      const int e = s.tid + THREADS * i;
      m.B[e / TILE * TP + e % TILE] = B[i];
      m.C[e / TILE * TP + e % TILE] = C[i];
    }
  }
};

// Run the recurrence over the 16 steps j0..j0+15 of the staged tile. With KEEP, also keep every
// state in hs (hs[s][k] = state before step k) and the decays exp(dt A) in as, and the thread's
// part of y_t = sum_n C h in yk.
template <int NS, bool KEEP>
__device__ __forceinline__ void run_steps(float (&h)[NS], const float (&A2)[NS], const Smem& m,
                                          const Slot& s, int j0, float (&hs)[NS][SUB + 1],
                                          float (&as)[NS][SUB], float (&yk)[SUB]) {
#pragma unroll
  for (int k4 = 0; k4 < SUB; k4 += 4) {
    const float4 dt4 = ld4(m.dt + s.row * TP + j0 + k4);
    const float4 u4 = ld4(m.u + s.row * TP + j0 + k4);
    float4 B4[NS], C4[NS];
    for (int i = 0; i < NS; ++i) {
      B4[i] = ld4(m.B + s.n(i) * TP + j0 + k4);
      if (KEEP) C4[i] = ld4(m.C + s.n(i) * TP + j0 + k4);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float dt = comp(dt4, q);
      const float du = dt * comp(u4, q);
      float y = 0.f;
      for (int i = 0; i < NS; ++i) {
        const float a = exp2_approx(dt * A2[i]);  // exp(dt A), A2 = A log2(e)
        if (KEEP) hs[i][k4 + q] = h[i];
        if (KEEP) as[i][k4 + q] = a;
        h[i] = a * h[i] + du * comp(B4[i], q);
        if (KEEP) y += comp(C4[i], q) * h[i];
      }
      if (KEEP) yk[k4 + q] = y;
    }
  }
  if (KEEP)
    for (int i = 0; i < NS; ++i) hs[i][SUB] = h[i];
}

// A log2(e) of this thread's states, 0 where there is no state
template <int NS> __device__ void load_A2(const Params& p, const Slot& s, float (&A2)[NS]) {
  for (int i = 0; i < NS; ++i)
    A2[i] = s.has(p, i) ? p.A[s.state_at(p, s.c, i)] * LOG2E : 0.f;
}

template <typename T, int NS> __global__ void __launch_bounds__(THREADS) scan_fwd_kernel(Params p) {
  extern __shared__ float4 smem4[];
  const Smem m(smem4, NS, false);
  const Slot s(p);
  float A2[NS], h[NS], hs[NS][SUB + 1], as[NS][SUB], yk[SUB];
  load_A2(p, s, A2);
  for (int i = 0; i < NS; ++i) h[i] = 0.f;
  const float D = p.D ? p.D[s.c] : 0.f;
  T* out = static_cast<T*>(p.out);
  const size_t base = s.seq(p);
  TileLoad<T, NS, false> next;
  next.load(p, s, 0);
  for (int tile = 0; tile < p.ntiles; ++tile) {
    const int t0 = tile * TILE;
    next.store(p, s, t0, m);
    __syncthreads();
    if (tile + 1 < p.ntiles) next.load(p, s, t0 + TILE);
#pragma unroll
    for (int sub = 0; sub < SUBS; ++sub) {
      if (t0 + sub * SUB >= p.len) break;
      run_steps<NS, true>(h, A2, m, s, sub * SUB, hs, as, yk);
      const float y = reduce_scatter(yk, s.lane);
      const int at = s.row * TP + sub * SUB + s.lane;
      const int t = t0 + sub * SUB + s.lane;
      if (s.valid && t < p.len) out[base + t] = T((y + D * m.u[at]) * m.g1[at]);
    }
    // checkpoint: every tile's final state for the backward, or only the last one (last_state)
    if (p.save_all || tile == p.ntiles - 1) {
      const int slot = p.save_all ? tile : 0;
      const size_t row = s.chan(p) * (p.save_all ? p.ntiles : 1) + slot;
      for (int i = 0; i < NS; ++i) {
        const size_t at = s.state_at(p, row, i);
        if (s.has(p, i)) p.ckpt[at] = h[i];
      }
    }
    __syncthreads();
  }
}

template <typename T, int NS> __global__ void __launch_bounds__(THREADS) scan_bwd_kernel(Params p) {
  extern __shared__ float4 smem4[];
  const Smem m(smem4, NS, true);
  const Slot s(p);
  const int warp = s.tid / 32;
  const int wl = s.tid % 32;
  float A2[NS], x_next[NS], dA[NS], hs[NS][SUB + 1], as[NS][SUB], yk[SUB];
  load_A2(p, s, A2);
  for (int i = 0; i < NS; ++i) {
    const size_t at = s.state_at(p, s.chan(p), i);
    x_next[i] = s.has(p, i) && p.dlast ? p.dlast[at] : 0.f;  // exp(dt_{t+1} A) x_{t+1}
    dA[i] = 0.f;
  }
  const float D = p.D ? p.D[s.c] : 0.f;
  float dD = 0.f;
  float dbias = 0.f;
  const size_t base = s.seq(p);
  TileLoad<T, NS, true> next;
  float h[NS], h_next[NS];
  next.load(p, s, (p.ntiles - 1) * TILE);
  s.tile_start(p, p.ntiles - 1, h_next);
  for (int tile = p.ntiles - 1; tile >= 0; --tile) {
    const int t0 = tile * TILE;
    next.store(p, s, t0, m);
    for (int i = 0; i < NS; ++i) h[i] = h_next[i];
    __syncthreads();
    if (tile > 0) {
      next.load(p, s, t0 - TILE);
      s.tile_start(p, tile - 1, h_next);
    }
    // pass 1: from the checkpoint, find the state at the start of each sub-tile
    const int nsub = min(SUBS, (p.len - t0 + SUB - 1) / SUB);
#pragma unroll
    for (int sub = 0; sub < SUBS; ++sub) {
      if (sub >= nsub) break;
      for (int i = 0; i < NS; ++i) m.hsub[(sub * NS + i) * THREADS + s.tid] = h[i];
      if (sub + 1 < nsub)
        run_steps<NS, false>(h, A2, m, s, sub * SUB, hs, as, yk);
    }
    // pass 2: sub-tiles last to first; redo the 16 steps keeping states, then walk them backwards
    for (int sub = nsub - 1; sub >= 0; --sub) {
      const int j0 = sub * SUB;
      const int row = s.row * TP + j0;  // where the sub-tile starts in the channel's staged row
      for (int i = 0; i < NS; ++i) h[i] = m.hsub[(sub * NS + i) * THREADS + s.tid];
      run_steps<NS, true>(h, A2, m, s, j0, hs, as, yk);
      const float y = reduce_scatter(yk, s.lane);  // y of step j0 + lane, without D u
      float pdu[SUB], pdd[SUB], vb[NS][4];
      float4 dt4, u4, dy4, B4[NS], C4[NS];
#pragma unroll
      for (int k = SUB - 1; k >= 0; --k) {
        const int q = k % 4;
        const int k4 = k - q;
        if (q == 3) {
          dt4 = ld4(m.dt + row + k4);
          u4 = ld4(m.u + row + k4);
          dy4 = ld4(m.g1 + row + k4);
          for (int i = 0; i < NS; ++i) {
            B4[i] = ld4(m.B + s.n(i) * TP + j0 + k4);
            C4[i] = ld4(m.C + s.n(i) * TP + j0 + k4);
          }
        }
        const float dt = comp(dt4, q);
        const float u = comp(u4, q);
        const float dy = comp(dy4, q);
        float sum_xB = 0.f;
        float sum_xAh = 0.f;
        for (int i = 0; i < NS; ++i) {
          const float x = x_next[i] + comp(C4[i], q) * dy;  // dLoss/dh_t
          const float xah = x * as[i][k] * hs[i][k];        // x_t exp(dt_t A) h_{t-1}
          sum_xB += x * comp(B4[i], q);
          sum_xAh += xah * A2[i];
          dA[i] += xah * dt;
          x_next[i] = x * as[i][k];
          float gB = x * dt * u;                           // this channel's dB_t, dC_t
          float gC = dy * hs[i][k + 1];
          gB += __shfl_xor_sync(0xffffffffu, gB, 16);      // + the warp's other channel
          gC += __shfl_xor_sync(0xffffffffu, gC, 16);
          vb[i][q] = wl < 16 ? gB : gC;
        }
        pdu[k] = sum_xB;
        pdd[k] = sum_xAh;
        if (q == 0)
          for (int i = 0; i < NS; ++i) {
            float* dst = m.red + (warp * 32 * NS + 32 * i + wl) * RP + k4;
            *reinterpret_cast<float4*>(dst) = make_float4(vb[i][0], vb[i][1], vb[i][2], vb[i][3]);
          }
      }
      const float sxB = reduce_scatter(pdu, s.lane);
      const float sxAh = reduce_scatter(pdd, s.lane) / LOG2E;
      const int t = t0 + j0 + s.lane;
      if (s.valid && t < p.len) {
        const float dt = m.dt[row + s.lane];
        const float u = m.u[row + s.lane];
        const float dy = m.g1[row + s.lane];
        float ddt = u * sxB + sxAh;
        if (p.softplus) ddt *= -expm1f(-dt);  // softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x))
        static_cast<T*>(p.du)[base + t] = T(dt * sxB + D * dy);
        static_cast<T*>(p.ddelta)[base + t] = T(ddt);
        if (p.z) static_cast<T*>(p.dz)[base + t] = T((y + D * u) * m.g2[row + s.lane]);
        dD += dy * u;
        dbias += ddt;
      }
      __syncthreads();
      // add the 8 warps' dB, dC of these 16 steps and push them to global memory, 4 steps an atomic
      for (int i = s.tid; i < 32 * NS * (SUB / 4); i += THREADS) {
        const int col = i % (32 * NS);
        const int k4 = i / (32 * NS) * 4;
        const int n = col % 16 + 16 * (col / 32);
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int w = 0; w < WARPS; ++w) {
          const float4 v = ld4(m.red + (w * 32 * NS + col) * RP + k4);
          acc.x += v.x;
          acc.y += v.y;
          acc.z += v.z;
          acc.w += v.w;
        }
        if (n >= p.dstate) continue;
        const size_t row_bc = s.group(p) * p.dstate + n;
        float* dst = (col % 32 < 16 ? p.dB : p.dC) + row_bc * p.lpad + t0 + j0 + k4;
#if __CUDA_ARCH__ >= 900
        atomicAdd(reinterpret_cast<float4*>(dst), acc);
#else
        atomicAdd(dst, acc.x);
        atomicAdd(dst + 1, acc.y);
        atomicAdd(dst + 2, acc.z);
        atomicAdd(dst + 3, acc.w);
#endif
      }
      __syncthreads();
    }
  }
  for (int i = 0; i < NS; ++i)
    if (s.has(p, i)) atomicAdd(p.dA + s.state_at(p, s.c, i), dA[i]);
  dD = channel_sum(dD);
  dbias = channel_sum(dbias);
  if (s.valid && s.lane == 0) {
    atomicAdd(p.dD + s.c, dD);
    atomicAdd(p.dbias + s.c, dbias);
  }
}

// ---------------------------------------------------------------- host side

// Messages are built from strings only: with the GPU machine's toolchain, streaming an integer
// into torch's message stream from this module crashed (two libstdc++ copies disagreeing).
static std::string str(int64_t v) { return std::to_string(v); }

template <typename T, int NS = 1> static void launch(const Params& p, bool backward) {
  if constexpr (NS < 4)  // NS states per thread, the fewest that hold n: n <= 16 NS
    if (p.dstate > NS * LANES) return launch<T, 2 * NS>(p, backward);
  const dim3 grid((p.dgroup + CH - 1) / CH, p.groups, p.batch);
  auto kernel = backward ? scan_bwd_kernel<T, NS> : scan_fwd_kernel<T, NS>;
  const int smem = int(Smem::bytes(NS, backward));
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  TORCH_CHECK(err == cudaSuccess, "scan_cuda: ", str(smem),
              " bytes of shared memory not available: ", cudaGetErrorString(err));
  kernel<<<grid, THREADS, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
  err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "scan_cuda: kernel launch failed: ", cudaGetErrorString(err));
}

static void run(const Params& p, at::ScalarType dtype, bool backward) {
  if (dtype == at::kFloat) launch<float>(p, backward);
  else if (dtype == at::kBFloat16) launch<c10::BFloat16>(p, backward);
  else launch<c10::Half>(p, backward);
}

static std::string shape_str(at::IntArrayRef shape) {  // "(2, 16, *)", * for any size
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") + (shape[i] < 0 ? "*" : str(shape[i]));
  return s + (shape.size() == 1 ? ",)" : ")");
}

// x must be a contiguous `dtype` tensor of this shape (-1: any size) on u's device.
static void check(const at::Tensor& x, const char* name, const at::Device& dev,
                  at::ScalarType dtype, std::vector<int64_t> shape) {
  bool ok = x.dim() == int64_t(shape.size()) && x.scalar_type() == dtype;
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || x.size(i) == shape[i];
  TORCH_CHECK(ok, "selective_scan: ", name, " must be ", dtype, " of shape ", shape_str(shape),
              ", got ", x.scalar_type(), " ", shape_str(x.sizes()));
  TORCH_CHECK(x.device() == dev, "selective_scan: ", name, " must be on ", dev, " like u, got ",
              x.device());
  TORCH_CHECK(x.is_contiguous(), "selective_scan: ", name,
              " must be contiguous (call .contiguous())");
}

// at::zeros as a cudaMemsetAsync on the current stream, without dispatching a fill kernel
static at::Tensor zeros(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
  const cudaError_t err = cudaMemsetAsync(t.data_ptr(), 0, t.nbytes(),
                                          c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "scan_cuda: cudaMemsetAsync failed: ", cudaGetErrorString(err));
  return t;
}

using Opt = std::optional<at::Tensor>;
static float* fptr(const Opt& t) { return t ? t->data_ptr<float>() : nullptr; }
template <typename P> static at::Tensor bind(P*& field, at::Tensor t) {  // t, the kernel's output
  field = static_cast<P*>(t.data_ptr());
  return t;
}

// Checks every input and fills the fields both directions share.
static Params make_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                          const at::Tensor& B, const at::Tensor& C, const Opt& D, const Opt& z,
                          const Opt& delta_bias, bool delta_softplus) {
  TORCH_CHECK(u.is_cuda(), "selective_scan: u must be a CUDA tensor, got ", u.device());
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "selective_scan: u must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(u.dim() == 3 && u.numel() > 0,
              "selective_scan: u must be a non-empty (b, d, l), got ", shape_str(u.sizes()));
  const int64_t b = u.size(0);
  const int64_t d = u.size(1);
  const int64_t l = u.size(2);
  const int64_t n = A.dim() == 2 ? A.size(1) : 0;
  const int64_t g = B.dim() == 4 ? B.size(1) : 0;
  TORCH_CHECK(b <= 65535, "selective_scan: batch ", str(b), " > 65535 is not supported");
  check(u, "u", u.device(), dtype, {b, d, l});
  check(delta, "delta", u.device(), dtype, {b, d, l});
  if (z) check(*z, "z", u.device(), dtype, {b, d, l});
  check(A, "A", u.device(), at::kFloat, {d, -1});
  TORCH_CHECK(n >= 1 && n <= MAX_N, "selective_scan: state size n = ", str(n),
              " not supported (1 to 64)");
  check(B, "B", u.device(), at::kFloat, {b, -1, n, l});
  check(C, "C", u.device(), at::kFloat, {b, g, n, l});
  TORCH_CHECK(g >= 1 && d % g == 0 && g <= 65535, "selective_scan: d = ", str(d),
              " is not a multiple of the number of groups ", str(g));
  if (D) check(*D, "D", u.device(), at::kFloat, {d});
  if (delta_bias) check(*delta_bias, "delta_bias", u.device(), at::kFloat, {d});
  const int ntiles = int((l + TILE - 1) / TILE);
  return Params{.batch = int(b), .dim = int(d), .len = int(l), .dstate = int(n), .groups = int(g),
                .dgroup = int(d / g), .ntiles = ntiles, .lpad = ntiles * TILE,
                .softplus = delta_softplus, .u = u.data_ptr(), .delta = delta.data_ptr(),
                .z = z ? z->data_ptr() : nullptr, .A = A.data_ptr<float>(),
                .B = B.data_ptr<float>(), .C = C.data_ptr<float>(), .D = fptr(D),
                .bias = fptr(delta_bias)};
}

// Returns (out, ckpt): ckpt is the state after each 64-step tile, (b, d, ceil(l / 64), n) float32,
// when save_all (for the backward), else only the last state (b, d, 1, n).
std::vector<at::Tensor> fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& C, const Opt& D, const Opt& z,
                            const Opt& delta_bias, bool delta_softplus, bool save_all) {
  Params p = make_params(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  const c10::cuda::CUDAGuard guard(u.device());
  const auto f32 = u.options().dtype(at::kFloat);
  const int64_t kept = save_all ? p.ntiles : 1;
  at::Tensor out = bind(p.out, at::empty(u.sizes(), u.options()));
  at::Tensor ckpt = bind(p.ckpt, at::empty({p.batch, p.dim, kept, p.dstate}, f32));
  p.save_all = save_all;
  run(p, u.scalar_type(), false);
  return {out, ckpt};
}

// Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias). dB and dC are float32 (b, g, n, l
// rounded up to 64): slice [..., :l]. dz is empty without z; dD and ddelta_bias always come.
std::vector<at::Tensor> bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& C, const Opt& D, const Opt& z,
                            const Opt& delta_bias, bool delta_softplus, const at::Tensor& dout,
                            const at::Tensor& ckpt, const Opt& dlast) {
  Params p = make_params(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  check(dout, "dout", u.device(), u.scalar_type(), u.sizes().vec());
  check(ckpt, "ckpt (the checkpoints of fwd(save_all=True))", u.device(), at::kFloat,
        {p.batch, p.dim, p.ntiles, p.dstate});
  if (dlast) check(*dlast, "the gradient of last_state", u.device(), at::kFloat,
                   {p.batch, p.dim, p.dstate});
  p.dout = dout.data_ptr();
  p.ckpt = ckpt.data_ptr<float>();
  p.dlast = fptr(dlast);
  const c10::cuda::CUDAGuard guard(u.device());
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor du = bind(p.du, at::empty(u.sizes(), u.options()));
  at::Tensor ddelta = bind(p.ddelta, at::empty(u.sizes(), u.options()));
  at::Tensor dz = bind(p.dz, at::empty(z ? u.sizes() : at::IntArrayRef{0}, u.options()));
  // the float32 sums start at zero: the kernel adds into them with atomicAdd
  at::Tensor dA = bind(p.dA, zeros(A.sizes(), f32));
  at::Tensor dB = bind(p.dB, zeros({p.batch, p.groups, p.dstate, p.lpad}, f32));
  at::Tensor dC = bind(p.dC, zeros(dB.sizes(), f32));
  at::Tensor dD = bind(p.dD, zeros({p.dim}, f32));
  at::Tensor dbias = bind(p.dbias, zeros({p.dim}, f32));
  run(p, u.scalar_type(), true);
  return {du, ddelta, dA, dB, dC, dD, dz, dbias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "selective scan (Mamba S6) forward and backward kernels for star.py";
  m.def("fwd", &fwd, "selective scan forward: (out, ckpt), arguments as fwd above");
  m.def("bwd", &bwd, "selective scan backward: the gradients, arguments as bwd above");
}
