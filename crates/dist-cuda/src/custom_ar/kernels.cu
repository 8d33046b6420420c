// vLLM's custom all-reduce kernels (csrc/custom_all_reduce.cuh), restated for NVRTC without
// any header: fp16/bf16 conversions are done with PTX `cvt`, packed loads are 16-byte uint4.
// Compiled once per process per device at first use (see custom_ar/mod.rs).

#define MAX_BLOCKS 36
#define MAX_RANKS 8

struct Signal {
  alignas(128) unsigned int start[MAX_BLOCKS][MAX_RANKS];
  alignas(128) unsigned int end[MAX_BLOCKS][MAX_RANKS];
  alignas(128) unsigned int _flag[MAX_BLOCKS];
};

struct __align__(16) RankData {
  const void* ptrs[MAX_RANKS];
};

struct __align__(16) RankSignals {
  Signal* signals[MAX_RANKS];
};

static __device__ __forceinline__ void st_flag_release(unsigned int* p, unsigned int f) {
  asm volatile("st.release.sys.global.u32 [%1], %0;" ::"r"(f), "l"(p) : "memory");
}
static __device__ __forceinline__ unsigned int ld_flag_acquire(unsigned int* p) {
  unsigned int f;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(f) : "l"(p) : "memory");
  return f;
}
static __device__ __forceinline__ void st_flag_volatile(unsigned int* p, unsigned int f) {
  asm volatile("st.volatile.global.u32 [%1], %0;" ::"r"(f), "l"(p) : "memory");
}
static __device__ __forceinline__ unsigned int ld_flag_volatile(unsigned int* p) {
  unsigned int f;
  asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(f) : "l"(p) : "memory");
  return f;
}
// Spinning peers may be other processes time-sliced on the same GPU: back off a little.
static __device__ __forceinline__ void spin_pause() { __nanosleep(64); }
static __device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Deadline of the barrier spins (not in vLLM): a peer that never arrives (a dead rank) makes
// the waiting thread record the peer in `fault` (host-mapped memory: fault[peer] = 1) and
// stop waiting, so the kernel ends and the host reports a Timeout naming the rank instead
// of the GPU spinning forever. The protocol state is then inconsistent: the host disables
// this custom all-reduce for good.
struct Ctl {
  unsigned int* fault;
  unsigned long long deadline;
};
static __device__ __forceinline__ void report(const Ctl& c, int peer) {
  asm volatile("st.volatile.u32 [%1], %0;" ::"r"(1u), "l"(c.fault + peer) : "memory");
}

// Returns false (in every thread of the block) when a peer missed the deadline.
template <int ngpus>
static __device__ __forceinline__ bool barrier_at_start(const RankSignals& sg, Signal* self_sg, int rank, const Ctl& c) {
  unsigned int flag = self_sg->_flag[blockIdx.x] + 1;
  int bad = 0;
  if (threadIdx.x < ngpus) {
    unsigned int* peer = &sg.signals[threadIdx.x]->start[blockIdx.x][rank];
    unsigned int* self = &self_sg->start[blockIdx.x][threadIdx.x];
    st_flag_volatile(peer, flag);
    while (ld_flag_volatile(self) != flag) {
      spin_pause();
      if (now_ns() > c.deadline) { report(c, threadIdx.x); bad = 1; break; }
    }
  }
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) self_sg->_flag[blockIdx.x] = flag;
  return !bad;
}

