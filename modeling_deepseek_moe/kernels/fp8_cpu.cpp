// DeepSeek's block-wise FP8 weights on the CPU: decode-sized products that read one byte per weight
// (fp8_grouped_gemv), and dequantization into float32 or bfloat16 for larger products (fp8_dequantize).
//
// y[r, o] = sum_i W[e, o, i] * scale[e, scale_row(o), i / block_i] * x[r, i]   for the rows r of group e
//
// W is float8_e4m3fn (passed as uint8), stacked [groups, out, in] (a linear layer is one group); the rows of
// x are grouped by group (ends: cumulative row counts). Each weight is read once per group and converted
// in registers: the e4m3 bits shifted into a float16 are the same number divided by 2^8 (subnormals too),
// which the CPU converts to float32 (F16C); the 2^8 and the block scale are folded into a scaled copy of
// x. Rows `part_rows` apart were quantized apart (a routed expert's gate and up projections), each part
// with its own grid of scale rows. Accumulation is float32; results come in the rows' dtype (float32, bf16).
// With bf16 rows, where the CPU has AVX512-FP16, the products are float16 instead (dot_block_half: 32
// weights per instruction, a third of the micro-ops per weight; partial sums moved into float32 every 256
// weights), within bf16's rounding of the exact product: the loop then streams FP8 at memory speed. Without
// AVX512-FP16 but with avx512_bf16 (AMD Zen 4 and 5), bf16 rows take bf16 dot products
// instead (dot_block_bf16: the weights made bf16 exactly by table lookups, exact products, float32 sums).
// The same loops read bfloat16 stacks too (bf16_grouped_gemv: a bf16 model's routed experts and projections when
// decoding; from four bf16 rows on, with avx512_bf16, by its dot products: dot_block_bf16_weights).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

// One float8_e4m3fn weight as float32 / 2^8 (NaN, which no checkpoint holds, reads as 480 / 2^8).
inline float fp8_times_2_pow_minus_8(uint8_t bits) {
  uint16_t half = static_cast<uint16_t>((bits & 0x80) << 8 | (bits & 0x7F) << 7);
  return _cvtsh_ss(half);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int64_t kLanes = 16;
// 16 weights -> 16 floats (/ 2^8): sign-extend to 16 bits, shift the 7 magnitude bits into the float16
// exponent and mantissa, clear the copy of the sign that lands in the float16 exponent's top bit.
inline __m512 load16(const uint8_t* p) {
  __m256i bits = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  bits = _mm256_and_si256(_mm256_slli_epi16(bits, 7), _mm256_set1_epi16(static_cast<short>(0xBFFF)));
  return _mm512_cvtph_ps(bits);
}
// 16 bfloat16 weights -> 16 floats (the bits shifted into a float32's upper half)
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 zero() { return _mm512_setzero_ps(); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 fma(__m512 a, const float* b, __m512 c) { return _mm512_fmadd_ps(a, _mm512_loadu_ps(b), c); }
inline __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
inline float sum(__m512 v) { return _mm512_reduce_add_ps(v); }
inline __m512 fma_scalar(__m512 a, float b, __m512 c) { return _mm512_fmadd_ps(a, _mm512_set1_ps(b), c); }
inline __m512 scale(__m512 a, float factor) { return _mm512_mul_ps(a, _mm512_set1_ps(factor)); }
inline __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
inline __m512 fma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// float32 -> bfloat16 rounded to nearest even, as torch rounds (no NaN in a dequantized weight)
inline void store(uint16_t* p, __m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
using Vec = __m512;
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
constexpr int64_t kLanes = 8;
inline __m256 load16(const uint8_t* p) {  // 8 weights
  __m128i bits = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  bits = _mm_and_si128(_mm_slli_epi16(bits, 7), _mm_set1_epi16(static_cast<short>(0xBFFF)));
  return _mm256_cvtph_ps(bits);
}
// 16 weights -> two vectors of 8 floats (/ 2^8): one load, shift and mask for both (a fifth fewer micro-ops)
inline void load_pair(const uint8_t* p, __m256& low, __m256& high) {
  __m256i bits = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  bits = _mm256_and_si256(_mm256_slli_epi16(bits, 7), _mm256_set1_epi16(static_cast<short>(0xBFFF)));
  low = _mm256_cvtph_ps(_mm256_castsi256_si128(bits));
  high = _mm256_cvtph_ps(_mm256_extracti128_si256(bits, 1));
}
inline __m256 load16(const uint16_t* p) {  // 8 bfloat16 weights
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline __m256 zero() { return _mm256_setzero_ps(); }
inline __m256 load16(const float* p) { return _mm256_loadu_ps(p); }  // 8 floats
inline __m256 fma(__m256 a, const float* b, __m256 c) { return _mm256_fmadd_ps(a, _mm256_loadu_ps(b), c); }
inline __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline float sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
inline __m256 fma_scalar(__m256 a, float b, __m256 c) { return _mm256_fmadd_ps(a, _mm256_set1_ps(b), c); }
inline __m256 scale(__m256 a, float factor) { return _mm256_mul_ps(a, _mm256_set1_ps(factor)); }
inline __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 fma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store(uint16_t* p, __m256 v) {  // float32 -> bfloat16, nearest even
  __m256i bits = _mm256_castps_si256(v);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
using Vec = __m256;
#else
#error "the FP8 decode kernel needs AVX2 with F16C and FMA (or AVX-512)"
#endif

// Two vectors of consecutive weights (AVX2 FP8 has a cheaper form above).
template <typename W>
inline void load_pair(const W* p, Vec& low, Vec& high) {
  low = load16(p);
  high = load16(p + kLanes);
}

inline float to_float(float value) { return value; }
inline float to_float(uint8_t bits) { return fp8_times_2_pow_minus_8(bits); }
inline float to_float(uint16_t bits) {  // bfloat16
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, 4);
  return value;
}

inline void store_scalar(float* p, float v) { *p = v; }
inline void store_scalar(uint16_t* p, float v) {  // float32 -> bfloat16, nearest even
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  *p = static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// v as the dtype T stores it (float32: itself; bfloat16: rounded to nearest even), as float32.
template <typename T>
inline float in_dtype(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    uint16_t bits;
    store_scalar(&bits, v);
    return to_float(bits);
  }
}

constexpr int64_t kMaxRows = 16;  // rows of one group processed together (each weight read once for them)

// Dot products of R weight rows with M rows of scaled x: R x M sums in registers (with AVX2, two each: see
// kChains). Each 16 weights are converted once and used for the M rows, each 16 values of x loaded once for the R
// weight rows. The loop steps a cache line of weights at a time, prefetching the next block's rows into L1 and the
// block four ahead into L2: weights stream from memory once, with enough lines in flight to keep the memory busy (on
// an AMD EPYC Zen 4, weights from memory: one bf16 row through 1024 x 1024 FP8 weights 0.75x the time, bf16 weights
// 0.71x, against the next block alone). (A prefetch under a branch inside the vector loop made GCC store every
// accumulator to the stack at each step: 1.1-1.2x slower with AVX2 at one row; with AVX-512 it made no difference.)
// Every block shape sums each product in the same order, so a row's results do not depend on the rows beside it
// (the routed mixture in one call gives the dispatcher's numbers).
template <int R, int M, typename W, typename Out>
inline void dot_block(const W* rows, const float* scaled, int64_t in, Out* out, int64_t out_stride) {
  constexpr int64_t kLine = 64 / sizeof(W);  // weights in a cache line of a row: whole vectors
  // Sums per product: with AVX2, the low and the high vector of each pair of vectors into their own sum (two chains
  // of FMAs: one row of x against one weight row, the AVX2 blocks' one-row shape, is then not bound by the FMAs'
  // latency); with AVX-512, one.
  constexpr int kChains = kLanes == 8 ? 2 : 1;
  Vec acc[R][M][kChains];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < M; ++j)
      for (int c = 0; c < kChains; ++c) acc[r][j][c] = zero();
  const auto step = [&](int64_t i) {
    Vec values[R];
    for (int r = 0; r < R; ++r) values[r] = load16(rows + r * in + i);
    for (int j = 0; j < M; ++j) {
      for (int r = 0; r < R; ++r) acc[r][j][0] = fma(values[r], scaled + j * in + i, acc[r][j][0]);
    }
  };
  const auto step_pair = [&](int64_t i) {  // 2 * kLanes weights of each row
    Vec low[R], high[R];
    for (int r = 0; r < R; ++r) load_pair(rows + r * in + i, low[r], high[r]);
    for (int j = 0; j < M; ++j) {
      for (int r = 0; r < R; ++r) {
        acc[r][j][0] = fma(low[r], scaled + j * in + i, acc[r][j][0]);
        acc[r][j][kChains - 1] = fma(high[r], scaled + j * in + i + kLanes, acc[r][j][kChains - 1]);
      }
    }
  };
  int64_t i = 0;
  for (; i + kLine <= in; i += kLine) {
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows + (R + r) * in + i), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows + (4 * R + r) * in + i), _MM_HINT_T1);
#pragma GCC unroll 4
    for (int64_t k = 0; k < kLine; k += 2 * kLanes) step_pair(i + k);
  }
  for (; i + kLanes <= in; i += kLanes) step(i);
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < M; ++j) {
      float value = sum(kChains == 2 ? add(acc[r][j][0], acc[r][j][kChains - 1]) : acc[r][j][0]);
      for (int64_t k = i; k < in; ++k) value += to_float(rows[r * in + k]) * scaled[j * in + k];
      store_scalar(out + j * out_stride + r, value);
    }
  }
}

