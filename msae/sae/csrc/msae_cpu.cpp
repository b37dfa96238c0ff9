// CPU kernels of the sparse SAE steps (msae/sae/native.py builds and loads them).
//
// A Matryoshka step selects, per row of the pre-activations, the positive entries of the largest
// level and splits them into rank chunks (chunk c = ranks k_{c-1} .. k_c - 1, k_{-1} = 0), so that
// the nested top-k sets of every level are prefixes. Its sparse products work on the entry list
// (row, chunk, latent, value), entries stored row by row and chunk by chunk inside a row:
//   levels_decode:  Q[row, c] = sum over the row's entries of chunks <= c of value * W[latent]
//   level_grads:    G[row, c] = the gradient of chunk c's partial sum (from level c and above)
//   grad_val_weight: g[e] = G[row, chunk] . W[latent] and Wg[latent] += value * G[row, chunk]
//   grad_weight:    Wg[latent] += value * G[row, chunk] alone (the encoder's weight gradient, C = 1)
// The sparse products visit entries by segments: a block of latents whose rows of W (or Wg) stay in a core's
// cache, crossed with a range of rows owned by one thread; within a segment, in row order, so a row
// of Q or G is reused from L1. Results equal the dense formulas up to float rounding.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

void check_float(const torch::Tensor& t, const char* name, int dims) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == dims && t.is_contiguous(),
              name, ": expected a contiguous float32 CPU tensor with ", dims, " dimensions");
}

void check_long(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt64 && t.dim() == 1 && t.is_contiguous(),
              name, ": expected a contiguous int64 CPU vector");
}

void check_int(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt32 && t.dim() == 1 && t.is_contiguous(),
              name, ": expected a contiguous int32 CPU vector");
}

// The value bins of nested_select: a positive float's top bits (exponent and 4 mantissa bits).
constexpr int kBins = 4096;
// Consecutive entries of a segment sharing a destination row (decode) or a gradient row (grad_val_weight)
// are processed kGroup at a time, so that row is read and written once per group, not per entry.
constexpr int kGroup = 4;  // the grouped loops below are written out for 4
static_assert(kGroup == 4, "the grouped loops are written out for 4 entries");
inline int bin_of(uint64_t key) { return static_cast<int>((key >> 51) & (kBins - 1)); }

// row range [lo, hi) of thread t of T over B rows
inline int64_t range_start(int64_t B, int64_t T, int64_t t) { return (B * t) / T; }

}  // namespace

// Nested top-k selection of the positive entries. Returns {crow [B+1], rows [E] (int32), col [E],
// chunk [E] (int32), val [E], n_chunks, chunk_counts, chunk_sums}: row b's entries are col[crow[b]:crow[b+1]] (rows[e] = b,
// val[e] = pre[b, col[e]]), ordered by chunk; n_chunks (0-d) is one more than the largest chunk
// holding an entry; chunk_counts [L] the entries per chunk; chunk_sums [2, L] (float64) the sum and
// the sum of squares of the values per chunk.
std::vector<torch::Tensor> nested_select(torch::Tensor pre, torch::Tensor levels) {
  check_float(pre, "pre", 2);
  check_long(levels, "levels");
  const int64_t B = pre.size(0), n = pre.size(1), L = levels.size(0);
  const float* p = pre.data_ptr<float>();
  const int64_t* lv = levels.data_ptr<int64_t>();
  const int64_t kmax = lv[L - 1];
  auto crow = torch::zeros({B + 1}, torch::kInt64);
  int64_t* cr = crow.data_ptr<int64_t>();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; b++) {  // pass 1: entries per row (its positives, at most the largest level)
    const float* row = p + b * n;
    int64_t pos = 0;
    for (int64_t j = 0; j < n; j++) pos += row[j] > 0.f;
    cr[b + 1] = std::min(pos, kmax);
  }
  for (int64_t b = 0; b < B; b++) cr[b + 1] += cr[b];
  const int64_t E = cr[B];
  auto col = torch::empty({E}, torch::kInt64), rows = torch::empty({E}, torch::kInt32);
  auto chunk = torch::empty({E}, torch::kInt32);
  auto val = torch::empty({E}, torch::kFloat32);
  int64_t* co = col.data_ptr<int64_t>();
  int32_t *ro = rows.data_ptr<int32_t>(), *ch = chunk.data_ptr<int32_t>();
  float* va = val.data_ptr<float>();
  int64_t used = 0;
  auto chunk_sums = torch::zeros({2, L}, torch::kFloat64);
  double* cs = chunk_sums.data_ptr<double>();
