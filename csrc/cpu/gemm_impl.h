// The CPU GEMM, written once over a lane type V (see vec_*.h) and instantiated per instruction set.
//
// BLIS-style blocking, sized for the small MLP shapes this library exists for:
//   - B is read in panels of a K block of rows x NRW columns. A B with contiguous rows (dX, dW)
//     is read where it lies; a transposed one (the weight in the forward) is first packed into a
//     zero-padded panel, transposing 16x16 blocks in registers.
//   - Rows are taken MC at a time, so the rows of A a panel meets stay in L2 at large batch sizes.
//   - A is only ever broadcast element by element, so any strides work. When its rows are strided
//     and its columns contiguous (dz.T in dW: a tile's broadcasts would hit one L1 set per row), the
//     MC-row block of a K block is first copied tile-major, MR elements per step, which is cheap in
//     that layout.
//   - The micro-kernel keeps an MR x NRW tile of C in registers for a whole K block; the last
//     block applies the epilogue (bias, ReLU, 1-bit mask) before the only store of the result.
//   - A fused optimizer update (dW in the whole-step op) is applied to whole rows of the parameter
//     after their gradient is finished (update_rows), not tile by tile.
// Each element of C is summed in the same order whatever the thread split and the K block, so results
// depend on neither the number of threads nor the CPU's K block.
//
// Included by the gemm_<isa>.cpp translation units only, after they define FASTMLP_ISA_NS, so the
// symbols of every instruction set stay apart.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace fastmlp::cpu {
void* scratch(int64_t bytes);  // thread-local, 64-byte aligned, grows only (dispatch.cpp)
}

namespace fastmlp::cpu::FASTMLP_ISA_NS {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline uint64_t low_bits(int n) { return n >= 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1; }

// Reads n <= 32 mask bits starting at bit j of a packed row, without touching bytes past them.
inline uint32_t read_bits(const uint8_t* row, int64_t j, int n) {
  const uint8_t* p = row + j / 8;
  const int shift = int(j % 8);
  if (shift == 0 && n == 16) return uint32_t(p[0]) | uint32_t(p[1]) << 8;  // the AVX-512 float case
  if (shift == 0 && n == 8) return p[0];
  const int nbytes = (shift + n + 7) / 8;
  uint64_t w = 0;
  for (int k = 0; k < nbytes; ++k) w |= uint64_t(p[k]) << (8 * k);
  return uint32_t((w >> shift) & low_bits(n));
}

// V: lanes; MR x NRV vectors: the micro-tile; KC: the K block when the Gemm names none (run_gemm
// names the CPU's, KernelTable::inner_block); MC: row block; DQ: columns per dot tile.
template <class V, int MR, int NRV, int KC, int MC = 32 * MR, int DQ = 4>
struct GemmImpl {
  using T = typename V::T;
  using reg = typename V::reg;
  static constexpr int L = V::L;
  static constexpr int NRW = NRV * L;  // columns of one packed panel / one micro-tile
  // bfloat16 rounding (Gemm::round_bf16, Update::shadow) exists for float32 only.
  static constexpr bool kRounds = std::is_same_v<T, float>;
  __attribute__((always_inline)) static reg round_bf16(reg v) {
    if constexpr (kRounds) return V::round_bf16(v);
    else return v;
  }
  static_assert(NRW % 8 == 0 && NRW <= 64, "a tile's mask bits must fill whole bytes of a uint64");
  static_assert(KC % L == 0, "K blocks are whole vectors");

  struct Tile {
    int64_t kc;
    const T* a;  // A(i0, pc)
    int64_t a_rs, a_cs;
    const T* bp;  // B(pc, j0): a packed panel (ldb = NRW) or B itself (ldb = its row stride)
    int64_t ldb;
    T* c;         // C(i0, j0)
    int64_t ldc;
    int ncols;        // valid columns in this tile, 1..NRW
    bool accumulate;  // C already holds the sum over earlier K blocks
    bool final;       // last K block: apply the epilogue
    const T* bias;    // bias + j0, or null
    bool relu;
    bool round;     // round the finished sums to bfloat16
    uint8_t* mask;  // mask row i0, byte j0 / 8
    int64_t ldm;
    const uint8_t* mask_in;  // input-mask row i0 (bit offset: column j0)
    int64_t ldm_in;
    int64_t j0;
  };