// A tile's products in register blocks: its rows of x (j) in runs of 4, 2, 1, each against blocks of R4, R2,
// R1 weight rows (o), then single weight rows; block(R, M, o, j) computes the R x M dot products of weight
// rows o... with x rows j... (R, M as std::integral_constant).
template <int R4, int R2, int R1, typename Block>
inline void for_each_block(int64_t rows, int64_t o_begin, int64_t o_end, Block block) {
  auto run = [&](auto r, auto m, int64_t j) {
    int64_t o = o_begin;
    for (; o + decltype(r)::value <= o_end; o += decltype(r)::value) block(r, m, o, j);
    for (; o < o_end; ++o) block(std::integral_constant<int, 1>{}, m, o, j);
  };
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) run(std::integral_constant<int, R4>{}, std::integral_constant<int, 4>{}, j);
  for (; j + 2 <= rows; j += 2) run(std::integral_constant<int, R2>{}, std::integral_constant<int, 2>{}, j);
  for (; j < rows; ++j) run(std::integral_constant<int, R1>{}, std::integral_constant<int, 1>{}, j);
}

// Output rows [o, o_end) of a tile's rows of x (float32; FP8 weights: x scaled, see dot_block).
template <typename W, typename Out>
inline void dot_tile(const W* weight, const float* x, int64_t rows, int64_t in, int64_t o, int64_t o_end,
                     Out* out, int64_t out_stride) {
  // AVX-512: 4 x 4 accumulators fit its 32 registers. One row of x against bf16 weights goes through one weight row at
  // a time: each thread then reads its weights as one sequential stream, where blocks of 8 rows read 8 streams a row
  // apart (and load each x value once for 8 weights, which matters no more when the loop waits for the memory). On an
  // AMD EPYC Zen 4, one bf16 row through 1024 x 1024 bf16 weights from memory: 0.81-0.89x the time, bench_fp8.py's bf16
  // model at one token 0.88-0.89x. FP8 weights keep blocks of 8 (one weight row at a time: 1.00x).
  // AVX2 (16 registers, two sums per product): blocks of 1 x 4, 2 x 2 and 1 x 1. On an AMD EPYC Zen 3 (no AVX-512),
  // against blocks of 2 x 4, 4 x 2 and 4 x 1 with one sum per product, bench_fp8.py's model (in-process, interleaved):
  // 1 token FP8 0.92-0.95x the time, bf16 0.90x; 4 tokens FP8 0.94x, bf16 0.91x. The one-row shape reads one stream
  // per thread; kernel alone, weights from memory, FP8 products at 4 rows take 1.02-1.07x the time (2 x 4 with two
  // sums spills registers: 1.25-1.34x).
  constexpr int kFourRowBlock = kLanes == 16 ? 4 : 1, kTwoRowBlock = kLanes == 16 ? 4 : 2;
  constexpr int kOneRowBlock = kLanes == 16 ? (std::is_same_v<W, uint16_t> ? 1 : 8) : 1;
  for_each_block<kFourRowBlock, kTwoRowBlock, kOneRowBlock>(rows, o, o_end, [&](auto r, auto m, int64_t row, int64_t j) {
    dot_block<decltype(r)::value, decltype(m)::value>(weight + row * in, x + j * in, in, out + j * out_stride + row, out_stride);
  });
}

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
// bf16 activations against FP8 weights with avx512_bf16's dot product (vdpbf16ps: 32 products per
// instruction, in pairs, into 16 float32 sums), where the CPU has no AVX512-FP16. Every e4m3 value is a
// normal bfloat16, so 64 weights become bfloat16 exactly by two 128-entry byte tables (vpermi2b: the bf16
// bits' high byte, the sign or-ed in, and their low byte) and two byte interleaves; x enters as it is (bf16,
// in the interleaves' order: see permute_for_dot) and each block's sums are multiplied by the block's scale
// in float32: the products are exact and summed in float32, as in the float32 path.
constexpr int64_t kDotChunk = 64;  // weights converted together: one cache line of a row

struct Fp8ToBf16Tables {
  __m512i high_low, high_high, low_low, low_high;  // bytes of the bf16 bits of magnitudes 0-63 and 64-127
};
inline Fp8ToBf16Tables fp8_to_bf16_tables() {
  alignas(64) uint8_t high[128], low[128];
  for (int m = 0; m < 128; ++m) {
    const float value = fp8_times_2_pow_minus_8(static_cast<uint8_t>(m)) * 256.0f;  // exact in bf16
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    high[m] = static_cast<uint8_t>(bits >> 24);
    low[m] = static_cast<uint8_t>(bits >> 16);
  }
  return {_mm512_load_si512(high), _mm512_load_si512(high + 64), _mm512_load_si512(low), _mm512_load_si512(low + 64)};
}

// 64 FP8 weights -> two vectors of 32 bf16: weights 0-7, 16-23, 32-39, 48-55, then 8-15, 24-31, 40-47, 56-63.
inline void load_bf16_pair(const uint8_t* p, const Fp8ToBf16Tables& t, __m512i& first, __m512i& second) {
  const __m512i bytes = _mm512_loadu_si512(p);
  const __m512i low = _mm512_permutex2var_epi8(t.low_low, bytes, t.low_high);  // index bit 7 (the sign) unused
  __m512i high = _mm512_permutex2var_epi8(t.high_low, bytes, t.high_high);
  high = _mm512_ternarylogic_epi32(high, bytes, _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);  // high | (bytes & 0x80)
  first = _mm512_unpacklo_epi8(low, high);
  second = _mm512_unpackhi_epi8(low, high);
}

// A row of bf16 x (in a multiple of kDotChunk) in load_bf16_pair's order, each chunk of 64 values apart.
inline void permute_for_dot(const uint16_t* x, int64_t in, uint16_t* target) {
  const __m512i first = _mm512_set_epi16(55, 54, 53, 52, 51, 50, 49, 48, 39, 38, 37, 36, 35, 34, 33, 32,
                                         23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(8));
  for (int64_t i = 0; i < in; i += kDotChunk) {
    const __m512i a = _mm512_loadu_si512(x + i), b = _mm512_loadu_si512(x + i + 32);
    _mm512_storeu_si512(target + i, _mm512_permutex2var_epi16(a, first, b));
    _mm512_storeu_si512(target + i + 32, _mm512_permutex2var_epi16(a, second, b));
  }
}

inline __m512 dot_pairs(__m512 acc, __m512i weights, const uint16_t* x) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(weights), reinterpret_cast<__m512bh>(_mm512_loadu_si512(x)));
}

// R weight rows against M rows of permuted bf16 x: per block of block_i inputs, float32 sums of exact products,
// then times the block's scale (block_scales: the tile's scale row) into the R x M accumulators.
template <int R, int M, typename Out>
inline void dot_block_bf16(const uint8_t* rows, const uint16_t* x, int64_t in, const float* block_scales,
                           int64_t block_i, const Fp8ToBf16Tables& tables, Out* out, int64_t out_stride) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < M; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b * block_i < in; ++b) {
    __m512 partial[R][M];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < M; ++j) partial[r][j] = _mm512_setzero_ps();
    const int64_t end = std::min(in, (b + 1) * block_i);
    for (int64_t i = b * block_i; i < end; i += kDotChunk) {
      for (int r = 0; r < R; ++r) {  // a row's weights converted, then used: few registers live
        _mm_prefetch(reinterpret_cast<const char*>(rows + (R + r) * in + i), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(rows + (4 * R + r) * in + i), _MM_HINT_T1);  // as dot_block
        __m512i first, second;
        load_bf16_pair(rows + r * in + i, tables, first, second);
        for (int j = 0; j < M; ++j)
          partial[r][j] = dot_pairs(dot_pairs(partial[r][j], first, x + j * in + i), second, x + j * in + i + 32);
      }
    }
    const __m512 block_scale = _mm512_set1_ps(block_scales[b]);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < M; ++j) acc[r][j] = _mm512_fmadd_ps(partial[r][j], block_scale, acc[r][j]);
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < M; ++j) store_scalar(out + j * out_stride + r, _mm512_reduce_add_ps(acc[r][j]));
}

