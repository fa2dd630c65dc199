// Bit identity of the hand-written NEON code (aarch64) with the portable scalar code, on raw buffers:
// no torch, no Python, so it can be cross-compiled statically and run under qemu-aarch64 on any
// machine (scripts/check_aarch64_build.sh; tests/test_aarch64_neon.py). Every comparison is exact:
// the RNG contract (DESIGN section 3 of the design notes: docs/design.md) requires the same 32-bit
// words for the same counters and keys on every path.
//
// Exit status 0 when everything matched, 1 otherwise (the first mismatches are printed).
#include <cstdint>
#include <cstdio>
#include <vector>

#include "philox_neon.h"
#include "unlearn/philox.h"
#include "unlearn/select.h"

namespace {

using namespace unlearn;
using namespace unlearn::cpu;

int64_t g_checked = 0, g_failed = 0;

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

}  // namespace

int main() {
  uint64_t state = 20261207;
  check_known_answers();
  check_blocks(state);
  check_random_keys(state);
  std::printf("%lld comparisons, %lld mismatches\n", (long long)g_checked, (long long)g_failed);
  if (g_failed != 0) {
    std::printf("FAILED: the NEON code differs from the scalar code\n");
    return 1;
  }
  std::printf("ok: the NEON code matches the scalar code bit for bit\n");
  return 0;
}