  // n <= L elements at p: a full vector, or the first n lanes (the rest read as zero / not written).
  // Forced inline: used all over gemm_block, GCC otherwise keeps them out of line in the update loop.
  __attribute__((always_inline)) static reg load_upto(const T* p, int n) {
    return n == L ? V::load(p) : V::load_n(p, n);
  }
  __attribute__((always_inline)) static void store_upto(T* p, reg v, int n) {
    if (n == L) V::store(p, v);
    else V::store_n(p, v, n);
  }

  // The mask bits of one tile row (ncols <= NRW columns from a whole byte: tiles start at multiples
  // of NRW), read once rather than per vector; bits past ncols are zero.
  static uint64_t tile_bits(const uint8_t* row, int ncols) {
    uint64_t w = 0;
    if (ncols == NRW) {
      for (int k = 0; k < NRW / 8; ++k) w |= uint64_t(row[k]) << (8 * k);  // compiled to one load
      return w;
    }
    for (int k = 0; k < (ncols + 7) / 8; ++k) w |= uint64_t(row[k]) << (8 * k);
    return w & low_bits(ncols);
  }

  // TAIL: B is read in place and its last vector holds fewer than L columns. PA: A is a block packed
  // by pack_a (a_rs = 1, a_cs = MR), read through one pointer at fixed offsets; otherwise through one
  // pointer per row. With six row pointers GCC kept the avx2 loop's counter on the stack (16 general
  // registers), a store-to-load chain in every step of the sum.
  template <int R, int Q, bool TAIL, bool PA>
  static void tile(const Tile& t) {
    reg acc[R][Q];
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < Q; ++q) {
        const int n = int(imin(L, t.ncols - q * L));
        T* cp = t.c + r * t.ldc + q * L;
        acc[r][q] = t.accumulate ? load_upto(cp, n) : V::zero();
      }

    const T* bp = t.bp;
    const int64_t ldb = t.ldb;
    const int n_last = t.ncols - (Q - 1) * L;
    // One step of the sum: B row bp times A(r, p) = a(r) into every row r of the tile.
    auto step = [&](const T* bp, auto a) __attribute__((always_inline)) {
      reg b[Q];
      for (int q = 0; q < Q; ++q) b[q] = TAIL && q == Q - 1 ? V::load_n(bp + q * L, n_last) : V::load(bp + q * L);
      for (int r = 0; r < R; ++r) {
        const reg av = V::bcast(a(r));
        for (int q = 0; q < Q; ++q) acc[r][q] = V::fma(av, b[q], acc[r][q]);
      }
    };
    if constexpr (PA) {
      const T* ak = t.a;
      for (int64_t p = 0; p < t.kc; ++p, bp += ldb, ak += MR) step(bp, [&](int r) { return ak[r]; });
    } else {
      const T* ap[R];
      for (int r = 0; r < R; ++r) ap[r] = t.a + r * t.a_rs;
      const int64_t a_cs = t.a_cs;
      for (int64_t p = 0; p < t.kc; ++p, bp += ldb) step(bp, [&](int r) { return ap[r][p * a_cs]; });
    }

    // A whole-width tile with nothing to apply (an earlier K block, or a product without an
    // epilogue: the weight gradient, the layer ops' dX) is stored straight. The general loop below
    // tests the epilogue's flags and each vector's width per vector, which in a short sum (dW at a
    // batch of 64: 64 steps per tile) cost the avx2 GEMM a sixth of its time.
    const bool plain = !(t.final && (t.bias || t.mask_in || t.round || t.relu || t.mask));
    if (!TAIL && plain && t.ncols == Q * L) {
      for (int r = 0; r < R; ++r)
        for (int q = 0; q < Q; ++q) V::store(t.c + r * t.ldc + q * L, acc[r][q]);
      return;
    }
    // The forward's last K block of a whole-width tile (bias, ReLU and the mask: the hidden layers)
    // likewise, with the bias loaded once per tile rather than once per row and vector.
    if (!TAIL && t.ncols == Q * L && t.final && t.relu && t.mask && !t.mask_in && !t.round) {
      auto finish = [&](auto with_bias) {
        reg bias[Q];
        if constexpr (decltype(with_bias)::value)
          for (int q = 0; q < Q; ++q) bias[q] = V::load(t.bias + q * L);
        for (int r = 0; r < R; ++r) {
          uint64_t bits = 0;
          for (int q = 0; q < Q; ++q) {
            reg v = acc[r][q];
            if constexpr (decltype(with_bias)::value) v = V::add(v, bias[q]);
            bits |= uint64_t(V::gt0_bits(v)) << (q * L);
            V::store(t.c + r * t.ldc + q * L, V::relu(v));
          }
          uint8_t* m = t.mask + r * t.ldm;
          for (int k = 0; k < Q * L / 8; ++k) m[k] = uint8_t(bits >> (8 * k));  // this tile's bytes only
        }
      };
      if (t.bias) finish(std::true_type{});
      else finish(std::false_type{});
      return;
    }
    for (int r = 0; r < R; ++r) {
      uint64_t bits = 0;
      const uint64_t in_bits = t.final && t.mask_in ? tile_bits(t.mask_in + r * t.ldm_in + t.j0 / 8, t.ncols) : 0;
      for (int q = 0; q < Q; ++q) {
        const int n = int(imin(L, t.ncols - q * L));
        reg v = acc[r][q];
        T* cp = t.c + r * t.ldc + q * L;
        if (t.final) {
          if (t.bias) v = V::add(v, load_upto(t.bias + q * L, n));
          if (t.mask_in) v = V::keep_bits(uint32_t(in_bits >> (q * L)), v);
          if (t.round) v = round_bf16(v);
          if (t.relu) {
            bits |= uint64_t(V::gt0_bits(v) & low_bits(n)) << (q * L);
            v = V::relu(v);
          }
        }
        store_upto(cp, v, n);
      }
      if (t.final && t.mask) {
        uint8_t* m = t.mask + r * t.ldm;
        for (int k = 0; k < (t.ncols + 7) / 8; ++k) m[k] = uint8_t(bits >> (8 * k));
      }
    }
  }