// bf16 activations against bf16 weights with the same dot product: each pair of consecutive weights times the
// same pair of x, so both enter as they are (no conversion, no permutation). Exact products summed in float32,
// as in dot_block with float32 x, in another order (vdpbf16ps reads denormals, below 1e-38, as zero). A third
// of dot_block's micro-ops per weight, which bound that loop from four rows of x on: on an AMD EPYC Zen 4,
// weights of 384 x 1024 to 16384 x 1024 from memory, 0.56-0.85x its time at 4 rows, 0.44-0.80x at 8, 0.43-0.69x
// at 16; at 1 and 2 rows, where the memory bounds both, 0.87-1.21x (taken from 4 rows on).
template <int R, int M, typename Out>
inline void dot_block_bf16_weights(const uint16_t* rows, const uint16_t* x, int64_t in, Out* out, int64_t out_stride) {
  constexpr int64_t kLine = 32;  // bf16 values in a cache line
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < M; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kLine <= in; i += kLine) {
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(rows + (R + r) * in + i), _MM_HINT_T0);  // as dot_block
      _mm_prefetch(reinterpret_cast<const char*>(rows + (4 * R + r) * in + i), _MM_HINT_T1);
      const __m512i weights = _mm512_loadu_si512(rows + r * in + i);
      for (int j = 0; j < M; ++j) acc[r][j] = dot_pairs(acc[r][j], weights, x + j * in + i);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < M; ++j) {
      float value = _mm512_reduce_add_ps(acc[r][j]);
      for (int64_t k = i; k < in; ++k) value += to_float(rows[r * in + k]) * to_float(x[j * in + k]);
      store_scalar(out + j * out_stride + r, value);
    }
  }
}
#endif

#if defined(__AVX512FP16__)
// bf16 activations against FP8 weights, twice the weights per instruction: 32 weights converted to float16
// (the same bits as load16, already float16) and multiplied into float16 partial sums with float16 x (x
// times its block scales, 2^8 and a power of two that puts its largest magnitude in [128, 256), so that
// no product nor run of kHalfRun partial sums can overflow), moved into float32 every kHalfRun vectors.
constexpr int64_t kHalfLanes = 32, kHalfRun = 8;
inline __m512h load32(const uint8_t* p) {
  __m512i bits = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ph(_mm512_and_si512(_mm512_slli_epi16(bits, 7), _mm512_set1_epi16(static_cast<short>(0xBFFF))));
}
inline __m512 widen_add(__m512h partial, __m512 acc) {
  const __m512i bits = _mm512_castph_si512(partial);
  acc = _mm512_add_ps(acc, _mm512_cvtph_ps(_mm512_castsi512_si256(bits)));
  return _mm512_add_ps(acc, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(bits, 1)));
}

template <int R, int M, typename Out>
inline void dot_block_half(const uint8_t* rows, const _Float16* x, int64_t in, const float* unscale, Out* out,
                           int64_t out_stride) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < M; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t i = 0;
  while (i + kHalfLanes <= in) {
    __m512h partial[R][M];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < M; ++j) partial[r][j] = _mm512_setzero_ph();
    const int64_t run_end = std::min(in - (in - i) % kHalfLanes, i + kHalfRun * kHalfLanes);
    for (; i < run_end; i += kHalfLanes) {
      if (i % 64 == 0) {
        // the rows two blocks ahead into L1 and five blocks ahead into L2: more lines in flight (one row: 0.87-0.97x
        // the time for 1024 x 1024 to 5632 x 1024 weights with one block ahead into L1 and two into L2; two and
        // five took bench_fp8.py's one-token forward another 0.94-0.97x, measured on the Xeon with AMX; the float32
        // and bf16-weight loops gained nothing)
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows + (2 * R + r) * in + i), _MM_HINT_T0);
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows + (5 * R + r) * in + i), _MM_HINT_T1);
      }
      __m512h values[R];
      for (int r = 0; r < R; ++r) values[r] = load32(rows + r * in + i);
      for (int j = 0; j < M; ++j) {
        const __m512h xj = _mm512_loadu_ph(x + j * in + i);
        for (int r = 0; r < R; ++r) partial[r][j] = _mm512_fmadd_ph(values[r], xj, partial[r][j]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < M; ++j) acc[r][j] = widen_add(partial[r][j], acc[r][j]);
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < M; ++j) {
      float value = _mm512_reduce_add_ps(acc[r][j]);
      for (int64_t k = i; k < in; ++k) value += to_float(rows[r * in + k]) * static_cast<float>(x[j * in + k]);
      store_scalar(out + j * out_stride + r, value * unscale[j]);
    }
  }
}

// The largest magnitude of each block of block_i values of a row of x.
inline void block_maxima(const float* x, int64_t in, int64_t block_i, float* maxima) {
  for (int64_t b = 0; b * block_i < in; ++b) {
    const int64_t end = std::min(in, (b + 1) * block_i);
    __m512 lanes = _mm512_setzero_ps();
    int64_t i = b * block_i;
    for (; i + 16 <= end; i += 16) lanes = _mm512_max_ps(lanes, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    float largest = _mm512_reduce_max_ps(lanes);
    for (; i < end; ++i) largest = std::max(largest, std::fabs(x[i]));
    maxima[b] = largest;
  }
}

// A row of x times each block's scale, 2^8 and the power of two that puts the largest product in [128, 256),
// as float16; returns the power's inverse, which the row's results are multiplied by.
inline float to_half_row(const float* x, const float* maxima, const float* block_scales, int64_t in, int64_t block_i,
                         _Float16* target) {
  const int64_t blocks = (in + block_i - 1) / block_i;
  float largest = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) largest = std::max(largest, maxima[b] * (block_scales[b] * 256.0f));
  int exponent = 0;
  std::frexp(largest, &exponent);  // largest = m * 2^exponent, m in [0.5, 1)
  const float power = largest > 0.0f ? std::ldexp(1.0f, 8 - exponent) : 1.0f;
  for (int64_t b = 0; b < blocks; ++b) {
    // 256 and power are powers of two: x * factor rounds once, as x * scale * 256 does in the float32 path
    const float factor = block_scales[b] * 256.0f * power;
    const int64_t end = std::min(in, (b + 1) * block_i);
    int64_t i = b * block_i;
    for (; i + 16 <= end; i += 16) {
      const __m512 values = _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(factor));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(target + i), _mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < end; ++i) target[i] = static_cast<_Float16>(x[i] * factor);
  }
  return 1.0f / power;
}
#endif

// Rows [first, last) of weight [groups * rows, cols] times their block scales, into out (float or bf16 bits).
template <typename T>
void dequantize_rows(const uint8_t* w, const float* s, T* out, int64_t first, int64_t last, int64_t rows,
                     int64_t cols, int64_t scale_rows, int64_t scale_cols, int64_t block_o, int64_t block_i) {
  for (int64_t row = first; row < last; ++row) {
    const int64_t group = row / rows, r = row % rows;
    const float* block_scales = s + (group * scale_rows + r / block_o) * scale_cols;
    const uint8_t* source = w + row * cols;
    T* target = out + row * cols;
    for (int64_t b = 0; b < scale_cols; ++b) {
      const float factor = block_scales[b] * 256.0f;
      const int64_t end = std::min(cols, (b + 1) * block_i);
      int64_t i = b * block_i;
      for (; i + kLanes <= end; i += kLanes) store(target + i, scale(load16(source + i), factor));
      for (; i < end; ++i) store_scalar(target + i, fp8_times_2_pow_minus_8(source[i]) * factor);
    }
  }
}

// One row of x times each block's scale and 2^8 (the block scales of one scale row).
inline void scale_by_blocks(const float* x, const float* block_scales, int64_t in, int64_t block_i, float* target) {
  for (int64_t b = 0; b * block_i < in; ++b) {
    const float factor = block_scales[b] * 256.0f;
    const int64_t end = std::min(in, (b + 1) * block_i);
    int64_t i = b * block_i;
    for (; i + kLanes <= end; i += kLanes) store(target + i, scale(load16(x + i), factor));
    for (; i < end; ++i) target[i] = x[i] * factor;
  }
}

struct Tile {
  int64_t group, first_row, rows, out_begin, out_end;
};