#pragma omp parallel reduction(max : used)
  {
    std::vector<double> sums(2 * L, 0.0);  // this thread's per-chunk sum and sum of squares of values
    // a row's positives as 64-bit keys: the value's bits in the high half (a positive float's bits
    // order like the float), the complemented latent in the low half, so that the largest key is the
    // largest value and, among equal values, the lowest latent; plain integer compares
    std::vector<uint64_t> key(n), sorted(n);
    std::vector<int32_t> start(kBins + 1);
#pragma omp for schedule(dynamic, 16)
    for (int64_t b = 0; b < B; b++) {  // pass 2: the keys ordered by bin, each level's cut exact
      const float* row = p + b * n;
      int64_t cnt = 0;
      for (int64_t j = 0; j < n; j++) {  // branchless compaction of the positives
        uint32_t bits;
        std::memcpy(&bits, row + j, 4);
        key[cnt] = (static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(j));
        cnt += row[j] > 0.f;
      }
      const int64_t K = cr[b + 1] - cr[b];
      if (K == 0) continue;
      // counting sort by the top bits of the value, largest bin first: a bin's keys all exceed the
      // next bin's, so a level's top-k only needs an exact cut inside the bin where rank k falls
      std::fill(start.begin(), start.end(), 0);
      for (int64_t r = 0; r < cnt; r++) start[kBins - 1 - bin_of(key[r]) + 1]++;
      for (int i = 0; i < kBins; i++) start[i + 1] += start[i];
      for (int64_t r = 0; r < cnt; r++) sorted[start[kBins - 1 - bin_of(key[r])]++] = key[r];
      // start[i] is now the end of bin i (descending order of bins); cut at every level below K
      // (largest cut first; a smaller cut in the same bin works inside the larger one's prefix)
      auto larger = [](uint64_t a, uint64_t c) { return a > c; };
      int64_t end = cnt;
      for (int64_t i = L; i >= 0; i--) {  // i = L: the row's own cut at K
        const int64_t k = i == L ? K : lv[i];
        if (k >= end) continue;
        const int64_t pos = std::upper_bound(start.begin(), start.begin() + kBins, static_cast<int32_t>(k)) - start.begin();
        const int64_t lo = pos == 0 ? 0 : start[pos - 1], hi = std::min<int64_t>(start[pos], end);
        if (lo < k) std::nth_element(sorted.begin() + lo, sorted.begin() + k, sorted.begin() + hi, larger);
        end = k;
      }
      int64_t c = 0, out = cr[b];
      for (int64_t r = 0; r < K; r++) {
        while (c < L - 1 && r >= lv[c]) c++;
        const uint64_t k = sorted[r];
        const uint32_t bits = static_cast<uint32_t>(k >> 32);
        const int64_t j = static_cast<int64_t>(~static_cast<uint32_t>(k));
        co[out + r] = j;
        std::memcpy(va + out + r, &bits, 4);
        ro[out + r] = static_cast<int32_t>(b);
        ch[out + r] = static_cast<int32_t>(c);
        const double value = va[out + r];
        sums[c] += value;
        sums[L + c] += value * value;
      }
      used = std::max(used, c + 1);
    }
#pragma omp critical
    for (int64_t i = 0; i < 2 * L; i++) cs[i] += sums[i];
  }
  auto chunk_counts = torch::zeros({L}, torch::kInt64);
  int64_t* cc = chunk_counts.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) {  // entries per chunk: a row's chunk c holds min(K, k_c) - min(K, k_{c-1})
    const int64_t K = cr[b + 1] - cr[b];
    int64_t prev = 0;
    for (int64_t c = 0; c < L; c++) {
      const int64_t upto = std::min(K, lv[c]);
      cc[c] += upto - prev;
      prev = upto;
    }
  }
  return {crow, rows, col, chunk, val, torch::full({}, used, torch::kInt64), chunk_counts, chunk_sums};
}