  // An Update (kernels.h) with its scalars broadcast once. row<K, A, B>() updates a run of elements
  // from their gradient, with the update's kind and its two options (SGD: weight decay, momentum;
  // Adam: weight decay, decoupled) as template arguments, so the per-vector work has no branches, and
  // the tensors behind local restrict pointers, so the compiler keeps them in registers instead of
  // reloading them after every store.
  struct Updater {
    const Update<T>& u;
    reg neg_lr, momentum, decay, one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, neg_step, decay_factor;

    explicit Updater(const Update<T>& u_)
        : u(u_), neg_lr(V::bcast(-u_.lr)), momentum(V::bcast(u_.momentum)), decay(V::bcast(u_.weight_decay)),
          one_minus_beta1(V::bcast(u_.one_minus_beta1)), beta2(V::bcast(u_.beta2)),
          one_minus_beta2(V::bcast(u_.one_minus_beta2)), eps(V::bcast(u_.eps)), bc2_sqrt(V::bcast(u_.bc2_sqrt)),
          neg_step(V::bcast(-u_.step_size)), decay_factor(V::bcast(u_.decay_factor)) {}

    // n <= L elements (all L when FULL) at p / b / b2 from the gradient vector d; with SHADOW the new
    // values rounded to bfloat16 to sh as well.
    template <UpdateKind K, bool OPT_A, bool OPT_B, bool SHADOW, bool FULL>
    __attribute__((always_inline)) void apply(T* __restrict p_, T* __restrict b, T* __restrict b2,
                                              T* __restrict sh, int n, reg d) const {
      const int m = FULL ? L : n;
      reg p = load_upto(p_, m);
      if constexpr (K == UpdateKind::kSgd) {  // OPT_A: weight decay, OPT_B: momentum
        if constexpr (OPT_A) d = V::fma(decay, p, d);
        if constexpr (OPT_B) {
          d = V::fma(momentum, load_upto(b, m), d);
          store_upto(b, d, m);
        }
        p = V::fma(neg_lr, d, p);
      } else {  // OPT_A: weight decay, OPT_B: decoupled (AdamW)
        if constexpr (OPT_A && OPT_B) p = V::mul(p, decay_factor);
        if constexpr (OPT_A && !OPT_B) d = V::fma(decay, p, d);
        reg mv = load_upto(b, m), v = load_upto(b2, m);
        mv = V::fma(one_minus_beta1, V::sub(d, mv), mv);  // torch's lerp for a weight below 0.5
        v = V::fma(one_minus_beta2, V::mul(d, d), V::mul(v, beta2));
        store_upto(b, mv, m);
        store_upto(b2, v, m);
        const reg denom = V::add(V::div(V::sqrt(v), bc2_sqrt), eps);
        p = V::fma(neg_step, V::div(mv, denom), p);
      }
      store_upto(p_, p, m);
      if constexpr (SHADOW) store_upto(sh, round_bf16(p), m);
    }

