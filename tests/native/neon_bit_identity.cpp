// Bit identity of the hand-written NEON code (aarch64) with the portable scalar code, on raw buffers:
// no torch, no Python, so it can be cross-compiled statically and run under qemu-aarch64 on any
// machine (scripts/check_aarch64_build.sh; tests/test_aarch64_neon.py). Every comparison is exact:
// the RNG contract (DESIGN section 3 of the design notes: docs/design.md) requires the same 32-bit
// words for the same counters and keys on every path.
//
// Exit status 0 when everything matched, 1 otherwise (the first mismatches are printed).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "mc_kernel.h"
#include "philox_neon.h"
#include "unlearn/philox.h"
#include "unlearn/select.h"

namespace {

using namespace unlearn;
using namespace unlearn::cpu;

int64_t g_checked = 0, g_failed = 0;
int64_t g_mc_codes[3] = {0, 0, 0};  // scalar codes -1, 0, +1 seen by check_mc_span
int64_t g_mc_certified = 0;          // of them, elements with a positive radius

void expect_equal(uint32_t got, uint32_t want, const char* what, uint64_t a, uint64_t b, uint64_t c) {
  ++g_checked;
  if (got == want) return;
  if (++g_failed <= 10)
    std::printf("MISMATCH %s (%llu, %llu, %llu): neon %08x, expected %08x\n", what, (unsigned long long)a,
                (unsigned long long)b, (unsigned long long)c, got, want);
}

// splitmix64: a deterministic source of test counters and keys.
uint64_t next_random(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// 64-bit values where carries and wraps happen, plus random ones.
std::vector<uint64_t> edge_values(uint64_t& state, int randoms) {
  std::vector<uint64_t> v = {0,           1,           2,           3,
                             0xfffffffbull, 0xfffffffcull, 0xfffffffdull, 0xffffffffull,
                             0x100000000ull, 0x1fffffffdull, 0x7fffffffffffffffull, 0x8000000000000000ull,
                             ~0ull - 17,  ~0ull - 3,   ~0ull - 1,   ~0ull};
  for (int i = 0; i < randoms; ++i) v.push_back(next_random(state));
  return v;
}

// The published known-answer vectors of Philox4x32-10 (Random123), through the NEON block.
void check_known_answers() {
  struct Vector {
    uint32_t c[4], k[2], out[4];
  };
  const Vector vectors[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Vector& v : vectors) {
    uint32x4_t c[4], out[4];
    for (int q = 0; q < 4; ++q) c[q] = vdupq_n_u32(v.c[q]);
    philox4x32_10_neon(c, v.k[0], v.k[1], out);
    for (int q = 0; q < 4; ++q) {
      uint32_t lanes[4];
      vst1q_u32(lanes, out[q]);
      for (int l = 0; l < 4; ++l) expect_equal(lanes[l], v.out[q], "known-answer vector", v.c[0], v.k[0], q);
    }
  }
}

// Whole blocks: 4 lanes with 4 different counters per call, every word against philox4x32_10.
void check_blocks(uint64_t& state) {
  const std::vector<uint64_t> values = edge_values(state, 48);
  const size_t n = values.size();
  for (size_t a = 0; a < n; ++a) {
    for (size_t b = 0; b < n; b += 3) {
      const uint64_t key = values[(a * 7 + b) % n];
      uint32_t c[4][4];
      for (int l = 0; l < 4; ++l) {  // lane l: counter (values[a] + l, values[b] ^ l)
        const uint64_t offset = values[a] + static_cast<uint64_t>(l), element = values[b] ^ static_cast<uint64_t>(l);
        c[0][l] = static_cast<uint32_t>(offset);
        c[1][l] = static_cast<uint32_t>(offset >> 32);
        c[2][l] = static_cast<uint32_t>(element);
        c[3][l] = static_cast<uint32_t>(element >> 32);
      }
      uint32x4_t cv[4], out[4];
      for (int q = 0; q < 4; ++q) cv[q] = vld1q_u32(c[q]);
      philox4x32_10_neon(cv, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32), out);
      for (int l = 0; l < 4; ++l) {
        const PhiloxBlock want = philox4x32_10(c[0][l], c[1][l], c[2][l], c[3][l], static_cast<uint32_t>(key),
                                               static_cast<uint32_t>(key >> 32));
        for (int q = 0; q < 4; ++q) {
          uint32_t lanes[4];
          vst1q_u32(lanes, out[q]);
          expect_equal(lanes[l], want.w[q], "philox block word", values[a], values[b], key);
        }
      }
    }
  }
}

// Random-k's selection keys: random_keys_neon against random_key for every length up to 70 (whole
// steps of 16, of 4, and the rest left to the caller) and element ranges across 2^32 and 2^64.
void check_random_keys(uint64_t& state) {
  const std::vector<uint64_t> values = edge_values(state, 8);
  std::vector<uint32_t> out(80);
  for (uint64_t seed : values) {
    for (uint64_t offset : {uint64_t(0), uint64_t(0xffffffffull), ~uint64_t(0), next_random(state)}) {
      for (uint64_t element0 : values) {
        for (int64_t n = 0; n <= 70; n += (n < 20 ? 1 : 7)) {
          const uint32_t poison = 0xa5a5a5a5u;
          for (uint32_t& o : out) o = poison;
          const int64_t done = random_keys_neon(seed, offset, n, element0, out.data());
          expect_equal(static_cast<uint32_t>(done), static_cast<uint32_t>(n - n % 4), "random keys written", seed,
                       element0, n);
          for (int64_t j = 0; j < done; ++j)
            expect_equal(out[j], random_key(seed, offset, element0 + static_cast<uint64_t>(j)), "random key", seed,
                         element0 + static_cast<uint64_t>(j), offset);
          for (int64_t j = done; j < static_cast<int64_t>(out.size()); ++j)
            expect_equal(out[j], poison, "nothing written past the count", seed, element0, j);
        }
      }
    }
  }
}

uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// Class probabilities where the draw thresholds have their edge cases (0, 1, NaN for a non-finite
// input, the smallest levels, p_neg + p_pos near 1), then random ones.
std::vector<float> probabilities(uint64_t& state, int count) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> v = {0.0f, 1.0f, nan, 0.5f, 1e-9f, 0x1p-25f, 0x1p-24f, 0x1.8p-24f, 1.0f - 0x1p-24f, 0.999999f,
                          0.25f, 0.75f, 0.3f, 0.7f};
  while (static_cast<int>(v.size()) < count)
    v.push_back(static_cast<float>(next_random(state) >> 40) * 0x1p-24f);
  v.resize(static_cast<size_t>(count));
  return v;
}