// Segments of the entries: key = block * T + t, where block = col >> shift (blocks of 2^shift
// latents: a shift, not a division, in the loops below) and t is the thread that owns
// the entry's row (rows split into T equal ranges). Returns {order [E], offsets [nb*T + 1], counts [n]}:
// the entries of segment s are order[offsets[s]:offsets[s+1]], in entry order; counts[j] is how many
// entries select latent j (the firing counts). The kernels below take the same T.
std::vector<torch::Tensor> segments(torch::Tensor crow, torch::Tensor col, int64_t n, int64_t shift, int64_t T) {
  check_long(crow, "crow");
  check_long(col, "col");
  TORCH_CHECK(T >= 1 && shift >= 0 && shift < 32, "segments: T must be positive and shift in 0..31");
  const int64_t B = crow.size(0) - 1, nb = ((n - 1) >> shift) + 1;
  const int64_t* cr = crow.data_ptr<int64_t>();
  const int64_t* c = col.data_ptr<int64_t>();
  std::vector<int64_t> count(nb * T, 0);
  std::vector<std::vector<int64_t>> fired(T, std::vector<int64_t>(n, 0));
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; t++) {
    int64_t* f = fired[t].data();
    for (int64_t e = cr[range_start(B, T, t)]; e < cr[range_start(B, T, t + 1)]; e++) {
      count[(c[e] >> shift) * T + t]++;
      f[c[e]]++;
    }
  }
  auto counts = torch::zeros({n}, torch::kInt64);
  int64_t* fc = counts.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; t++)
    for (int64_t j = 0; j < n; j++) fc[j] += fired[t][j];
  auto off = torch::zeros({nb * T + 1}, torch::kInt64);
  int64_t* o = off.data_ptr<int64_t>();
  for (int64_t s = 0; s < nb * T; s++) o[s + 1] = o[s] + count[s];
  auto order = torch::empty({col.size(0)}, torch::kInt64);
  int64_t* od = order.data_ptr<int64_t>();
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; t++) {
    std::vector<int64_t> next(nb);
    for (int64_t i = 0; i < nb; i++) next[i] = o[i * T + t];
    for (int64_t e = cr[range_start(B, T, t)]; e < cr[range_start(B, T, t + 1)]; e++) od[next[c[e] >> shift]++] = e;
  }
  return {order, off, counts};
}

