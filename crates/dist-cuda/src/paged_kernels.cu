// Gather / scatter of token rows of a paged KV cache (see paged.rs), for NVRTC without headers.
//
// The kernel only moves bytes, in units of U (16, 8, 4, 2 or 1 bytes) that divide the row bytes
// (head_dim * element size) and both base pointers. One linear index per unit of
// (plane, list entry i, head h, unit u), walked with a grid-stride loop; I is the index type
// (32-bit when the whole walk fits, which makes the divisions cheap).
//
// Rows are counted in units of one head row (head_dim elements):
//   cache row  = plane * plane_rows + bases[i] + h * head_stride
//     NHD: bases[i] = slot * heads,                                   head_stride = 1
//     HND: bases[i] = (slot / bs) * heads * bs + slot % bs,           head_stride = bs
//   buffer row = (plane * buf_rows + r) * heads + h,  r = rows ? rows[i] : i
// (bases and rows are computed on the host). scatter = 0 copies cache -> buffer, else
// buffer -> cache. The two ranges never overlap (checked on the host).

template <typename U, typename I>
static __device__ __forceinline__ void paged_copy(U* __restrict__ cache, U* __restrict__ buf,
                                                  const unsigned long long* __restrict__ bases,
                                                  const unsigned int* __restrict__ rows,
                                                  unsigned long long n_, unsigned long long heads_,
                                                  unsigned long long upr_,
                                                  unsigned long long plane_rows,
                                                  unsigned long long head_stride,
                                                  unsigned long long buf_rows,
                                                  unsigned long long total_, int scatter) {
  const I n = (I)n_, heads = (I)heads_, upr = (I)upr_, total = (I)total_;
  const I stride = (I)gridDim.x * (I)blockDim.x;
  for (I idx = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; idx < total; idx += stride) {
    const I unit = idx % upr;
    const I r = idx / upr;
    const I h = r % heads;
    const I pi = r / heads;
    const I i = pi % n;
    const I plane = pi / n;
    const unsigned long long brow = rows ? (unsigned long long)rows[i] : (unsigned long long)i;
    const unsigned long long c =
        ((unsigned long long)plane * plane_rows + bases[i] + (unsigned long long)h * head_stride) *
            upr_ + unit;
    const unsigned long long b =
        (((unsigned long long)plane * buf_rows + brow) * heads_ + h) * upr_ + unit;
    if (scatter) {
      cache[c] = buf[b];
    } else {
      buf[b] = cache[c];
    }
  }
}

#define PAGED_ENTRY(NAME, U, I)                                                              \
  extern "C" __global__ void __launch_bounds__(256) NAME(                                    \
      U* cache, U* buf, const unsigned long long* bases, const unsigned int* rows,           \
      unsigned long long n, unsigned long long heads, unsigned long long upr,                \
      unsigned long long plane_rows, unsigned long long head_stride,                         \
      unsigned long long buf_rows, unsigned long long total, int scatter) {                  \
    paged_copy<U, I>(cache, buf, bases, rows, n, heads, upr, plane_rows, head_stride,        \
                     buf_rows, total, scatter);                                              \
  }

PAGED_ENTRY(paged_copy_16_i32, uint4, unsigned int)
PAGED_ENTRY(paged_copy_8_i32, uint2, unsigned int)
PAGED_ENTRY(paged_copy_4_i32, unsigned int, unsigned int)
PAGED_ENTRY(paged_copy_2_i32, unsigned short, unsigned int)
PAGED_ENTRY(paged_copy_1_i32, unsigned char, unsigned int)
PAGED_ENTRY(paged_copy_16_i64, uint4, unsigned long long)
PAGED_ENTRY(paged_copy_8_i64, uint2, unsigned long long)
PAGED_ENTRY(paged_copy_4_i64, unsigned int, unsigned long long)
PAGED_ENTRY(paged_copy_2_i64, unsigned short, unsigned long long)
PAGED_ENTRY(paged_copy_1_i64, unsigned char, unsigned long long)