// One span through both paths: codes and radii bit for bit, and the statistics.
void compare_mc_span(const std::vector<float>& p_neg, const std::vector<float>& p_pos, const McDrawParams& params,
                 uint64_t begin) {
  const int count = static_cast<int>(p_neg.size());
  const uint64_t seed = params.seed, offset = params.offset;
  std::vector<int8_t> codes_neon(count, 99), codes_scalar(count, 99);
  std::vector<float> radii_neon(count, -1.0f), radii_scalar(count, -1.0f);
  McSpanStats stats_neon, stats_scalar;
  stats_neon.min_radius_bits = stats_scalar.min_radius_bits = static_cast<int32_t>(bits_of(1.5f));
  mc_span_neon(p_neg.data(), p_pos.data(), count, begin, params, codes_neon.data(), radii_neon.data(), stats_neon);
  mc_span_scalar(p_neg.data(), p_pos.data(), count, begin, params, codes_scalar.data(), radii_scalar.data(),
                 stats_scalar);
  for (int i = 0; i < count; ++i) {
    ++g_mc_codes[codes_scalar[i] + 1];
    g_mc_certified += radii_scalar[i] > 0.0f;
    expect_equal(static_cast<uint32_t>(codes_neon[i]), static_cast<uint32_t>(codes_scalar[i]), "mc code", seed,
                 offset, begin + static_cast<uint64_t>(i));
    expect_equal(bits_of(radii_neon[i]), bits_of(radii_scalar[i]), "mc radius", seed, offset,
                 begin + static_cast<uint64_t>(i));
  }
  expect_equal(static_cast<uint32_t>(stats_neon.min_radius_bits), static_cast<uint32_t>(stats_scalar.min_radius_bits),
               "mc minimum radius", seed, offset, begin);
  expect_equal(static_cast<uint32_t>(stats_neon.abstained), static_cast<uint32_t>(stats_scalar.abstained),
               "mc abstained", seed, offset, begin);
  expect_equal(static_cast<uint32_t>(stats_neon.nonfinite), static_cast<uint32_t>(stats_scalar.nonfinite),
               "mc non-finite", seed, offset, begin);
  expect_equal(static_cast<uint32_t>(stats_neon.below), static_cast<uint32_t>(stats_scalar.below), "mc below",
               seed, offset, begin);
}

// A span's table of n + 1 increasing radii, so that every change of a count k_A changes the radius.
std::vector<float> increasing_table(int32_t n) {
  std::vector<float> table(static_cast<size_t>(n) + 1);
  for (int k = 0; k <= n; ++k) table[k] = -1.0f + 3.0f * static_cast<float>(k) / static_cast<float>(n > 0 ? n : 1) + 1e-3f;
  return table;
}