// Q [B, C, d]: Q[b, c] = bias + sum of val[e] * W[col[e]] over row b's entries of chunks <= c,
// plus extra[b, c] when given (non-empty); with x [B, d] given, also E [B, C]: |Q[b, c] - x[b]|^2.
// Thread t writes only its own rows, block after block. Returns {Q, E (empty without x)}.
std::vector<torch::Tensor> levels_decode(torch::Tensor crow, torch::Tensor col, torch::Tensor chunk,
                                         torch::Tensor val, torch::Tensor W, torch::Tensor bias, int64_t C,
                                         torch::Tensor order, torch::Tensor off, int64_t T, torch::Tensor x,
                                         torch::Tensor extra) {
  check_float(val, "val", 1);
  check_float(W, "W", 2);
  check_float(bias, "bias", 1);
  const int64_t B = crow.size(0) - 1, d = W.size(1);
  const int64_t nseg = off.size(0) - 1, nb = nseg / T;
  TORCH_CHECK(nb * T == nseg, "levels_decode: segments were made for another thread count");
  if (x.numel()) check_float(x, "x", 2);
  if (extra.numel()) check_float(extra, "extra", 3);
  auto out = torch::empty({B, C, d}, W.options());  // each thread zeroes its own rows (first touch)
  auto sq = torch::empty({x.numel() ? B : 0, C}, W.options());
  const float* xs = x.numel() ? x.data_ptr<float>() : nullptr;
  const float* ex = extra.numel() ? extra.data_ptr<float>() : nullptr;
  float* se = sq.data_ptr<float>();
  const int64_t *co = col.data_ptr<int64_t>(), *od = order.data_ptr<int64_t>(), *o = off.data_ptr<int64_t>();
  const int32_t* ch = chunk.numel() ? chunk.data_ptr<int32_t>() : nullptr;
  const int64_t* cr = crow.data_ptr<int64_t>();
  const float *v = val.data_ptr<float>(), *w = W.data_ptr<float>();
  float* q = out.data_ptr<float>();
#pragma omp parallel for schedule(static, 1)
  for (int64_t t = 0; t < T; t++) {
    const int64_t lo = range_start(B, T, t), hi = range_start(B, T, t + 1);
    std::fill(q + lo * C * d, q + hi * C * d, 0.f);
    for (int64_t i = 0; i < nb; i++) {
      const int64_t s = i * T + t, end = o[s + 1];
      int64_t b = lo;
      for (int64_t k = o[s]; k < end;) {
        const int64_t e = od[k];
        while (e >= cr[b + 1]) b++;  // entries of a segment come in row order
        const int32_t c = ch ? ch[e] : 0;
        float* dst = q + (b * C + c) * d;
        int64_t g[kGroup];  // up to kGroup entries with this destination, read and written once
        int m = 0;
        for (; m < kGroup && k < end && od[k] < cr[b + 1] && (!ch || ch[od[k]] == c); m++, k++) g[m] = od[k];
        if (m == kGroup) {
          const float *s0 = w + co[g[0]] * d, *s1 = w + co[g[1]] * d, *s2 = w + co[g[2]] * d, *s3 = w + co[g[3]] * d;
          const float x0 = v[g[0]], x1 = v[g[1]], x2 = v[g[2]], x3 = v[g[3]];
#pragma omp simd
          for (int64_t j = 0; j < d; j++) dst[j] += x0 * s0[j] + x1 * s1[j] + x2 * s2[j] + x3 * s3[j];
          continue;
        }
        for (int u = 0; u < m; u++) {
          const float* src = w + co[g[u]] * d;
          const float x = v[g[u]];
#pragma omp simd
          for (int64_t j = 0; j < d; j++) dst[j] += x * src[j];
        }
      }
    }
    const float* bi = bias.data_ptr<float>();
    for (int64_t r = lo; r < hi; r++) {  // partial sums per chunk -> bias + cumulative sums over chunks
      float* first = q + r * C * d;
#pragma omp simd
      for (int64_t j = 0; j < d; j++) first[j] += bi[j];
      for (int64_t c = 1; c < C; c++) {
        float* cur = q + (r * C + c) * d;
        const float* prev = cur - d;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) cur[j] += prev[j];
      }
      for (int64_t c = 0; c < C; c++) {  // then the extra terms, and the squared errors against x
        float* cur = q + (r * C + c) * d;
        if (ex) {
          const float* add = ex + (r * C + c) * d;
#pragma omp simd
          for (int64_t j = 0; j < d; j++) cur[j] += add[j];
        }
        if (xs) {
          const float* target = xs + r * d;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < d; j++) acc += (cur[j] - target[j]) * (cur[j] - target[j]);
          se[r * C + c] = acc;
        }
      }
    }
  }
  return {out, sq};
}