// The rows of x as float32: the tensor's own data, or bf16 rows converted here without an aten call (a decoded
// token makes a few hundred of these small products, and each aten call costs microseconds).
class FloatRows {
 public:
  // rows [..., in]: every leading dimension is a row (a projection's input as the model holds it; reshaping it
  // and the result in Python took ~1.4 us of the ~8.6 us of Python around each small FP8 product)
  explicit FloatRows(const at::Tensor& rows) {
    TORCH_CHECK(rows.dim() >= 1 && (rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kBFloat16),
                "rows: float32 or bfloat16 [..., in]");
    leading_ = rows.sizes().vec();
    leading_.pop_back();
    rows_ = rows.reshape({c10::multiply_integers(leading_), rows.size(-1)}).contiguous();
    if (rows_.scalar_type() == at::kFloat) {
      data_ = rows_.data_ptr<float>();
      return;
    }
    const int64_t count = rows_.numel();
    copy_.reset(new float[count]);
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(rows_.data_ptr<at::BFloat16>());
    int64_t i = 0;
    for (; i + kLanes <= count; i += kLanes) store(copy_.get() + i, load16(bits + i));
    for (; i < count; ++i) copy_[i] = to_float(bits[i]);
    data_ = copy_.get();
  }
  const float* data() const { return data_; }
  // the bf16 rows' own bits (null for float32 rows)
  const uint16_t* bf16_bits() const {
    return rows_.scalar_type() == at::kBFloat16 ? reinterpret_cast<const uint16_t*>(rows_.data_ptr<at::BFloat16>()) : nullptr;
  }
  int64_t n() const { return rows_.size(0); }
  int64_t in() const { return rows_.size(1); }
  // the product's result [..., out] (the rows' leading dimensions), in the rows' dtype
  at::Tensor empty_output(int64_t out) const {
    std::vector<int64_t> sizes = leading_;
    sizes.push_back(out);
    return at::empty(sizes, rows_.options());
  }

 private:
  std::vector<int64_t> leading_;
  at::Tensor rows_;
  std::unique_ptr<float[]> copy_;
  const float* data_;
};

// Calls body with the data of t (float32 or bfloat16) as float* or uint16_t* (bfloat16 bits).
template <typename Body>
void with_data(const at::Tensor& t, Body body) {
  if (t.scalar_type() == at::kFloat) {
    body(t.data_ptr<float>());
  } else {
    body(reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()));
  }
}

// A stack of weights [groups, rows, cols], or one weight [rows, cols] (a group of one). Rows within a group
// are contiguous, groups stride(0) apart (each head's rows of MLA's kv_b_proj lie apart).
struct Stack {
  int64_t groups, rows, cols, group_stride;
};
Stack stack_of(const at::Tensor& t, const char* what) {
  TORCH_CHECK((t.dim() == 2 || t.dim() == 3) && t.stride(-1) == 1 && t.stride(-2) == t.size(-1), what,
              ": [groups, rows, cols] or [rows, cols], rows contiguous");
  return t.dim() == 3 ? Stack{t.size(0), t.size(1), t.size(2), t.stride(0)} : Stack{1, t.size(0), t.size(1), 0};
}

// FP8 weights (float8_e4m3fn, or their uint8 bits) and their float32 block scales, stacked alike.
const uint8_t* fp8_bits(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat8_e4m3fn || weight.scalar_type() == at::kByte,
              "weight: float8_e4m3fn (or its uint8 bits)");
  return static_cast<const uint8_t*>(weight.data_ptr());
}
at::Tensor float_scales(const at::Tensor& scale, const Stack& weight) {
  const at::Tensor s = scale.scalar_type() == at::kFloat ? scale : scale.to(at::kFloat);
  TORCH_CHECK(stack_of(s, "scale").groups == weight.groups, "scale: one grid of block scales per group of the weight");
  return s;
}

// Cumulative rows per group (int64 or int32, on the CPU); none: one group of all n rows. Rows past the last
// group's end are left out of every product (their results are zero).
std::vector<int64_t> group_ends(const std::optional<at::Tensor>& ends, int64_t groups, int64_t n) {
  if (!ends.has_value()) {
    TORCH_CHECK(groups == 1, "ends: needed for ", groups, " groups");
    return {n};
  }
  const at::Tensor e = ends->contiguous();
  TORCH_CHECK(e.device().is_cpu() && e.numel() == groups && (e.scalar_type() == at::kLong || e.scalar_type() == at::kInt),
              "ends: int64 or int32 [groups] on the CPU");
  std::vector<int64_t> result(groups);
  for (int64_t g = 0; g < groups; ++g) {
    result[g] = e.scalar_type() == at::kLong ? e.data_ptr<int64_t>()[g] : e.data_ptr<int32_t>()[g];
    TORCH_CHECK(result[g] >= (g == 0 ? 0 : result[g - 1]) && result[g] <= n, "ends: cumulative row counts up to ", n);
  }
  return result;
}

// Rows of x [..., in]: every leading dimension counted.
int64_t row_count(const at::Tensor& rows) {
  TORCH_CHECK(rows.dim() >= 1, "rows: [..., in]");
  return c10::multiply_integers(rows.sizes().begin(), rows.sizes().end() - 1);
}

// Zeroes the rows of y [..., out] that no group holds.
void zero_rows_past(at::Tensor& y, const std::vector<int64_t>& ends) {
  const int64_t last = ends.empty() ? 0 : ends.back(), n = row_count(y);
  if (last < n) y.view({n, y.size(-1)}).narrow(0, last, n - last).zero_();
}

// Output rows per tile of a product of `out` rows per group: `most`, halved while the groups with rows (ends)
// would make fewer than 4 tiles per thread (down to 16 rows): a 384-row projection in three tiles of 128 kept
// one of two threads busy for two of them (38 us against 33 us in tiles of 32, weights in L3). Halving keeps
// the tiles of a scale block equal, hence the threads' shares.
int64_t tile_height(int64_t out, const std::vector<int64_t>& ends, int64_t most) {
  int64_t busy = 0;
  for (size_t g = 0; g < ends.size(); ++g) busy += ends[g] > (g == 0 ? 0 : ends[g - 1]);
  int64_t height = most;
  while (height > 16 && busy * ((out + height - 1) / height) < 4 * at::get_num_threads()) height /= 2;
  return height;
}

// fp8_grouped_gemv with the groups' ends checked (group_ends)
at::Tensor fp8_product(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& rows,
                       const std::vector<int64_t>& end, int64_t part_rows, int64_t block_o, int64_t block_i) {
  const FloatRows x(rows);
  const Stack stack = stack_of(weight, "weight");
  const at::Tensor scales = float_scales(scale, stack);
  const int64_t groups = stack.groups, out = stack.rows, in = stack.cols, n = x.n();
  TORCH_CHECK(x.in() == in, "x has ", x.in(), " columns, the weight ", in);
  const int64_t part_scale_rows = (part_rows + block_o - 1) / block_o, scale_cols = scales.size(-1);
  const int64_t scale_group_stride = scales.dim() == 3 ? scales.stride(0) : 0;
  at::Tensor y = x.empty_output(out);
  zero_rows_past(y, end);
  const uint8_t* w = fp8_bits(weight);
  const float* s = scales.data_ptr<float>();
  const float* xp = x.data();

  // Work: every group with rows, in tiles of output rows that share one scale row, and chunks of at most
  // kMaxRows rows of x.
  std::vector<Tile> tiles;
  const int64_t height = tile_height(out, end, block_o);
  int64_t start = 0;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t r = start; r < end[g]; r += kMaxRows) {
      const int64_t rows = std::min(kMaxRows, end[g] - r);
      for (int64_t o = 0; o < out;) {
        const int64_t part_end = (o / part_rows + 1) * part_rows;
        const int64_t block_end = std::min(part_end, o - o % part_rows + ((o % part_rows) / block_o + 1) * block_o);
        const int64_t tile_end = std::min({block_end, out, o + height});
        tiles.push_back({g, r, rows, o, tile_end});
        o = tile_end;
      }
    }
    start = end[g];
  }

#if defined(__AVX512FP16__)
  const bool half = rows.scalar_type() == at::kBFloat16;  // float16 products: within bf16's rounding
  std::vector<float> maxima(half ? n * scale_cols : 0);
  for (int64_t r = 0; half && r < n; ++r) block_maxima(xp + r * in, in, block_i, &maxima[r * scale_cols]);
#elif defined(__AVX512BF16__) && defined(__AVX512VBMI__)
  // bf16 dot products where the blocks are whole chunks (x permuted once per call)
  const uint16_t* bf16_x = x.bf16_bits();
  const bool dot = bf16_x != nullptr && in % kDotChunk == 0 && block_i % kDotChunk == 0 && !tiles.empty();
  std::unique_ptr<uint16_t[]> permuted(dot ? new uint16_t[n * in] : nullptr);
  for (int64_t r = 0; dot && r < n; ++r) permute_for_dot(bf16_x + r * in, in, permuted.get() + r * in);
  static const Fp8ToBf16Tables tables = fp8_to_bf16_tables();
