// Host checks of csrc/cuda/piece_tables.h (the CUDA ops' piece tables and
// their cache), which need no GPU: built and run by tests/test_piece_tables.py.
// Prints one line per failed check and exits non-zero if any failed.
#include <algorithm>
#include <cstdio>
#include <limits>
#include <random>
#include <string>

#include "cuda/piece_tables.h"

using sap_kernels::kGlobal;
using sap_kernels::kLayer;
using sap_kernels::kNeuron;
using sap_kernels::Segment;
using sap_kernels::Shard;
using namespace sap_kernels::cuda;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (ok) return;
  ++failures;
  if (failures <= 20) std::printf("FAIL: %s\n", what.c_str());
}

// A layout as make_shard_table (csrc/shards.h) builds it: rows x row_length
// tensors, some empty (no rows, or rows of length 0: numel 0, row_length 1).
struct Layout {
  std::vector<Shard> shards;
  int64_t num_units = 0;
};

Layout random_layout(std::mt19937_64& rng, int64_t scope) {
  Layout layout;
  const int tensors = 1 + int(rng() % 6);
  int64_t unit = 0;
  for (int i = 0; i < tensors; ++i) {
    Shard shard{};
    const int64_t rows = int64_t(rng() % 5);
    const int64_t row_length = rng() % 7 == 0 ? 0 : 1 + int64_t(rng() % 9);
    shard.data = reinterpret_cast<const void*>(uintptr_t(0x1000 * (i + 1)));
    shard.numel = rows * row_length;
    shard.row_length = rows > 0 && row_length > 0 ? row_length : 1;
    shard.first_unit = scope == kGlobal ? 0 : unit;
    unit += scope == kLayer ? 1 : (scope == kNeuron ? rows : 0);
    layout.shards.push_back(shard);
  }
  layout.num_units = scope == kGlobal ? 1 : unit;
  return layout;
}

// The definition, written the slow way: pieces in order, then each unit's
// first piece found by scanning for the first piece of a unit >= u.
HostPieces reference_pieces(const Layout& layout, int64_t scope, int64_t max_piece) {
  HostPieces out;
  std::vector<int64_t> unit_of_piece;
  for (size_t s = 0; s < layout.shards.size(); ++s) {
    const Shard& shard = layout.shards[s];
    const int64_t length = scope == kNeuron ? shard.row_length : shard.numel;
    for (int64_t begin = 0; begin < shard.numel; begin += length) {
      for (int64_t offset = 0; offset < length; offset += max_piece) {
        const int64_t piece = length - offset < max_piece ? length - offset : max_piece;
        out.segments.push_back(Segment{begin + offset, piece, int32_t(s)});
        unit_of_piece.push_back(shard.first_unit + (scope == kNeuron ? begin / length : 0));
      }
    }
  }
  for (int64_t u = 0; u <= layout.num_units; ++u) {
    int64_t first = int64_t(unit_of_piece.size());
    for (size_t i = 0; i < unit_of_piece.size(); ++i) {
      if (unit_of_piece[i] >= u) {
        first = int64_t(i);
        break;
      }
    }
    out.unit_starts.push_back(first);
  }
  for (int64_t unit : unit_of_piece) out.unit_first_piece.push_back(out.unit_starts[unit]);
  return out;
}

bool same_segments(const std::vector<Segment>& a, const std::vector<Segment>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].begin != b[i].begin || a[i].length != b[i].length || a[i].shard != b[i].shard)
      return false;
  }
  return true;
}

void check_pieces() {
  std::mt19937_64 rng(20261124);
  const int64_t unlimited = std::numeric_limits<int64_t>::max();
  for (int trial = 0; trial < 3000; ++trial) {
    for (int64_t scope : {kGlobal, kLayer, kNeuron}) {
      const Layout layout = random_layout(rng, scope);
      const int64_t max_piece = rng() % 4 == 0 ? unlimited : 1 + int64_t(rng() % 7);
      const HostPieces got = make_pieces(layout.shards, layout.num_units, scope, max_piece);
      const HostPieces want = reference_pieces(layout, scope, max_piece);
      const std::string where = "trial " + std::to_string(trial) + " scope " +
                                std::to_string(scope) + " max_piece " + std::to_string(max_piece);
      expect(same_segments(got.segments, want.segments), where + ": segments");
      expect(got.unit_starts == want.unit_starts, where + ": unit_starts");
      expect(got.unit_first_piece == want.unit_first_piece, where + ": unit_first_piece");
      // Same pieces for any max_piece at or above the longest unit: one key.
      int64_t longest = 1;
      for (const Segment& piece : want.segments) longest = std::max(longest, piece.length);
      const auto key_of = [&](int64_t piece) {
        return table_key(layout.shards, layout.num_units, scope, piece, 0, 0);
      };
      if (max_piece == unlimited) {
        expect(key_of(unlimited) == key_of(longest) && key_of(longest + 3) == key_of(longest),
               where + ": one key for every max_piece >= the longest unit");
      } else if (max_piece < longest) {
        expect(key_of(max_piece) != key_of(longest), where + ": a shorter max_piece, another key");
      }
    }
  }
}