// The gradient of each chunk's partial sum when the loss depends on Q through the squared errors
// E[b, c] = |Q[b, c] - x[b]|^2 with dL/dE = g [B, C]: chunk c feeds every level c' >= c, so
// S[b, c] = sum over c' >= c of 2 g[b, c'] (Q[b, c'] - x[b]).
torch::Tensor level_grads(torch::Tensor Q, torch::Tensor x, torch::Tensor g) {
  check_float(Q, "Q", 3);
  check_float(x, "x", 2);
  check_float(g, "g", 2);
  const int64_t B = Q.size(0), C = Q.size(1), d = Q.size(2);
  auto S = torch::empty_like(Q);
  const float *q = Q.data_ptr<float>(), *xs = x.data_ptr<float>(), *gs = g.data_ptr<float>();
  float* s = S.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; b++) {
    const float* target = xs + b * d;
    for (int64_t c = C - 1; c >= 0; c--) {
      const float two_g = 2.f * gs[b * C + c];
      const float* cur = q + (b * C + c) * d;
      float* dst = s + (b * C + c) * d;
      if (c == C - 1) {
#pragma omp simd
        for (int64_t j = 0; j < d; j++) dst[j] = two_g * (cur[j] - target[j]);
      } else {
        const float* above = dst + d;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) dst[j] = above[j] + two_g * (cur[j] - target[j]);
      }
    }
  }
  return S;
}

// The decode's two gradients in one pass over the entries (each S row read once per group):
// g[e] = S[row(e), chunk(e)] . W[col[e]] and Wg[col[e]] += val[e] * S[row(e), chunk(e)] (S: [B*C, d]).
// Returns {g [E], Wg [n, d]}; one thread per latent block at a time, so Wg rows have one writer.
std::vector<torch::Tensor> grad_val_weight(torch::Tensor rows, torch::Tensor col, torch::Tensor chunk,
                                           torch::Tensor val, torch::Tensor S, torch::Tensor W, int64_t C,
                                           torch::Tensor order, torch::Tensor off, int64_t T) {
  check_float(S, "S", 2);
  check_float(W, "W", 2);
  check_float(val, "val", 1);
  const int64_t n = W.size(0), d = W.size(1), nb = (off.size(0) - 1) / T;
  auto out = torch::empty({col.size(0)}, W.options());
  auto grad_w = torch::zeros({n, d}, W.options());
  const int32_t* r = rows.data_ptr<int32_t>();
  const int64_t* co = col.data_ptr<int64_t>();
  const int32_t* ch = chunk.numel() ? chunk.data_ptr<int32_t>() : nullptr;
  const int64_t *od = order.data_ptr<int64_t>(), *o = off.data_ptr<int64_t>();
  const float *s = S.data_ptr<float>(), *w = W.data_ptr<float>(), *v = val.data_ptr<float>();
  float *res = out.data_ptr<float>(), *wg = grad_w.data_ptr<float>();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < nb; i++) {
    const int64_t end = o[(i + 1) * T];
    for (int64_t k = o[i * T]; k < end;) {  // the block's segments of all row ranges
      const int64_t e = od[k];
      const int32_t row = r[e], c = ch ? ch[e] : 0;
      const float* a = s + (row * C + c) * d;
      int64_t g[kGroup];  // up to kGroup entries sharing this row of S
      int m = 0;
      for (; m < kGroup && k < end && r[od[k]] == row && (!ch || ch[od[k]] == c); m++, k++) g[m] = od[k];
      if (m == kGroup) {
        const float *w0 = w + co[g[0]] * d, *w1 = w + co[g[1]] * d, *w2 = w + co[g[2]] * d, *w3 = w + co[g[3]] * d;
        float *d0 = wg + co[g[0]] * d, *d1 = wg + co[g[1]] * d, *d2 = wg + co[g[2]] * d, *d3 = wg + co[g[3]] * d;
        const float v0 = v[g[0]], v1 = v[g[1]], v2 = v[g[2]], v3 = v[g[3]];
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t j = 0; j < d; j++) {
          const float aj = a[j];
          a0 += aj * w0[j];
          a1 += aj * w1[j];
          a2 += aj * w2[j];
          a3 += aj * w3[j];
          d0[j] += v0 * aj;
          d1[j] += v1 * aj;
          d2[j] += v2 * aj;
          d3[j] += v3 * aj;
        }
        res[g[0]] = a0, res[g[1]] = a1, res[g[2]] = a2, res[g[3]] = a3;
        continue;
      }
      for (int u = 0; u < m; u++) {
        const float* wr = w + co[g[u]] * d;
        float* dr = wg + co[g[u]] * d;
        const float vu = v[g[u]];
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < d; j++) {
          acc += a[j] * wr[j];
          dr[j] += vu * a[j];
        }
        res[g[u]] = acc;
      }
    }
  }
  return {out, grad_w};
}