#endif
  with_data(y, [&](auto* yp) {
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t first, int64_t last) {
      // x of the tile's rows times the block scales and 2^8 (left uninitialised: zeroing showed in decoding)
      std::unique_ptr<float[]> scaled(new float[std::min(kMaxRows, n) * in]);
#if defined(__AVX512FP16__)
      _Float16* scaled_half = reinterpret_cast<_Float16*>(scaled.get());  // in its place (half the bytes)
      float unscale[kMaxRows];
#endif
      for (int64_t t = first; t < last; ++t) {
        const Tile& tile = tiles[t];
        const int64_t o0 = tile.out_begin;
        const int64_t scale_row = (o0 / part_rows) * part_scale_rows + (o0 % part_rows) / block_o;
        const float* block_scales = s + tile.group * scale_group_stride + scale_row * scale_cols;
        const uint8_t* wg = w + tile.group * stack.group_stride;
        auto* target = yp + tile.first_row * out;
#if defined(__AVX512FP16__)
        if (half) {
          for (int64_t j = 0, r = tile.first_row; j < tile.rows; ++j, ++r)
            unscale[j] = to_half_row(xp + r * in, &maxima[r * scale_cols], block_scales, in, block_i, scaled_half + j * in);
          for_each_block<2, 4, 8>(tile.rows, o0, tile.out_end, [&](auto r, auto m, int64_t row, int64_t j) {
            dot_block_half<decltype(r)::value, decltype(m)::value>(wg + row * in, scaled_half + j * in, in, unscale + j,
                                                                   target + j * out + row, out);
          });
          continue;
        }
#elif defined(__AVX512BF16__) && defined(__AVX512VBMI__)
        // one row too: on a Zen 4 (AVX-512 in two halves) the float32 loop's conversions bound it below the memory's
        // rate (one bf16 row through FP8 weights of bench_fp8.py's projections from memory: 0.75-0.90x the time with
        // dot products, both with the L2 prefetch); on a Zen 5, before that prefetch, dot products were 3-7% slower
        if (dot) {
          const uint16_t* tile_x = permuted.get() + tile.first_row * in;
          // R x M sums and as many partial sums: at most 16 + 16 of the 32 registers, tables and weights too
          for_each_block<2, 4, 8>(tile.rows, o0, tile.out_end, [&](auto r, auto m, int64_t row, int64_t j) {
            dot_block_bf16<decltype(r)::value, decltype(m)::value>(wg + row * in, tile_x + j * in, in, block_scales, block_i,
                                                                  tables, target + j * out + row, out);
          });
          continue;
        }
#endif
        for (int64_t j = 0; j < tile.rows; ++j) scale_by_blocks(xp + (tile.first_row + j) * in, block_scales, in, block_i, &scaled[j * in]);
        dot_tile(wg, scaled.get(), tile.rows, in, o0, tile.out_end, target, out);
      }
    });
  });
  return y;
}

}  // namespace

at::Tensor fp8_grouped_gemv(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& rows,
                            const std::optional<at::Tensor>& ends, int64_t part_rows, int64_t block_o, int64_t block_i) {
  return fp8_product(weight, scale, rows, group_ends(ends, stack_of(weight, "weight").groups, row_count(rows)), part_rows,
                     block_o, block_i);
}

// bfloat16 weights [groups, out, in] (a bf16 model's routed experts; [out, in]: one projection) against
// decode-sized groups of rows: y[r, o] = sum_i W[g, o, i] * x[r, i], every group's products in one parallel
// region. torch.mv per expert reads each weight at ~22-24 GB/s on this project's CPU, one large GEMV at
// ~28.5: each call starts its threads and memory streams anew. Tiles of kTileRows output rows; accumulation
// float32.
namespace {

// bf16_grouped_gemv with the groups' ends checked (group_ends)
at::Tensor bf16_product(const at::Tensor& weight, const at::Tensor& rows, const std::vector<int64_t>& end) {
  constexpr int64_t kTileRows = 64;
  const FloatRows x(rows);
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "weight: bfloat16");
  const Stack stack = stack_of(weight, "weight");
  const int64_t groups = stack.groups, out = stack.rows, in = stack.cols;
  TORCH_CHECK(x.in() == in, "x: [n, ", in, "]");
  at::Tensor y = x.empty_output(out);
  zero_rows_past(y, end);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const float* xp = x.data();
  std::vector<Tile> tiles;
  const int64_t height = tile_height(out, end, kTileRows);
  for (int64_t g = 0, start = 0; g < groups; start = end[g++]) {
    for (int64_t r = start; r < end[g]; r += kMaxRows)
      for (int64_t o = 0; o < out; o += height)
        tiles.push_back({g, r, std::min(kMaxRows, end[g] - r), o, std::min(out, o + height)});
  }
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
  const uint16_t* bf16_x = x.bf16_bits();
#endif
  with_data(y, [&](auto* yp) {
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        const Tile& tile = tiles[t];
        const uint16_t* wg = w + tile.group * stack.group_stride;
        auto* target = yp + tile.first_row * out;
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
        if (bf16_x != nullptr && tile.rows >= 4) {
          for_each_block<4, 4, 8>(tile.rows, tile.out_begin, tile.out_end, [&](auto r, auto m, int64_t row, int64_t j) {
            dot_block_bf16_weights<decltype(r)::value, decltype(m)::value>(wg + row * in, bf16_x + (tile.first_row + j) * in,
                                                                           in, target + j * out + row, out);
          });
          continue;
        }
#endif
        dot_tile(wg, xp + tile.first_row * in, tile.rows, in, tile.out_begin, tile.out_end, target, out);
      }
    });
  });
  return y;
}

}  // namespace

at::Tensor bf16_grouped_gemv(const at::Tensor& weight, const at::Tensor& rows, const std::optional<at::Tensor>& ends) {
  return bf16_product(weight, rows, group_ends(ends, stack_of(weight, "weight").groups, row_count(rows)));
}

// Decoding's routed mixture in one call: the steps of the Python dispatcher and ExpertChunk.forward for a few
// tokens without gradients (a Python call between each step costs more than the step): the (token, expert)
// assignments grouped by expert, stably; each token's row through its experts' gate/up projection;
// SiLU(gate) * up * mixing weight; the down projection; the results added to their tokens in that order.
// The same numbers as the dispatcher's aten operations: SiLU is aten's, the gather, the roundings of the
// multiplications and index_add_'s float32 sums are loops here. Weights: stacked [experts,
// out, in], FP8 with their block scales (the gate's and the up projection's grids stacked) or bf16 (no
// scales); hidden [n, h] float32 or bf16; topk_indices int64 and topk_weights (float) [n, top_k].
at::Tensor routed_mixture(const at::Tensor& hidden, const at::Tensor& topk_indices, const at::Tensor& topk_weights,
                          const at::Tensor& gate_up, const std::optional<at::Tensor>& gate_up_scale, const at::Tensor& down,
                          const std::optional<at::Tensor>& down_scale, int64_t block_o, int64_t block_i) {
  TORCH_CHECK(hidden.dim() == 2 && topk_indices.dim() == 2 && topk_indices.size(0) == hidden.size(0) &&
              topk_indices.scalar_type() == at::kLong && topk_weights.sizes() == topk_indices.sizes(),
              "hidden [n, h], topk_indices int64 and topk_weights [n, top_k]");
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3 && down.size(0) == gate_up.size(0) &&
              gate_up_scale.has_value() == down_scale.has_value(), "stacked gate_up and down weights, both FP8 or neither");
  const int64_t experts = gate_up.size(0), intermediate = gate_up.size(1) / 2;
  const at::Tensor indices = topk_indices.contiguous().view(-1);
  const int64_t* expert_of = indices.data_ptr<int64_t>();
  const int64_t assignments = indices.numel(), top_k = topk_indices.size(1);
  // a counting sort: stable, as argsort(stable=True)
  std::vector<int64_t> end(experts, 0);
  for (int64_t a = 0; a < assignments; ++a) {
    TORCH_CHECK(expert_of[a] >= 0 && expert_of[a] < experts, "topk_indices: experts 0..", experts - 1);
    ++end[expert_of[a]];
  }
  for (int64_t e = 1; e < experts; ++e) end[e] += end[e - 1];
  std::vector<int64_t> position(assignments);  // the assignments in expert order
  std::vector<int64_t> next(experts);
  for (int64_t e = 0; e < experts; ++e) next[e] = e == 0 ? 0 : end[e - 1];
  for (int64_t a = 0; a < assignments; ++a) position[next[expert_of[a]]++] = a;
  // each assignment's token, its row of hidden and its mixing weight in the activations' dtype (index_select and
  // .to(), without their aten calls: a decoded token's MoE layer made ~10 aten calls of 5-25 us around its products)
  const at::Tensor h = hidden.contiguous();
  const int64_t width = h.size(1), item = h.element_size();
  at::Tensor rows = at::empty({assignments, width}, h.options());
  std::vector<int64_t> token(assignments);
  for (int64_t a = 0; a < assignments; ++a) {
    token[a] = position[a] / top_k;
    std::memcpy(static_cast<char*>(rows.data_ptr()) + a * width * item,
                static_cast<const char*>(h.data_ptr()) + token[a] * width * item, width * item);
  }
  const at::Tensor gate_up_rows = gate_up_scale.has_value()
      ? fp8_product(gate_up, *gate_up_scale, rows, end, intermediate, block_o, block_i) : bf16_product(gate_up, rows, end);
  const at::Tensor mixing_tensor = topk_weights.to(at::kFloat).contiguous();
  const float* mixing = mixing_tensor.data_ptr<float>();
  // SiLU(gate) * up * weight, rounded to the activations' dtype after each step as the aten calls round
  at::Tensor activated = at::silu(gate_up_rows.narrow(1, 0, intermediate)).contiguous();
  with_data(activated, [&](auto* act) {
    using T = std::remove_pointer_t<decltype(act)>;
    const T* up = reinterpret_cast<const T*>(gate_up_rows.data_ptr()) + intermediate;
    for (int64_t a = 0; a < assignments; ++a) {
      const float weight = in_dtype<T>(mixing[position[a]]);
      T* row = act + a * intermediate;
      const T* up_row = up + a * 2 * intermediate;
      for (int64_t i = 0; i < intermediate; ++i) store_scalar(row + i, in_dtype<T>(to_float(row[i]) * to_float(up_row[i])) * weight);
    }
  });
  const at::Tensor outputs = down_scale.has_value()
      ? fp8_product(down, *down_scale, activated, end, down.size(1), block_o, block_i) : bf16_product(down, activated, end);
  // the outputs added to their tokens in the assignments' order in float32, then rounded once (index_add_'s numbers)
  std::vector<float> sums(h.size(0) * width, 0.0f);
  at::Tensor mixed = at::empty_like(h);
  with_data(mixed, [&](auto* y) {
    using T = std::remove_pointer_t<decltype(y)>;
    const T* source = reinterpret_cast<const T*>(outputs.data_ptr());
    for (int64_t a = 0; a < assignments; ++a) {
      float* target = sums.data() + token[a] * width;
      const T* row = source + a * width;
      for (int64_t i = 0; i < width; ++i) target[i] += to_float(row[i]);
    }
    for (int64_t i = 0; i < h.size(0) * width; ++i) store_scalar(y + i, sums[i]);
  });
  return mixed;
}