    // Elements [at, at + count) of the tensors from the gradient g (g[0] for element at).
    template <UpdateKind K, bool OPT_A, bool OPT_B, bool SHADOW>
    void row(int64_t at, int64_t count, const T* __restrict g) const {
      T* __restrict p = u.param + at;
      T* __restrict b = u.buf ? u.buf + at : nullptr;
      T* __restrict b2 = u.buf2 ? u.buf2 + at : nullptr;
      T* __restrict sh = SHADOW ? u.shadow + at : nullptr;
      auto off = [](T* q, int64_t j) { return q ? q + j : nullptr; };
      int64_t j = 0;
      for (; j + L <= count; j += L)
        apply<K, OPT_A, OPT_B, SHADOW, true>(p + j, off(b, j), off(b2, j), off(sh, j), L, V::load(g + j));
      if (j < count) {
        const int n = int(count - j);
        apply<K, OPT_A, OPT_B, SHADOW, false>(p + j, off(b, j), off(b2, j), off(sh, j), n, V::load_n(g + j, n));
      }
    }
  };

  template <UpdateKind K, bool OPT_A, bool OPT_B>
  static void update_rows_as(const Gemm<T>& g, int64_t i0, int64_t rows, int64_t c0, int64_t c1, const T* grad,
                             int64_t ldg) {
    const Updater up(g.update);
    const bool shadow = kRounds && g.update.shadow != nullptr;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = (i0 + r) * g.ldc + c0;
      if (shadow) up.template row<K, OPT_A, OPT_B, kRounds>(at, c1 - c0, grad + r * ldg);
      else up.template row<K, OPT_A, OPT_B, false>(at, c1 - c0, grad + r * ldg);
    }
  }

  // The update for rows [i0, i0 + rows) x cols [c0, c1) of a parameter shaped like C, from the
  // finished gradient (row r at grad + r * ldg, column c0 first). A separate pass over whole rows
  // rather than a per-tile epilogue: the parameter and its optimizer state then stream through in
  // long contiguous runs the hardware prefetcher follows, rather than 6 x 16 at a time after each tile.
  static void update_rows(const Gemm<T>& g, int64_t i0, int64_t rows, int64_t c0, int64_t c1, const T* grad,
                          int64_t ldg) {
    const Update<T>& u = g.update;
    const bool decay = u.weight_decay != T(0);
    if (u.kind == UpdateKind::kSgd) {
      const bool momentum = u.momentum != T(0);
      if (decay && momentum) update_rows_as<UpdateKind::kSgd, true, true>(g, i0, rows, c0, c1, grad, ldg);
      else if (decay) update_rows_as<UpdateKind::kSgd, true, false>(g, i0, rows, c0, c1, grad, ldg);
      else if (momentum) update_rows_as<UpdateKind::kSgd, false, true>(g, i0, rows, c0, c1, grad, ldg);
      else update_rows_as<UpdateKind::kSgd, false, false>(g, i0, rows, c0, c1, grad, ldg);
    } else {
      if (decay && u.decoupled) update_rows_as<UpdateKind::kAdam, true, true>(g, i0, rows, c0, c1, grad, ldg);
      else if (decay) update_rows_as<UpdateKind::kAdam, true, false>(g, i0, rows, c0, c1, grad, ldg);
      else update_rows_as<UpdateKind::kAdam, false, false>(g, i0, rows, c0, c1, grad, ldg);
    }
  }

  static void apply_update(const Update<T>& u, int64_t n, const T* grad) {
    Gemm<T> g;  // one row of n columns
    g.update = u;
    g.ldc = n;
    update_rows(g, 0, 1, 0, n, grad, n);
  }

  // Runtime (rows, vectors) -> the instantiation for it.
  template <int R, bool PA, int Q = NRV>
  static void tile_q(int q, bool tail, const Tile& t) {
    if (q == Q) return tail ? tile<R, Q, true, PA>(t) : tile<R, Q, false, PA>(t);
    if constexpr (Q > 1) tile_q<R, PA, Q - 1>(q, tail, t);
  }
  template <bool PA, int R = MR>
  static void tile_rq(int r, int q, bool tail, const Tile& t) {
    if (r == R) return tile_q<R, PA>(q, tail, t);
    if constexpr (R > 1) tile_rq<PA, R - 1>(r, q, tail, t);
  }

  // dst (kc x NRW) = B(pc .. pc+kc, j0 .. j0+ncols) for a B whose rows are strided, zero-padded to
  // whole vectors (the micro-kernel reads only the first ceil(ncols / L) vectors of each panel row).
  static void pack_panel(const Gemm<T>& g, int64_t pc, int64_t kc, int64_t j0, int ncols, T* dst) {
    const T* src = g.b + pc * g.b_rs + j0 * g.b_cs;
    const int width = (ncols + L - 1) / L * L;
    if (g.b_rs == 1) {  // B is stored transposed: each of its columns is contiguous
      // L x L blocks in registers; a partial block (last rows of the panel or of B) goes through a
      // zero-padded copy, so padding columns come out as zeros too.
      alignas(64) T tmp[L * L];
      for (int64_t p = 0; p < kc; p += L) {
        const int np = int(imin(L, kc - p));
        for (int jj = 0; jj < width; jj += L) {
          const int nj = int(imin(L, ncols - jj));
          T* d = dst + p * NRW + jj;
          if (np == L && nj == L) {
            V::transpose(src + jj * g.b_cs + p, g.b_cs, d, NRW);
            continue;
          }
          for (int j = 0; j < L; ++j)
            for (int q = 0; q < L; ++q) tmp[j * L + q] = j < nj && q < np ? src[(jj + j) * g.b_cs + p + q] : T(0);
          if (np == L) {
            V::transpose(tmp, L, d, NRW);
          } else {
            alignas(64) T out[L * L];
            V::transpose(tmp, L, out, L);
            for (int q = 0; q < np; ++q) V::store(d + q * NRW, V::load(out + q * L));
          }
        }
      }
      return;
    }
    for (int64_t p = 0; p < kc; ++p)
      for (int j = 0; j < width; ++j) dst[p * NRW + j] = j < ncols ? src[p * g.b_rs + j * g.b_cs] : T(0);
  }

  // dst[tile][p][r] = A(m0 + tile * MR + r, pc + p), zero-padded to whole tiles; A's rows are adjacent
  // (dz.T in dW: a tile row of A is a run of a dz row). Whole vectors are stored: lanes past MR land
  // on the next step's slots, which that step rewrites (steps and tiles go up), and the last step's
  // on kPackSlack elements of scratch past the block. A tile with all MR rows reads on past them,
  // within A's rows, values that land only in such rewritten slots.
  static constexpr int kPackSlack = L;
  static void pack_a(const Gemm<T>& g, int64_t m0, int64_t m1, int64_t pc, int64_t kc, T* dst) {
    for (int64_t i0 = m0; i0 < m1; i0 += MR, dst += kc * MR) {
      const int rows = int(imin(MR, m1 - i0));
      const int64_t avail = rows < MR ? rows : g.rows - i0;  // lanes that may be read from A
      const T* src = g.a + i0 + pc * g.a_cs;
      for (int64_t p = 0; p < kc; ++p)
        for (int q = 0; q < MR; q += L)
          V::store(dst + p * MR + q, load_upto(src + p * g.a_cs + q, int(imax(0, imin(L, avail - q)))));
    }
  }

  // ---- few rows against a transposed B: dot products ------------------------------------------
  // C(i, j) = A row i . B column j, both contiguous where they lie (B = w.T in the forward, so its
  // columns are the weight's rows). For a handful of rows, packing B (reading and writing all of it
  // once per call) would cost more than the product itself. Each tile keeps R x DQ vectors of partial
  // sums over K, R rows sharing every load of B, and reduces them to scalars at the end.
  static constexpr int kDotRowTile = 2;

  template <int R>
  static void dot_tile(const Gemm<T>& g, int64_t i0, int64_t j0, int nq, T* out) {
    reg acc[R][DQ];
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < DQ; ++q) acc[r][q] = V::zero();
    const T* ap[R];
    for (int r = 0; r < R; ++r) ap[r] = g.a + (i0 + r) * g.a_rs;
    const T* bp[DQ];  // columns past nq repeat the last one: computed and dropped, never out of bounds
    for (int q = 0; q < DQ; ++q) bp[q] = g.b + (j0 + imin(q, nq - 1)) * g.b_cs;
    const int64_t K = g.inner;
    int64_t p = 0;
    for (; p + L <= K; p += L) {
      reg a[R];
      for (int r = 0; r < R; ++r) a[r] = V::load(ap[r] + p);
      for (int q = 0; q < DQ; ++q) {
        const reg b = V::load(bp[q] + p);
        for (int r = 0; r < R; ++r) acc[r][q] = V::fma(a[r], b, acc[r][q]);
      }
    }
    if (p < K) {
      const int n = int(K - p);
      reg a[R];
      for (int r = 0; r < R; ++r) a[r] = V::load_n(ap[r] + p, n);
      for (int q = 0; q < DQ; ++q) {
        const reg b = V::load_n(bp[q] + p, n);
        for (int r = 0; r < R; ++r) acc[r][q] = V::fma(a[r], b, acc[r][q]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < nq; ++q) out[r * DQ + q] = V::hsum(acc[r][q]);
  }

  // The epilogue (bias, ReLU, mask) over row i's finished sums in C, columns [c0, c1); c0 is a
  // multiple of 8 (col_align), so the row's mask bytes are whole.
  static void finish_row(const Gemm<T>& g, int64_t i, int64_t c0, int64_t c1) {
    T* c = g.c + i * g.ldc;
    for (int64_t j0 = c0; j0 < c1; j0 += 64) {
      const int n = int(imin(64, c1 - j0));
      uint64_t bits = 0;
      for (int q = 0; q * L < n; ++q) {
        const int m = imin(L, n - q * L);
        const int64_t j = j0 + q * L;
        reg v = load_upto(c + j, m);
        if (g.bias) v = V::add(v, load_upto(g.bias + j, m));
        if (g.round_bf16) v = round_bf16(v);
        if (g.relu) {
          bits |= uint64_t(V::gt0_bits(v) & low_bits(m)) << (q * L);
          v = V::relu(v);
        }
        store_upto(c + j, v, m);
      }
      if (g.mask) {
        uint8_t* mrow = g.mask + i * g.ldm + j0 / 8;
        for (int k = 0; k < (n + 7) / 8; ++k) mrow[k] = uint8_t(bits >> (8 * k));
      }
    }
  }

  static void finish_rows(const Gemm<T>& g, int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) finish_row(g, i, 0, g.cols);
  }

  static void dot_block(const Gemm<T>& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    for (int64_t i0 = r0; i0 < r1; i0 += kDotRowTile) {
      const int rows = int(imin(kDotRowTile, r1 - i0));
      for (int64_t j0 = c0; j0 < c1; j0 += DQ) {
        const int nq = int(imin(DQ, c1 - j0));
        T sums[kDotRowTile * DQ];
        if (rows == kDotRowTile) dot_tile<kDotRowTile>(g, i0, j0, nq, sums);
        else dot_tile<1>(g, i0, j0, nq, sums);
        for (int r = 0; r < rows; ++r)
          for (int q = 0; q < nq; ++q) g.c[(i0 + r) * g.ldc + j0 + q] = sums[r * DQ + q];
      }
      if (g.bias || g.relu || g.round_bf16)
        for (int r = 0; r < rows; ++r) finish_row(g, i0 + r, c0, c1);
    }
  }

  // Whether g is a dot-product problem (see dot_block): up to kDotRows rows, or kDotRowsNarrow when
  // C is at most kDotNarrowCols wide (a packed panel would then be mostly padding). The crossovers
  // are measured (BENCHMARKS.md). Decided by the whole problem, never a thread's block of it, so
  // that the summation order does not depend on the thread split.
  static constexpr int64_t kDotRows = 6, kDotRowsNarrow = 16, kDotNarrowCols = 16;
  static bool use_dot(const Gemm<T>& g) {
    const bool few_rows = g.rows <= kDotRows || (g.cols <= kDotNarrowCols && g.rows <= kDotRowsNarrow);
    return few_rows && g.b_rs == 1 && g.a_cs == 1 && g.update.kind == UpdateKind::kNone && g.mask_in == nullptr;
  }

  // ---- a short sum against a B with contiguous rows: rank-KI updates, row by row ---------------
  // dW at a batch of a few rows (inner = batch): a micro-tile's set-up and epilogue would cost far
  // more than its KI multiply-adds per element, so each row of C is made in one streaming pass,
  // its KI factors broadcast once. Summed in the same order as the tile (zero, then p ascending).
  static constexpr int64_t kOuterInner = 4;
  static bool use_outer(const Gemm<T>& g) {
    return g.inner <= kOuterInner && g.b_cs == 1 && g.update.kind == UpdateKind::kNone && g.mask_in == nullptr;
  }

  template <int KI>
  static void outer_rows(const Gemm<T>& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    for (int64_t i = r0; i < r1; ++i) {
      reg a[KI > 0 ? KI : 1];
      for (int p = 0; p < KI; ++p) a[p] = V::bcast(g.a[i * g.a_rs + p * g.a_cs]);
      T* c = g.c + i * g.ldc;
      for (int64_t j = c0; j < c1; j += L) {
        const int n = int(imin(L, c1 - j));
        reg v = V::zero();
        for (int p = 0; p < KI; ++p) v = V::fma(a[p], load_upto(g.b + p * g.b_rs + j, n), v);
        store_upto(c + j, v, n);
      }
      if (g.bias || g.relu || g.round_bf16) finish_row(g, i, c0, c1);
    }
  }

  static void outer_block(const Gemm<T>& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    switch (g.inner) {
      case 0: return outer_rows<0>(g, r0, r1, c0, c1);
      case 1: return outer_rows<1>(g, r0, r1, c0, c1);
      case 2: return outer_rows<2>(g, r0, r1, c0, c1);
      case 3: return outer_rows<3>(g, r0, r1, c0, c1);
      default: return outer_rows<4>(g, r0, r1, c0, c1);
    }
  }

  static void gemm_block(const Gemm<T>& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    if (r1 <= r0 || c1 <= c0) return;
    if (use_dot(g)) return dot_block(g, r0, r1, c0, c1);
    if (use_outer(g)) return outer_block(g, r0, r1, c0, c1);
    // Contiguous B rows are read in place: at these sizes a copy costs more than it saves.
    const bool pack_b = g.b_cs != 1;
    const bool pack_a_block = g.a_rs == 1 && g.a_cs != 1;
    const int64_t inner = g.inner;  // inner == 0 still needs one pass: C = epilogue(0)
    // Equal K blocks (784 = 7 x 112, not 6 x 128 + 16): a short last block would cost a whole
    // pass over C for little work. Rounded to whole vectors so packing transposes full blocks.
    // Each element of C is summed in the same order whatever the block (a later block resumes from
    // the partial sum the earlier one stored), so the block changes speed only, never a bit.
    const int64_t KB = g.k_block > 0 ? g.k_block : KC;
    const int64_t nblocks = inner > 0 ? (inner + KB - 1) / KB : 1;
    const int64_t kstep = imin(KB, ((inner + nblocks - 1) / nblocks + L - 1) / L * L) + (inner == 0);
    // An update summed in one K block with B read in place goes strip by strip: rows outer,
    // MR rows of the gradient finished across all columns into a small scratch strip and applied
    // at once (update_rows). Otherwise the gradient is parked in C and applied per row block.
    const bool updates = g.update.kind != UpdateKind::kNone;
    const bool strips = updates && nblocks == 1 && !pack_b;
    const int64_t strip_ld = (c1 - c0 + L - 1) / L * L;
    constexpr int64_t kMcTiles = (MC + MR - 1) / MR;
    T* panel = static_cast<T*>(
        scratch(int64_t(sizeof(T)) * (KB * NRW + kMcTiles * MR * KB + kPackSlack + (strips ? MR * strip_ld : 0))));
    T* a_block = panel + KB * NRW;
    T* strip = a_block + kMcTiles * MR * KB + kPackSlack;
    Tile t;
    t.ldb = pack_b ? NRW : g.b_rs;
    t.a_rs = pack_a_block ? 1 : g.a_rs;
    t.a_cs = pack_a_block ? MR : g.a_cs;
    t.ldc = strips ? strip_ld : g.ldc;
    t.relu = g.relu;
    t.round = g.round_bf16;
    t.ldm = g.ldm;
    t.ldm_in = g.ldm_in;
    // A packed A block (dz.T in dW) of a short sum (small batch: inner = batch, one K block) is kept
    // to 16 KiB, so it stays in L1 beside the B panel during the column sweep instead of evicting it.
    // A longer sum keeps MC rows (L2 blocking): B is streamed once per row block, and x at a large
    // batch comes from memory (under the 16 KiB cap it was re-read once per ~30 rows of C). Equal
    // blocks under either bound, not 60 + 60 + 8 rows.
    int64_t mc = MC;
    if (pack_a_block) {
      const int64_t cap = nblocks == 1 ? imin(MC, imax(MR, 16384 / (kstep * int64_t(sizeof(T))) / MR * MR)) : MC;
      const int64_t nb = (r1 - r0 + cap - 1) / cap;
      mc = ((r1 - r0 + nb - 1) / nb + MR - 1) / MR * MR;
    }
    int64_t pc = 0, kc = 0, m0 = 0, m1 = 0;
    // One MR x NRW tile of C with its top-left corner at (i0, j0), stored at c.
    auto run_tile = [&](int64_t i0, int64_t j0, T* c) {
      const int ncols = int(imin(NRW, c1 - j0));
      t.bp = pack_b ? panel : g.b + pc * g.b_rs + j0;
      t.ncols = ncols;
      t.j0 = j0;
      t.bias = g.bias ? g.bias + j0 : nullptr;
      t.a = pack_a_block ? a_block + (i0 - m0) * kc : g.a + i0 * g.a_rs + pc * g.a_cs;
      t.c = c;
      t.mask = g.mask ? g.mask + i0 * g.ldm + j0 / 8 : nullptr;
      t.mask_in = g.mask_in ? g.mask_in + i0 * g.ldm_in : nullptr;
      if (pack_a_block) tile_rq<true>(int(imin(MR, m1 - i0)), (ncols + L - 1) / L, !pack_b && ncols % L != 0, t);
      else tile_rq<false>(int(imin(MR, m1 - i0)), (ncols + L - 1) / L, !pack_b && ncols % L != 0, t);
    };
    for (m0 = r0; m0 < r1; m0 += mc) {
      m1 = imin(r1, m0 + mc);
      for (pc = 0; pc < inner || (pc == 0 && inner == 0); pc += kstep) {
        kc = imin(kstep, inner - pc);
        if (pack_a_block) pack_a(g, m0, m1, pc, kc, a_block);
        t.kc = kc;
        t.accumulate = pc > 0;
        t.final = pc + kstep >= inner;
        if (strips) {
          for (int64_t i0 = m0; i0 < m1; i0 += MR) {
            for (int64_t j0 = c0; j0 < c1; j0 += NRW) run_tile(i0, j0, strip + (j0 - c0));
            update_rows(g, i0, imin(MR, m1 - i0), c0, c1, strip, strip_ld);
          }
          continue;
        }
        for (int64_t j0 = c0; j0 < c1; j0 += NRW) {
          if (pack_b) pack_panel(g, pc, kc, j0, int(imin(NRW, c1 - j0)), panel);
          for (int64_t i0 = m0; i0 < m1; i0 += MR) run_tile(i0, j0, g.c + i0 * g.ldc + j0);
        }
        if (updates && t.final) update_rows(g, m0, m1 - m0, c0, c1, g.c + m0 * g.ldc + c0, g.ldc);
      }
    }
  }

  // Column blocks of up to 8 vectors, rows inner: contiguous reads, sums in registers, each column
  // summed top to bottom whatever the block or thread split.
  static void drelu_bias_grad(int64_t rows, int64_t c0, int64_t c1, const T* gy, int64_t ldg,
                              const uint8_t* mask, int64_t ldm, T* dz, T* gb) {
    constexpr int kVecs = 8;
    for (int64_t jb = c0; jb < c1; jb += kVecs * L) {
      const int nv = int((imin(c1 - jb, kVecs * L) + L - 1) / L);
      reg sum[kVecs];
      for (int q = 0; q < kVecs; ++q) sum[q] = V::zero();
      for (int64_t i = 0; i < rows; ++i) {
        for (int q = 0; q < nv; ++q) {
          const int64_t j = jb + q * L;
          const int n = int(imin(L, c1 - j));
          reg v = load_upto(gy + i * ldg + j, n);
          if (mask) v = V::keep_bits(read_bits(mask + i * ldm, j, n), v);
          if (dz) store_upto(dz + i * ldg + j, v, n);
          sum[q] = V::add(sum[q], v);
        }
      }
      if (gb)
        for (int q = 0; q < nv; ++q) V::store_n(gb + jb + q * L, sum[q], int(imin(L, c1 - jb - q * L)));
    }
  }

  static void round_copy(const T* src, T* dst, int64_t n) {
    int64_t j = 0;
    for (; j + L <= n; j += L) V::store(dst + j, round_bf16(V::load(src + j)));
    if (j < n) V::store_n(dst + j, round_bf16(V::load_n(src + j, int(n - j))), int(n - j));
  }

  // k_block: the K block for run_gemm to name, or 0 for KC (this CPU's: avx512_float_k_block).
  static KernelTable<T> table(int64_t k_block = 0) {
    KernelTable<T> k;
    k.gemm_block = &gemm_block;
    k.drelu_bias_grad = &drelu_bias_grad;
    k.finish_rows = &finish_rows;
    k.apply_update = &apply_update;
    k.round_bf16 = kRounds ? &round_copy : nullptr;
    k.panel_cols = NRW;
    k.rows_per_tile = MR;
    k.inner_block = k_block > 0 ? k_block : KC;
    k.col_align = NRW;
    return k;
  }
};

}  // namespace fastmlp::cpu::FASTMLP_ISA_NS