// Wg [n, d]: Wg[col[e]] += val[e] * S[row(e), chunk(e)]; one thread per latent block at a time.
torch::Tensor grad_weight(torch::Tensor rows, torch::Tensor col, torch::Tensor chunk, torch::Tensor val,
                          torch::Tensor S, int64_t n, int64_t C, torch::Tensor order, torch::Tensor off, int64_t T) {
  check_float(S, "S", 2);
  check_float(val, "val", 1);
  const int64_t d = S.size(1), nb = (off.size(0) - 1) / T;
  auto out = torch::zeros({n, d}, S.options());
  const int32_t* r = rows.data_ptr<int32_t>();
  const int64_t* co = col.data_ptr<int64_t>();
  const int32_t* ch = chunk.numel() ? chunk.data_ptr<int32_t>() : nullptr;
  const int64_t *od = order.data_ptr<int64_t>(), *o = off.data_ptr<int64_t>();
  const float *v = val.data_ptr<float>(), *s = S.data_ptr<float>();
  float* wg = out.data_ptr<float>();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < nb; i++) {
    for (int64_t k = o[i * T]; k < o[(i + 1) * T]; k++) {
      const int64_t e = od[k];
      float* dst = wg + co[e] * d;
      const float* src = s + (r[e] * C + (ch ? ch[e] : 0)) * d;
      const float x = v[e];
#pragma omp simd
      for (int64_t j = 0; j < d; j++) dst[j] += x * src[j];
    }
  }
  return out;
}

// The code as a dense matrix [B, n] (zeros elsewhere), written row by row in parallel, and its
// column sums [n]: the encoder's dense backward of a dense enough code.
std::vector<torch::Tensor> dense_rows(torch::Tensor crow, torch::Tensor col, torch::Tensor val, int64_t n, int64_t T) {
  check_long(crow, "crow");
  check_long(col, "col");
  check_float(val, "val", 1);
  const int64_t B = crow.size(0) - 1;
  auto out = torch::empty({B, n}, val.options());
  std::vector<std::vector<float>> sums(T, std::vector<float>(n, 0.f));
  const int64_t *cr = crow.data_ptr<int64_t>(), *co = col.data_ptr<int64_t>();
  const float* v = val.data_ptr<float>();
  float* o = out.data_ptr<float>();
#pragma omp parallel for schedule(static, 1)
  for (int64_t t = 0; t < T; t++) {
    float* s = sums[t].data();
    for (int64_t b = range_start(B, T, t); b < range_start(B, T, t + 1); b++) {
      float* row = o + b * n;
      std::fill(row, row + n, 0.f);
      for (int64_t e = cr[b]; e < cr[b + 1]; e++) {
        row[co[e]] = v[e];
        s[co[e]] += v[e];
      }
    }
  }
  auto colsum = torch::zeros({n}, val.options());
  float* cs = colsum.data_ptr<float>();
  for (int64_t t = 0; t < T; t++)
    for (int64_t j = 0; j < n; j++) cs[j] += sums[t][j];
  return {out, colsum};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dense_rows", &dense_rows, "a code as a dense matrix, and its column sums");
  m.def("nested_select", &nested_select, "nested top-k selection of the positive entries, by chunk");
  m.def("segments", &segments, "entries grouped by (latent block, row range)");
  m.def("levels_decode", &levels_decode, "cumulative partial decodes per (row, chunk), their squared errors");
  m.def("level_grads", &level_grads, "the gradient of each chunk's partial sum from the squared errors");
  m.def("grad_val_weight", &grad_val_weight, "the decode's value and weight gradients, in one pass");
  m.def("grad_weight", &grad_weight, "gradient of the weight rows the entries select");
}