// The transposed product, y[r, :] = sum_k x[r, k] * W[g, k, :] (MLA's queries folded into the latent space
// through each head's key rows; absorbed attention's weights over the cached latent, every head's row against
// the same cache): per block of up to kTransposedRows rows of one group and 4 vectors of output columns,
// accumulators in registers across all k, each weight vector loaded once for the block's rows (one row per
// task read the cache once per head: 16 heads over 1024 cached slots took 1.7x torch's batched product). W is
// FP8 with block scales (s, times 2^8: see load16) or bf16 (s null, unit 1). Needs the columns (and FP8 blocks)
// in whole vectors.
constexpr int kTransposedRows = kLanes == 16 ? 4 : 2;  // M x 4 accumulators and 4 weight vectors in registers (blocks of 3 and 4 rows: AVX-512 only)
constexpr int kTransposedVectors = 4;

template <int M, typename W, typename Y>
inline void transposed_rows(const W* w, int64_t depth, int64_t cols, const float* s, int64_t scale_cols, int64_t block_o,
                            const int64_t* scale_col, const float* x, float unit, int64_t c0, int64_t width, Y* y) {
  Vec acc[M][kTransposedVectors];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < kTransposedVectors; ++j) acc[m][j] = zero();
  for (int64_t k = 0; k < depth; ++k) {
    const float* row_scales = s == nullptr ? nullptr : s + (k / block_o) * scale_cols;
    Vec weights[kTransposedVectors];
    for (int j = 0; j < kTransposedVectors; ++j)
      if (j < width) weights[j] = load16(w + k * cols + c0 + j * kLanes);
    for (int m = 0; m < M; ++m) {
      const float xk = x[m * depth + k] * unit;
      for (int j = 0; j < kTransposedVectors; ++j)
        if (j < width) acc[m][j] = fma_scalar(weights[j], row_scales == nullptr ? xk : xk * row_scales[scale_col[j]], acc[m][j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < kTransposedVectors; ++j)
      if (j < width) store(y + m * cols + c0 + j * kLanes, acc[m][j]);
}

template <typename W>
at::Tensor grouped_gemv_transposed(const W* w, const Stack& stack, const float* s, int64_t scale_group_stride,
                                   int64_t scale_cols, float unit, int64_t block_o, int64_t block_i,
                                   const at::Tensor& rows, const std::optional<at::Tensor>& ends) {
  const FloatRows x(rows);
  const int64_t depth = stack.rows, cols = stack.cols;
  TORCH_CHECK(x.in() == depth, "x has ", x.in(), " columns, the weight ", depth, " rows");
  TORCH_CHECK(cols % kLanes == 0 && (s == nullptr || block_i % kLanes == 0), "block and columns in whole vectors of ", kLanes);
  constexpr int64_t kChunk = kTransposedVectors * kLanes;
  const int64_t n = x.n(), chunks = (cols + kChunk - 1) / kChunk;
  const std::vector<int64_t> end = group_ends(ends, stack.groups, n);
  at::Tensor y = x.empty_output(cols);
  zero_rows_past(y, end);
  std::vector<Tile> blocks;  // a block of rows of one group (out_begin / out_end unused)
  for (int64_t g = 0, r = 0; g < stack.groups; ++g) {
    for (; r < end[g]; r += blocks.back().rows) blocks.push_back({g, r, std::min<int64_t>(kTransposedRows, end[g] - r), 0, 0});
  }
  const float* xp = x.data();
  with_data(y, [&](auto* yp) {
    at::parallel_for(0, static_cast<int64_t>(blocks.size()) * chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        const Tile& block = blocks[t / chunks];
        const int64_t c0 = (t % chunks) * kChunk, width = std::min(kChunk, cols - c0) / kLanes;
        const W* wg = w + block.group * stack.group_stride;
        const float* sg = s == nullptr ? nullptr : s + block.group * scale_group_stride;
        int64_t scale_col[kTransposedVectors];  // each vector's block of columns (a division per vector and k cost more than the FMA)
        for (int j = 0; j < kTransposedVectors; ++j) scale_col[j] = (c0 + j * kLanes) / block_i;
        const float* xr = xp + block.first_row * depth;
        auto* yr = yp + block.first_row * cols;
        switch (block.rows) {
          case 1: transposed_rows<1>(wg, depth, cols, sg, scale_cols, block_o, scale_col, xr, unit, c0, width, yr); break;
          case 2: transposed_rows<2>(wg, depth, cols, sg, scale_cols, block_o, scale_col, xr, unit, c0, width, yr); break;
          case 3: transposed_rows<3>(wg, depth, cols, sg, scale_cols, block_o, scale_col, xr, unit, c0, width, yr); break;
          case 4: transposed_rows<4>(wg, depth, cols, sg, scale_cols, block_o, scale_col, xr, unit, c0, width, yr); break;
        }
      }
    });
  });
  return y;
}

at::Tensor fp8_grouped_gemv_transposed(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& rows,
                                       const std::optional<at::Tensor>& ends, int64_t block_o, int64_t block_i) {
  const Stack stack = stack_of(weight, "weight");
  const at::Tensor scales = float_scales(scale, stack);
  return grouped_gemv_transposed(fp8_bits(weight), stack, scales.data_ptr<float>(), scales.dim() == 3 ? scales.stride(0) : 0,
                                 scales.size(-1), 256.0f, block_o, block_i, rows, ends);
}

// The same over bfloat16 weights (a bf16 kv_b_proj read in place).
at::Tensor bf16_grouped_gemv_transposed(const at::Tensor& weight, const at::Tensor& rows, const std::optional<at::Tensor>& ends) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "weight: bfloat16");
  return grouped_gemv_transposed(reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), stack_of(weight, "weight"),
                                 nullptr, 0, 0, 1.0f, 1, 1, rows, ends);
}

// Products with rows [first, first + count) of every head's rows of weight [heads * rows, cols] (MLA's kv_b_proj: a
// head's key rows, then its value rows), FP8 with its block scales (scale: their grid) or bf16 (none), read in place:
// x [batch, heads, seq, cols] -> [batch, heads, seq, count], or, transposed, x [batch, heads, seq, count] -> [batch,
// heads, seq, cols] (contiguous). The views and group ends of the grouped products made here, not by ~10 Python-level calls per
// product (fp8_cpu.head_rows_product checks that the slice maps onto whole scale rows).
at::Tensor head_rows_product(const at::Tensor& weight, const std::optional<at::Tensor>& scale, int64_t heads, int64_t first,
                             int64_t count, const at::Tensor& x, bool transposed, int64_t block_o, int64_t block_i) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % heads == 0 && x.dim() == 4 && x.size(1) == heads,
              "weight [heads * rows, cols], x [batch, heads, seq, dim]");
  const int64_t per_head = weight.size(0) / heads, cols = weight.size(1), batch = x.size(0), seq = x.size(2);
  TORCH_CHECK(first >= 0 && count > 0 && first + count <= per_head, "rows [first, first + count) of each head's ", per_head);
  const at::Tensor slices = weight.view({heads, per_head, cols}).narrow(1, first, count);
  const at::Tensor inputs = x.transpose(0, 1).reshape({heads * batch * seq, x.size(3)});
  const at::Tensor ends = at::arange(1, heads + 1, at::kLong) * (batch * seq);
  at::Tensor output;
  if (!scale.has_value()) {
    output = transposed ? bf16_grouped_gemv_transposed(slices, inputs, ends) : bf16_grouped_gemv(slices, inputs, ends);
  } else {
    const int64_t first_block = first / block_o, last_block = (first + count - 1) / block_o;
    const at::Tensor scales = scale->view({heads, per_head / block_o, -1}).narrow(1, first_block, last_block - first_block + 1);
    output = transposed ? fp8_grouped_gemv_transposed(slices, scales, inputs, ends, block_o, block_i)
                        : fp8_grouped_gemv(slices, scales, inputs, ends, count, block_o, block_i);
  }
  return output.view({heads, batch, seq, -1}).transpose(0, 1).contiguous();  // (a copy only for several sequences)
}