// The `mc` draw-count-certify span: mc_span_neon against mc_span_scalar (codes, radii bit for bit, and
// the statistics) for phase layouts that split blocks at n0 and end in partial blocks, counters that
// cross 2^32 and 2^64, ragged spans and non-finite inputs.
void check_mc_span(uint64_t& state) {
  struct Draws {
    int32_t n0, n;
  };
  const Draws layouts[] = {{16, 64}, {5, 7}, {3, 2}, {1, 1}, {9, 31}, {4, 4}, {12, 4}, {8, 5}, {2, 3}, {1, 2}, {0, 6}};
  const uint64_t offsets[] = {0, 7, 0xfffffffeull, 0xffffffffull - 9, ~0ull, ~0ull - 1, next_random(state)};
  const uint64_t seeds[] = {0, 5, 0x8000010000000009ull, ~0ull};
  const uint64_t begins[] = {0, 0xfffffffdull, ~0ull - 6, next_random(state)};
  for (const Draws& d : layouts) {
    const std::vector<float> table = increasing_table(d.n);
    for (uint64_t offset : offsets) {
      for (uint64_t seed : seeds) {
        for (uint64_t begin : begins) {
          const int count = 1 + static_cast<int>(next_random(state) % 41);
          std::vector<float> p_neg = probabilities(state, count), p_pos = probabilities(state, count);
          for (int i = 0; i < count; ++i)  // one NaN marks both probabilities of a non-finite input
            if (std::isnan(p_neg[i]) || std::isnan(p_pos[i])) p_neg[i] = p_pos[i] = p_neg[i] + p_pos[i];
          std::rotate(p_pos.begin(), p_pos.begin() + (count / 3), p_pos.end());
          for (int i = 0; i < count; ++i)
            if (std::isnan(p_neg[i]) != std::isnan(p_pos[i])) p_neg[i] = p_pos[i] = std::numeric_limits<float>::quiet_NaN();
          compare_mc_span(p_neg, p_pos, McDrawParams{seed, offset, d.n0, d.n, 0.25f, 0.1f, table.data()}, begin);
        }
      }
    }
  }
}

// Draws that sit exactly on a threshold: random draws almost never do (one in 2^24), so each element's
// thresholds are set from one of its own estimation draws' level k (word >> 8): -1 below k, +1 from
// k, or both with the -1 threshold above the +1 one. An off-by-one compare in the NEON counting
// changes an estimation count, hence k_A and the radius (the table increases strictly).
void check_mc_draws_on_thresholds(uint64_t& state) {
  const int32_t n0 = 5, n = 11;
  const std::vector<float> table = increasing_table(n);
  for (int round = 0; round < 200; ++round) {
    const uint64_t seed = next_random(state), offset = round % 2 ? ~0ull - 1 : next_random(state);
    const uint64_t begin = round % 3 ? next_random(state) : 0xfffffffcull;
    const int count = 1 + static_cast<int>(next_random(state) % 19);
    std::vector<float> p_neg(count), p_pos(count);
    for (int i = 0; i < count; ++i) {
      const int64_t draw = n0 + (7 * i + round) % n;
      const PhiloxBlock block = philox_block_for(seed, offset, static_cast<uint64_t>(draw / 4), begin + static_cast<uint64_t>(i));
      const uint32_t k = uniform_level(block.w[draw % 4]);
      const float at_k = static_cast<float>(k) * 0x1p-24f;                        // levels_below(at_k) = k
      const float from_k = static_cast<float>(kUniformLevels - k) * 0x1p-24f;    // pos_start = k
      switch ((i + round) % 3) {
        case 0: p_neg[i] = at_k; p_pos[i] = 0.0f; break;
        case 1: p_neg[i] = 0.0f; p_pos[i] = from_k; break;
        default: p_neg[i] = static_cast<float>(k + 1) * 0x1p-24f; p_pos[i] = from_k; break;
      }
    }
    compare_mc_span(p_neg, p_pos, McDrawParams{seed, offset, n0, n, 0.25f, 0.1f, table.data()}, begin);
  }
}

}  // namespace

int main() {
  uint64_t state = 20261207;
  check_known_answers();
  check_blocks(state);
  check_random_keys(state);
  check_mc_span(state);
  check_mc_draws_on_thresholds(state);
  std::printf("%lld comparisons, %lld mismatches\n", (long long)g_checked, (long long)g_failed);
  std::printf("mc elements by code -1 / 0 / +1: %lld / %lld / %lld, certified: %lld\n", (long long)g_mc_codes[0],
              (long long)g_mc_codes[1], (long long)g_mc_codes[2], (long long)g_mc_certified);
  if (g_mc_codes[0] == 0 || g_mc_codes[2] == 0 || g_mc_certified == 0) {
    std::printf("FAILED: the mc cases never produced every class and a certified radius\n");
    return 1;
  }
  if (g_failed != 0) {
    std::printf("FAILED: the NEON code differs from the scalar code\n");
    return 1;
  }
  std::printf("ok: the NEON code matches the scalar code bit for bit\n");
  return 0;
}