// Returns false when a peer missed the deadline (known to every thread only when !final_sync).
template <int ngpus, bool final_sync>
static __device__ __forceinline__ bool barrier_at_end(const RankSignals& sg, Signal* self_sg, int rank, const Ctl& c) {
  __syncthreads();
  unsigned int flag = self_sg->_flag[blockIdx.x] + 1;
  int bad = 0;
  if (threadIdx.x < ngpus) {
    unsigned int* peer = &sg.signals[threadIdx.x]->end[blockIdx.x][rank];
    unsigned int* self = &self_sg->end[blockIdx.x][threadIdx.x];
    if (!final_sync) {
      st_flag_release(peer, flag);
      while (ld_flag_acquire(self) != flag) {
        spin_pause();
        if (now_ns() > c.deadline) { report(c, threadIdx.x); bad = 1; break; }
      }
    } else {
      st_flag_volatile(peer, flag);
      while (ld_flag_volatile(self) != flag) {
        spin_pause();
        if (now_ns() > c.deadline) { report(c, threadIdx.x); bad = 1; break; }
      }
    }
  }
  if (!final_sync) bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) self_sg->_flag[blockIdx.x] = flag;
  return !bad;
}

static __device__ __forceinline__ float h2f(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
static __device__ __forceinline__ unsigned short f2h(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
static __device__ __forceinline__ float bf2f(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }
static __device__ __forceinline__ unsigned short f2bf(float f) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// KIND: 0 = f32 (4 per 16 B), 1 = f16 (8), 2 = bf16 (8).
template <int KIND> struct Pk;
template <> struct Pk<0> {
  enum { N = 4 };
  static __device__ __forceinline__ void set(float* a, uint4 v) {
    a[0] = __uint_as_float(v.x); a[1] = __uint_as_float(v.y);
    a[2] = __uint_as_float(v.z); a[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ void add(float* a, uint4 v) {
    a[0] += __uint_as_float(v.x); a[1] += __uint_as_float(v.y);
    a[2] += __uint_as_float(v.z); a[3] += __uint_as_float(v.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* a) {
    uint4 r;
    r.x = __float_as_uint(a[0]); r.y = __float_as_uint(a[1]);
    r.z = __float_as_uint(a[2]); r.w = __float_as_uint(a[3]);
    return r;
  }
};
template <int KIND> struct Pk16 {
  enum { N = 8 };
  static __device__ __forceinline__ float up(unsigned short x) { return KIND == 1 ? h2f(x) : bf2f(x); }
  static __device__ __forceinline__ unsigned short down(float x) { return KIND == 1 ? f2h(x) : f2bf(x); }
  static __device__ __forceinline__ void add2(float* a, unsigned int w) {
    a[0] += up((unsigned short)(w & 0xffffu));
    a[1] += up((unsigned short)(w >> 16));
  }
  static __device__ __forceinline__ void set2(float* a, unsigned int w) {
    a[0] = up((unsigned short)(w & 0xffffu));
    a[1] = up((unsigned short)(w >> 16));
  }
  static __device__ __forceinline__ void set(float* a, uint4 v) {
    set2(a, v.x); set2(a + 2, v.y); set2(a + 4, v.z); set2(a + 6, v.w);
  }
  static __device__ __forceinline__ void add(float* a, uint4 v) {
    add2(a, v.x); add2(a + 2, v.y); add2(a + 4, v.z); add2(a + 6, v.w);
  }
  static __device__ __forceinline__ unsigned int pk2(const float* a) {
    return ((unsigned int)down(a[0])) | (((unsigned int)down(a[1])) << 16);
  }
  static __device__ __forceinline__ uint4 pack(const float* a) {
    uint4 r;
    r.x = pk2(a); r.y = pk2(a + 2); r.z = pk2(a + 4); r.w = pk2(a + 6);
    return r;
  }
};
template <> struct Pk<1> : Pk16<1> {};
template <> struct Pk<2> : Pk16<2> {};

// Sum of element idx over the ngpus inputs, in the given pointer order, accumulated in fp32.
template <int KIND, int ngpus>
static __device__ __forceinline__ uint4 packed_reduce(const uint4* const* ptrs, int idx) {
  float acc[Pk<KIND>::N];
  Pk<KIND>::set(acc, ptrs[0][idx]);
#pragma unroll
  for (int i = 1; i < ngpus; i++) Pk<KIND>::add(acc, ptrs[i][idx]);
  return Pk<KIND>::pack(acc);
}

template <int KIND, int ngpus>
static __device__ __forceinline__ void one_stage(const RankData* _dp, RankSignals sg, Signal* self_sg, uint4* result,
                                                 int rank, int size, const Ctl& c) {
  const uint4* ptrs[ngpus];
#pragma unroll
  for (int i = 0; i < ngpus; i++) ptrs[i] = (const uint4*)_dp->ptrs[i];
  if (!barrier_at_start<ngpus>(sg, self_sg, rank, c)) return;  // a peer is gone: touch nothing of it
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < size; idx += gridDim.x * blockDim.x) {
    result[idx] = packed_reduce<KIND, ngpus>(ptrs, idx);
  }
  barrier_at_end<ngpus, true>(sg, self_sg, rank, c);
}

template <int KIND, int ngpus>
static __device__ __forceinline__ void two_stage(const RankData* _dp, RankSignals sg, Signal* self_sg, uint4* result,
                                                 int rank, int size, const Ctl& c) {
  int tid = blockIdx.x * blockDim.x + threadIdx.x;
  int stride = gridDim.x * blockDim.x;
  int part = size / ngpus;
  int start = rank * part;
  int end = rank == ngpus - 1 ? size : start + part;
  int largest_part = part + size % ngpus;
  const uint4* ptrs[ngpus];
  uint4* tmps[ngpus];
#pragma unroll
  for (int i = 0; i < ngpus; i++) {
    int target = (rank + i) % ngpus;
    ptrs[i] = (const uint4*)_dp->ptrs[target];
    tmps[i] = (uint4*)(sg.signals[target] + 1);
  }
  uint4* tmp_out = tmps[0];
  if (!barrier_at_start<ngpus>(sg, self_sg, rank, c)) return;
  // Stage 1: reduce-scatter into this rank's scratch.
  for (int idx = start + tid; idx < end; idx += stride) {
    tmp_out[idx - start] = packed_reduce<KIND, ngpus>(ptrs, idx);
  }
  if (!barrier_at_end<ngpus, false>(sg, self_sg, rank, c)) return;
  // Stage 2: all-gather; same thread ids as stage 1, which gives visibility.
  for (int idx = tid; idx < largest_part; idx += stride) {
#pragma unroll
    for (int i = 0; i < ngpus; i++) {
      int from = (rank + i) % ngpus;
      if (from == ngpus - 1 || idx < part) {
        result[from * part + idx] = tmps[i][idx];
      }
    }
  }
}

#define DEF(KIND, NG)                                                                               \
  extern "C" __global__ void __launch_bounds__(512, 1)                                              \
      ar1_##KIND##_##NG(const RankData* dp, RankSignals sg, Signal* self_sg, uint4* out, int rank,  \
                        int size, unsigned int* fault, unsigned long long timeout_ns) {            \
    Ctl c = {fault, now_ns() + timeout_ns};                                                         \
    one_stage<KIND, NG>(dp, sg, self_sg, out, rank, size, c);                                       \
  }                                                                                                 \
  extern "C" __global__ void __launch_bounds__(512, 1)                                              \
      ar2_##KIND##_##NG(const RankData* dp, RankSignals sg, Signal* self_sg, uint4* out, int rank,  \
                        int size, unsigned int* fault, unsigned long long timeout_ns) {            \
    Ctl c = {fault, now_ns() + timeout_ns};                                                         \
    two_stage<KIND, NG>(dp, sg, self_sg, out, rank, size, c);                                       \
  }

DEF(0, 2) DEF(0, 4) DEF(0, 6) DEF(0, 8)
DEF(1, 2) DEF(1, 4) DEF(1, 6) DEF(1, 8)
DEF(2, 2) DEF(2, 4) DEF(2, 6) DEF(2, 8)