// weight [groups, rows, cols] (uint8 bits of float8_e4m3fn) with scale [groups, scale rows, scale cols] ->
// float32 or bfloat16: the same numbers as torch's float32 dequantization (rounded to bfloat16 as torch does),
// written into `out` where given (a reused buffer: fresh pages cost more than the dequantization).
at::Tensor fp8_dequantize(const at::Tensor& weight, const at::Tensor& scale, int64_t block_o, int64_t block_i,
                          bool bfloat16, const std::optional<at::Tensor>& into) {
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == at::kByte && weight.is_contiguous(), "weight: uint8 [groups, rows, cols]");
  TORCH_CHECK(scale.dim() == 3 && scale.scalar_type() == at::kFloat && scale.is_contiguous(), "scale: float32 [groups, rows, cols]");
  const int64_t rows = weight.size(1), cols = weight.size(2), total = weight.size(0) * rows;
  const int64_t scale_rows = scale.size(1), scale_cols = scale.size(2);
  TORCH_CHECK(scale_rows == (rows + block_o - 1) / block_o && scale_cols == (cols + block_i - 1) / block_i, "scale grid");
  const auto dtype = bfloat16 ? at::kBFloat16 : at::kFloat;
  TORCH_CHECK(!into.has_value() || (into->scalar_type() == dtype && into->is_contiguous() && into->numel() == weight.numel()),
              "into: a contiguous ", dtype, " buffer of ", weight.numel(), " values");
  at::Tensor out = into.has_value() ? into->view(weight.sizes()) : at::empty(weight.sizes(), weight.options().dtype(dtype));
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, total, grain, [&](int64_t first, int64_t last) {
    if (bfloat16) {
      dequantize_rows(w, s, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), first, last, rows, cols,
                      scale_rows, scale_cols, block_o, block_i);
    } else {
      dequantize_rows(w, s, out.data_ptr<float>(), first, last, rows, cols, scale_rows, scale_cols, block_o, block_i);
    }
  });
  return out;
}

// The elementwise work around a decoded token's products, one call each instead of ~10 aten calls (each a few
// microseconds, as long as a decoding product): RMSNorm and MLA's interleaved RoPE.

template <typename T>
inline Vec in_dtype(Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    uint16_t bits[kLanes];
    store(bits, v);
    return load16(bits);
  }
}

// transformers' Llama RMSNorm (DeepSeek's): x in float32 times 1 / sqrt(mean(x^2) + eps), rounded to x's
// dtype, times the weight in the dtype torch promotes the two to. The mean's sum runs in another order than
// torch's (within a float32 rounding of it).
template <typename X, typename Wt, typename Out>
void rms_norm_rows(const X* x, const Wt* w, Out* y, int64_t first, int64_t last, int64_t d, float eps) {
  for (int64_t r = first; r < last; ++r) {
    const X* xr = x + r * d;
    Out* yr = y + r * d;
    Vec squares = zero();
    int64_t i = 0;
    for (; i + kLanes <= d; i += kLanes) {
      const Vec v = load16(xr + i);
      squares = fma(v, v, squares);
    }
    float total = sum(squares);
    for (; i < d; ++i) total += to_float(xr[i]) * to_float(xr[i]);
    const float inverse = 1.0f / std::sqrt(total / static_cast<float>(d) + eps);
    for (i = 0; i + kLanes <= d; i += kLanes) store(yr + i, mul(in_dtype<X>(scale(load16(xr + i), inverse)), load16(w + i)));
    for (; i < d; ++i) store_scalar(yr + i, in_dtype<X>(to_float(xr[i]) * inverse) * to_float(w[i]));
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const auto floating = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; };
  TORCH_CHECK(weight.dim() == 1 && x.dim() >= 1 && x.size(-1) == weight.size(0) && floating(x) && floating(weight),
              "x [..., d] and weight [d], float32 or bfloat16");
  const at::Tensor input = x.contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(at::promote_types(x.scalar_type(), weight.scalar_type())));
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d;
  with_data(input, [&](const auto* xp) {
    with_data(w, [&](const auto* wp) {
      with_data(y, [&](auto* yp) {
        at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t first, int64_t last) {
          rms_norm_rows(xp, wp, yp, first, last, d, static_cast<float>(eps));
        });
      });
    });
  });
  return y;
}

// rope.py's apply_rotary_interleaved with its operations in its order, each result rounded to x's dtype as
// torch rounds it (no fused multiply-add, which would round once for two): x [batch, heads, seq, d] (dims
// contiguous), cos and sin [batch or 1, seq, d] (cat(freqs, freqs)) of x's dtype -> [batch, heads, seq, d]
// contiguous: [evens * cos - odds * sin, odds * cos + evens * sin].
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T>
void rotary_rows(const T* x, const T* cos, const T* sin, T* y, const int64_t* x_strides, int64_t heads, int64_t seq,
                 int64_t d, int64_t cos_batch, int64_t first, int64_t last) {
  const int64_t half = d / 2;
  for (int64_t row = first; row < last; ++row) {
    const int64_t b = row / (heads * seq), h = row / seq % heads, s = row % seq;
    const T* xr = x + b * x_strides[0] + h * x_strides[1] + s * x_strides[2];
    const int64_t table = ((cos_batch == 1 ? 0 : b) * seq + s) * d;
    T* yr = y + row * d;
    for (int64_t j = 0; j < half; ++j) {
      const float even = to_float(xr[2 * j]), odd = to_float(xr[2 * j + 1]);
      const float c = to_float(cos[table + j]), n = to_float(sin[table + j]);
      const float even_cos = in_dtype<T>(even * c), odd_sin = in_dtype<T>(odd * n);
      const float odd_cos = in_dtype<T>(odd * c), even_sin = in_dtype<T>(even * n);
      store_scalar(yr + j, even_cos - odd_sin);
      store_scalar(yr + half + j, odd_cos + even_sin);
    }
  }
}
#pragma GCC pop_options

at::Tensor rotary_interleaved(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0, "x: [batch, heads, seq, d], dims contiguous, d even");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && (cos.size(0) == 1 || cos.size(0) == x.size(0)) &&
              cos.size(1) == x.size(2) && cos.size(2) == x.size(3), "cos and sin: [batch or 1, seq, d]");
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && cos.scalar_type() == x.scalar_type() &&
              sin.scalar_type() == x.scalar_type(), "x, cos and sin: one dtype, float32 or bfloat16");
  const at::Tensor c = cos.contiguous(), n = sin.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t heads = x.size(1), seq = x.size(2), d = x.size(3), rows = x.size(0) * heads * seq;
  const int64_t strides[3] = {x.stride(0), x.stride(1), x.stride(2)};
  with_data(y, [&](auto* yp) {
    using T = std::remove_pointer_t<decltype(yp)>;
    const auto data = [](const at::Tensor& t) { return static_cast<const T*>(t.data_ptr()); };
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / d), [&](int64_t first, int64_t last) {
      rotary_rows(data(x), data(c), data(n), yp, strides, heads, seq, d, c.size(0), first, last);
    });
  });
  return y;
}