void check_keys() {
  std::mt19937_64 rng(7);
  const Layout layout = random_layout(rng, kNeuron);
  const auto key = [](const Layout& l, int64_t scope = kNeuron, int64_t max_piece = 3,
                      int64_t device = 0, int64_t stream = 0) {
    return table_key(l.shards, l.num_units, scope, max_piece, device, stream);
  };
  const auto base = key(layout);
  expect(key(layout) == base, "key: deterministic");
  expect(key(layout, kLayer) != base, "key: scope");
  expect(key(layout, kNeuron, 3, 1) != base, "key: device");
  expect(key(layout, kNeuron, 3, 0, 5) != base, "key: stream");
  for (size_t s = 0; s < layout.shards.size(); ++s) {
    const auto changed = [&](auto edit, const char* field) {
      Layout other = layout;
      edit(other.shards[s]);
      expect(key(other) != base, std::string("key: shard ") + std::to_string(s) + " " + field);
    };
    changed([](Shard& x) { x.data = reinterpret_cast<const void*>(0x99); }, "data");
    changed([](Shard& x) { x.mask = reinterpret_cast<const bool*>(0x77); }, "mask");
    changed([](Shard& x) { x.numel += 1; }, "numel");
    changed([](Shard& x) { x.row_length += 1; }, "row_length");
    changed([](Shard& x) { x.first_unit += 1; }, "first_unit");
    changed([](Shard& x) { x.type += 1; }, "type");
  }
  Layout fewer = layout;
  fewer.shards.pop_back();
  expect(key(fewer) != base, "key: one shard fewer");
}

struct Table {
  int id;
  size_t bytes;
};

void check_cache() {
  LruCache<Table> cache(100, 3);
  int builds = 0;
  const auto get = [&](int64_t k, size_t bytes = 10) {
    return cache.get(
        {k}, [&] { return Table{int(k) * 1000 + builds++, bytes}; },
        [](const Table& t) { return t.bytes; });
  };
  const auto first = get(1);
  expect(get(1)->id == first->id && builds == 1, "cache: a hit returns the built value");
  get(2);
  get(3);
  get(1);  // 1 becomes the most recent; 2 is now the least recent
  get(4);  // four entries > 3: drops 2
  auto stats = cache.stats();
  expect(stats.entries == 3 && stats.bytes == 30, "cache: at most max_entries kept");
  const int before = builds;
  get(1);
  get(3);
  get(4);
  expect(builds == before, "cache: the recently used kept");
  get(2);
  expect(builds == before + 1, "cache: the least recently used dropped");
  stats = cache.stats();
  expect(stats.hits == 5 && stats.misses == 5, "cache: hits and misses counted");

  const auto kept = get(9, 60);  // 60 + two recent 10s <= 100; the third 10 goes by count
  get(8, 50);                    // 50 + 60 > 100: 9 goes
  stats = cache.stats();
  expect(stats.bytes <= 100, "cache: bytes bounded, got " + std::to_string(stats.bytes));
  expect(kept->bytes == 60, "cache: a dropped value lives on while shared");
  const int after = builds;
  get(9, 60);
  expect(builds == after + 1, "cache: byte eviction dropped the least recent");

  get(5, 1000);  // larger than max_bytes: returned, not kept, nothing dropped for it
  const int big = builds;
  get(5, 1000);
  expect(builds == big + 1, "cache: an oversized value is not kept");
  get(9, 60);  // the one entry kept since the byte eviction
  expect(builds == big + 1, "cache: an oversized value drops nothing");
  cache.clear();
  stats = cache.stats();
  expect(stats.entries == 0 && stats.bytes == 0, "cache: clear");
}

}  // namespace

int main() {
  check_pieces();
  check_keys();
  check_cache();
  if (failures > 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("piece tables: all checks passed\n");
  return 0;
}
