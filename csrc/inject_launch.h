// Launch arithmetic of the CUDA inject kernels (cuda/kernels.cu): how a rows x width problem is
// cut into blocks. Host-only and free of CUDA headers, so that every build has it: the CPU build
// exposes it as the op pini_native::cuda_inject_launch, which pini_kernels/native.py calls to size
// the backward's partial sums and the tests call to check the grid on any machine.
//
// A block is column_threads x row_lanes threads. A thread owns 4 consecutive columns of a row
// (one Philox call, one vector load); the block owns column_threads * 4 columns and a chunk of
// rows_per_chunk rows, which its row lanes walk together (lane l takes rows l, l + row_lanes, ...).
// Narrow rows get few column threads and many row lanes, so no block is mostly idle. In backward
// each block writes one row of parameter partial sums for its chunk (no atomics).
#pragma once

#include <algorithm>
#include <cstdint>

namespace pini::launch {

// 256 threads: 8 warps per block, enough to hide latency in these bandwidth-bound kernels.
constexpr int64_t kInjectThreads = 256;
// Consecutive columns per thread: one Philox call gives 4 normals; 4 floats are one 16-byte load.
constexpr int64_t kColumnsPerThread = 4;
// Blocks wanted per multiprocessor: an SM (sm_80, sm_90) holds at most 2048 threads, 8 blocks of
// 256, and at the kernels' 43-80 registers per thread 3-5 of them: so this is one to three waves,
// enough to fill every SM and even out the last wave; more blocks would only add partial-sum rows
// that backward must reduce.
constexpr int64_t kBlocksPerMultiprocessor = 8;
// CUDA caps grid dimension y (the row chunks) at 65535 and x (the column blocks) at 2^31 - 1.
constexpr int64_t kMaxRowChunks = 65535;
constexpr int64_t kMaxColumnBlocks = (int64_t{1} << 31) - 1;

struct InjectLaunch {
  int64_t column_threads;  // threads across a row: a power of two in [1, kInjectThreads]
  int64_t row_lanes;       // kInjectThreads / column_threads: rows a block works on at once
  int64_t column_blocks;   // grid dimension x
  int64_t rows_per_chunk;  // rows of one block
  int64_t row_chunks;      // grid dimension y: backward's rows of partial sums
};

inline int64_t ceil_div(int64_t numerator, int64_t denominator) {
  return (numerator + denominator - 1) / denominator;
}

// The grid for a given chunk size (backward's caller chose it and sized its partial sums).
inline InjectLaunch inject_launch_for_chunks(int64_t rows, int64_t width, int64_t rows_per_chunk) {
  const int64_t quads = ceil_div(width, kColumnsPerThread);
  int64_t column_threads = 1;
  while (column_threads < quads && column_threads < kInjectThreads) column_threads *= 2;
  return {column_threads, kInjectThreads / column_threads, ceil_div(quads, column_threads),
          rows_per_chunk, ceil_div(rows, rows_per_chunk)};
}

// The grid for a rows x width problem on a GPU with `multiprocessors` SMs: about
// kBlocksPerMultiprocessor blocks per SM, at least one row per row lane, at most kMaxRowChunks
// chunks (so rows up to 2^63 fit: rows_per_chunk grows with the problem).
inline InjectLaunch inject_launch(int64_t rows, int64_t width, int64_t multiprocessors) {
  const InjectLaunch shape = inject_launch_for_chunks(rows, width, 1);
  const int64_t target_blocks = kBlocksPerMultiprocessor * std::max<int64_t>(multiprocessors, 1);
  const int64_t wanted_chunks = std::clamp<int64_t>(ceil_div(target_blocks, shape.column_blocks), 1,
                                                    std::max<int64_t>(rows, 1));
  const int64_t rows_per_chunk = std::max({ceil_div(rows, wanted_chunks),
                                           ceil_div(rows, kMaxRowChunks), shape.row_lanes});
  return inject_launch_for_chunks(rows, width, rows_per_chunk);
}

}  // namespace pini::launch
