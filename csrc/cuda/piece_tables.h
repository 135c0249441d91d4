// Host side of the CUDA ops' piece tables, without torch or CUDA headers so
// that tests/cpp/test_piece_tables.cpp checks it with g++ on any machine:
//   make_pieces  the pieces (Segments) every CUDA launcher walks;
//   table_key    everything a table is built from, as integers;
//   LruCache     tables kept between calls (the binding caches the device
//                copy: a billion-weight model has ~15K pieces in global scope
//                and ~460K in neuron scope, built and uploaded per call
//                otherwise).
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "../kernel_types.h"

namespace sap_kernels::cuda {

// Pieces of at most `max_piece` elements, each inside one unit (one tensor in
// layer scope, one row in neuron scope), in global order; unit_starts[u] is
// the first piece of unit u (units are non-decreasing along the pieces).
struct HostPieces {
  std::vector<Segment> segments;
  std::vector<int64_t> unit_starts;       // num_units + 1 entries
  std::vector<int64_t> unit_first_piece;  // per piece: unit_starts[its unit]
};

inline int64_t unit_length_of(const Shard& shard, int64_t scope) {
  return scope == kNeuron ? shard.row_length : shard.numel;
}

inline HostPieces make_pieces(const std::vector<Shard>& shards, int64_t num_units, int64_t scope,
                              int64_t max_piece) {
  // Sized first and filled in one pass: a binary search per unit plus
  // regrowing vectors cost 25 ms per call in neuron scope at a billion
  // weights (4 ms this way; a g++ -O2 harness on the CPU machine).
  HostPieces pieces;
  size_t count = 0;
  for (const Shard& shard : shards) {
    if (shard.numel == 0) continue;
    const int64_t unit_length = unit_length_of(shard, scope);
    count += size_t(shard.numel / unit_length) * size_t((unit_length - 1) / max_piece + 1);
  }
  pieces.segments.reserve(count);
  pieces.unit_first_piece.reserve(count);
  pieces.unit_starts.assign(num_units + 1, -1);
  for (size_t s = 0; s < shards.size(); ++s) {
    const Shard& shard = shards[s];
    if (shard.numel == 0) continue;
    const int64_t unit_length = unit_length_of(shard, scope);
    for (int64_t unit_begin = 0; unit_begin < shard.numel; unit_begin += unit_length) {
      const int64_t unit = shard.first_unit + (scope == kNeuron ? unit_begin / unit_length : 0);
      int64_t& first = pieces.unit_starts[unit];
      if (first < 0) first = int64_t(pieces.segments.size());
      // offset + length never exceeds unit_length, so max_piece may be INT64_MAX.
      for (int64_t offset = 0; offset < unit_length;) {
        const int64_t length = std::min(max_piece, unit_length - offset);
        pieces.segments.push_back(Segment{unit_begin + offset, length, static_cast<int32_t>(s)});
        pieces.unit_first_piece.push_back(first);
        offset += length;
      }
    }
  }
  // A unit without pieces (an empty tensor in layer scope) starts where the
  // next unit does.
  int64_t next = int64_t(pieces.segments.size());
  for (int64_t u = num_units; u >= 0; --u) {
    if (pieces.unit_starts[u] < 0) pieces.unit_starts[u] = next;
    next = pieces.unit_starts[u];
  }
  return pieces;
}

// The largest piece that changes the table: a max_piece at or above every
// unit's length gives the same pieces, so such calls share one cached table
// (in neuron scope the power sums and the row select do).
inline int64_t effective_max_piece(const std::vector<Shard>& shards, int64_t scope,
                                   int64_t max_piece) {
  int64_t longest = 1;
  for (const Shard& shard : shards) longest = std::max(longest, unit_length_of(shard, scope));
  return std::min(max_piece, longest);
}

// Every input of a table (device tables hold the shards' addresses, so a
// table is valid exactly when its key matches): the context (device, stream:
// the cached device copy is used only on the stream it was made on), the
// piece plan, then each shard's addresses, sizes and type.
inline std::vector<int64_t> table_key(const std::vector<Shard>& shards, int64_t num_units,
                                      int64_t scope, int64_t max_piece, int64_t device_index,
                                      int64_t stream_id) {
  std::vector<int64_t> key = {device_index, stream_id, scope,
                              effective_max_piece(shards, scope, max_piece), num_units};
  key.reserve(key.size() + 6 * shards.size());
  for (const Shard& shard : shards) {
    key.push_back(int64_t(reinterpret_cast<uintptr_t>(shard.data)));
    key.push_back(int64_t(reinterpret_cast<uintptr_t>(shard.mask)));
    key.push_back(shard.numel);
    key.push_back(shard.row_length);
    key.push_back(shard.first_unit);
    key.push_back(shard.type);
  }
  return key;
}

// Values built from a key, least recently used dropped first once they hold
// more than max_bytes or max_entries. A value is shared, so one dropped while
// a caller still uses it lives on until that caller is done. Thread-safe;
// building runs under the lock (concurrent callers of one layout build once).
template <class Value>
class LruCache {
 public:
  LruCache(size_t max_bytes, size_t max_entries)
      : max_bytes_(max_bytes), max_entries_(max_entries) {}

  // The value for key, built by build() on a miss; bytes_of(value) is what it
  // counts against max_bytes. A value larger than max_bytes is built and
  // returned but not kept.
  std::shared_ptr<const Value> get(const std::vector<int64_t>& key,
                                   const std::function<Value()>& build,
                                   const std::function<size_t(const Value&)>& bytes_of) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->key != key) continue;
      entries_.splice(entries_.begin(), entries_, it);
      ++hits_;
      return entries_.front().value;
    }
    ++misses_;
    auto value = std::make_shared<const Value>(build());
    const size_t bytes = bytes_of(*value);
    if (bytes > max_bytes_) return value;
    entries_.push_front(Entry{key, value, bytes});
    bytes_ += bytes;
    while (bytes_ > max_bytes_ || entries_.size() > max_entries_) {
      bytes_ -= entries_.back().bytes;
      entries_.pop_back();
    }
    return value;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
    bytes_ = 0;
  }

  struct Stats {
    int64_t hits, misses, entries, bytes;
  };
  Stats stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return Stats{hits_, misses_, int64_t(entries_.size()), int64_t(bytes_)};
  }

 private:
  struct Entry {
    std::vector<int64_t> key;
    std::shared_ptr<const Value> value;
    size_t bytes;
  };
  const size_t max_bytes_, max_entries_;
  mutable std::mutex mutex_;
  std::list<Entry> entries_;  // most recently used first
  size_t bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace sap_kernels::cuda