// A router's decision from its float32 logits [n, experts] (routing.py's TopKRouter.forward, whose numbers it
// keeps): the scores, the choices and the weights' sums by the same aten kernels, the rest (bias, the groups'
// scores and mask, the gather, normalisation and scaling) by loops of single float operations, exact in any
// order. group_score: 0 no groups, 1 a group's best score, 2 the sum of its two best. Returns the scores, the
// chosen experts [n, top_k] (int64) and their weights (float32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> route(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                     bool sigmoid, int64_t group_score, int64_t groups, int64_t kept_groups,
                                                     int64_t top_k, bool normalise, double epsilon, double scaling) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(), "logits: float32 [n, experts]");
  const int64_t n = logits.size(0), experts = logits.size(1);
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == experts), "bias: float32 [experts]");
  TORCH_CHECK(group_score == 0 || (groups > 0 && experts % groups == 0 && kept_groups <= groups), "groups");
  const at::Tensor scores = sigmoid ? at::sigmoid(logits) : at::softmax(logits, -1);
  at::Tensor choice = scores;
  if (bias.has_value() || group_score != 0) {
    choice = at::empty_like(scores);
    const float* sp = scores.data_ptr<float>();
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    const float* bp = bias.has_value() ? b.data_ptr<float>() : nullptr;
    float* cp = choice.data_ptr<float>();
    for (int64_t i = 0; i < n * experts; ++i) cp[i] = bp == nullptr ? sp[i] : sp[i] + bp[i % experts];
    if (group_score != 0) {
      const int64_t per_group = experts / groups;
      at::Tensor group_scores = at::empty({n, groups}, scores.options());
      float* gp = group_scores.data_ptr<float>();
      for (int64_t g = 0; g < n * groups; ++g) {
        const float* member = cp + g * per_group;
        float best = -INFINITY, second = -INFINITY;
        for (int64_t e = 0; e < per_group; ++e) {
          if (member[e] > best) {
            second = best;
            best = member[e];
          } else if (member[e] > second) {
            second = member[e];
          }
        }
        gp[g] = group_score == 1 ? best : best + second;
      }
      const at::Tensor kept = std::get<1>(at::topk(group_scores, kept_groups, -1, true, false));
      const int64_t* kp = kept.data_ptr<int64_t>();
      std::vector<char> keep(groups);
      for (int64_t t = 0; t < n; ++t) {
        std::fill(keep.begin(), keep.end(), 0);
        for (int64_t j = 0; j < kept_groups; ++j) keep[kp[t * kept_groups + j]] = 1;
        for (int64_t e = 0; e < experts; ++e)
          if (!keep[e / per_group]) cp[t * experts + e] = -INFINITY;
      }
    }
  }
  const at::Tensor indices = std::get<1>(at::topk(choice, top_k, -1, true, false));
  at::Tensor weights = at::empty({n, top_k}, scores.options());
  const int64_t* ip = indices.data_ptr<int64_t>();
  const float* sp = scores.data_ptr<float>();
  float* wp = weights.data_ptr<float>();
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < top_k; ++j) wp[t * top_k + j] = sp[t * experts + ip[t * top_k + j]];
  if (normalise) {
    const at::Tensor sums = at::sum(weights, -1);
    const float* total = sums.data_ptr<float>();
    for (int64_t t = 0; t < n; ++t) {
      const float denominator = total[t] + static_cast<float>(epsilon);
      for (int64_t j = 0; j < top_k; ++j) wp[t * top_k + j] = wp[t * top_k + j] / denominator;
    }
  }
  if (scaling != 1.0) {
    for (int64_t i = 0; i < n * top_k; ++i) wp[i] = wp[i] * static_cast<float>(scaling);
  }
  return {scores, indices, weights};
}

// Absorbed MLA's attention scores for a decoding step, in one call: every row of latent_queries [batch, rows, c] (a
// head's query through its key rows of kv_b_proj; rows = heads x fresh tokens, head-major) against its sequence's cached
// latent [batch, total, c], plus the row of rope_queries [batch, rows, r] against the cached RoPE key [batch, total,
// r], each product rounded to bfloat16 (bf16_grouped_gemv's numbers), their bfloat16 sum, times `scaling` in float32;
// slots past the row's query position (positions [batch or 1, fresh]; none: the fresh tokens are the last slots) are
// -inf. -> float32 [batch, rows, total]: the numbers of attention.py's steps (two products, add, cast, scale, mask)
// without their ~14 Python-level calls per layer.
at::Tensor absorbed_scores(const at::Tensor& latent_queries, const at::Tensor& rope_queries, const at::Tensor& latent,
                           const at::Tensor& key_rope, double scaling, int64_t fresh,
                           const std::optional<at::Tensor>& positions) {
  TORCH_CHECK(latent_queries.dim() == 3 && rope_queries.dim() == 3 && latent.dim() == 3 && key_rope.dim() == 3,
              "queries [batch, rows, dim], cache [batch, total, dim]");
  const int64_t batch = latent_queries.size(0), rows = latent_queries.size(1), total = latent.size(1);
  TORCH_CHECK(rope_queries.size(0) == batch && rope_queries.size(1) == rows && latent.size(0) == batch &&
                  key_rope.size(0) == batch && key_rope.size(1) == total,
              "queries and cache: one sequence per batch row, as many rows and slots");
  TORCH_CHECK(fresh >= 1 && rows % fresh == 0 && fresh <= total, "rows: heads x fresh tokens, at most the slots");
  at::Tensor position_rows;
  if (positions.has_value()) {
    position_rows = positions->to(at::kLong).contiguous();
    TORCH_CHECK(position_rows.dim() == 2 && (position_rows.size(0) == 1 || position_rows.size(0) == batch) &&
                    position_rows.size(1) == fresh,
                "positions: [batch or 1, fresh tokens]");
  }
  at::Tensor out = at::empty({batch, rows, total}, latent_queries.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const float scale = static_cast<float>(scaling);
  for (int64_t b = 0; b < batch; ++b) {
    const at::Tensor on_latent = bf16_product(latent.select(0, b), latent_queries.select(0, b), {rows});
    const at::Tensor on_rope = bf16_product(key_rope.select(0, b), rope_queries.select(0, b), {rows});
    const uint16_t* first = reinterpret_cast<const uint16_t*>(on_latent.data_ptr<at::BFloat16>());
    const uint16_t* second = reinterpret_cast<const uint16_t*>(on_rope.data_ptr<at::BFloat16>());
    const int64_t* position = positions.has_value() ? position_rows.data_ptr<int64_t>() + (position_rows.size(0) == 1 ? 0 : b) * position_rows.size(1) : nullptr;
    float* ob = o + b * rows * total;
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t last = position != nullptr ? position[row % fresh] : total - fresh + row % fresh;  // last visible slot
      for (int64_t t = 0; t < total; ++t) {
        uint16_t sum;
        store_scalar(&sum, to_float(first[row * total + t]) + to_float(second[row * total + t]));
        ob[row * total + t] = t <= last ? to_float(sum) * scale : -INFINITY;
      }
    }
  }
  return out;
}

// The decoding functions as torch operators (namespace: the module's name, unique per build), which a
// compiled graph calls without a Python step in between; their shapes for tracing are registered from Python.
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("fp8_grouped_gemv(Tensor weight, Tensor scale, Tensor rows, Tensor? ends, int part_rows, int block_o, int block_i) -> Tensor");
  m.def("fp8_grouped_gemv_transposed(Tensor weight, Tensor scale, Tensor rows, Tensor? ends, int block_o, int block_i) -> Tensor");
  m.def("bf16_grouped_gemv(Tensor weight, Tensor rows, Tensor? ends) -> Tensor");
  m.def("bf16_grouped_gemv_transposed(Tensor weight, Tensor rows, Tensor? ends) -> Tensor");
  m.def("routed_mixture(Tensor hidden, Tensor topk_indices, Tensor topk_weights, Tensor gate_up, Tensor? gate_up_scale, "
        "Tensor down, Tensor? down_scale, int block_o, int block_i) -> Tensor");
  m.def("head_rows_product(Tensor weight, Tensor? scale, int heads, int first, int count, Tensor x, bool transposed, "
        "int block_o, int block_i) -> Tensor");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("fp8_grouped_gemv", &fp8_grouped_gemv);
  m.impl("fp8_grouped_gemv_transposed", &fp8_grouped_gemv_transposed);
  m.impl("bf16_grouped_gemv", &bf16_grouped_gemv);
  m.impl("bf16_grouped_gemv_transposed", &bf16_grouped_gemv_transposed);
  m.impl("routed_mixture", &routed_mixture);
  m.impl("head_rows_product", &head_rows_product);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fp8_grouped_gemv", &fp8_grouped_gemv, "decode-sized products with block-wise FP8 weights");
  m.def("fp8_grouped_gemv_transposed", &fp8_grouped_gemv_transposed, "x @ W per group, block-wise FP8 W");
  m.def("bf16_grouped_gemv", &bf16_grouped_gemv, "decode-sized products with stacked bfloat16 weights");
  m.def("bf16_grouped_gemv_transposed", &bf16_grouped_gemv_transposed, "x @ W per group, bfloat16 W");
  m.def("fp8_dequantize", &fp8_dequantize, "block-wise FP8 weights to float32 or bfloat16");
  m.def("routed_mixture", &routed_mixture, "decoding's routed mixture of experts in one call");
  m.def("rms_norm", &rms_norm, "RMSNorm in one pass (Llama's and DeepSeek's numbers)");
  m.def("rotary_interleaved", &rotary_interleaved, "RoPE on interleaved pairs (rope.py's numbers)");
  m.def("route", &route, "a router's decision from its float32 logits (routing.py's numbers)");
  m.def("head_rows_product", &head_rows_product, "products with each head's slice of kv_b_proj's rows, read in place");
  m.def("absorbed_scores", &absorbed_scores, "absorbed MLA's attention scores for a decoding step (attention.py's numbers)");
}
