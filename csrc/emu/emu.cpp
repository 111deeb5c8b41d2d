// The host emulator of the CUDA execution model used by csrc/ (interface and thread model: emu.h).
//
// Synchronisation objects and what they order (ThreadSanitizer sees exactly these edges):
//   * Pool::m_                       host thread <-> the block's threads, at a block's start and end;
//   * Block::barrier (m, generation) all threads of a block, at each __syncthreads;
//   * Warp::m, Warp::round           the lanes of one warp, at each collective (shuffle, mma.sync, ldmatrix);
//   * Block::static_m                the first use of each static __shared__ array (kernel entry);
//   * Cluster::barrier               all threads of a cluster's blocks, at each cluster_sync.
// mma.sync operands are decoded per the PTX ISA fragment layouts (section "Matrix Fragments for
// mma.m16n8k16 with floating point type" and "... for mma.m16n8k8", .tf32), independently of the
// kernels' load_a/load_b, so a kernel whose fragments disagree with the hardware computes wrong numbers.
#include "emu.h"
#include "pool.h"

#include "cuda_bf16.h"
#include "cuda_fp16.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace emu {
namespace {

[[noreturn]] void die(const char* fmt, ...) {
  static std::mutex first;  // one message: other threads that fail meanwhile wait for the abort
  first.lock();
  va_list ap;
  va_start(ap, fmt);
  std::fputs("emu: FATAL: ", stderr);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
  std::fflush(stderr);
  std::abort();
}

// ------------------------------------------------------------------------------ devices, errors
struct Device {
  bool configured = false;
  DeviceConfig config;
  std::map<const void*, int> max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize
};
std::mutex g_devices_m;  // host-side runtime calls only
Device g_devices[kMaxDevices];
thread_local int t_device = 0;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::vector<LaunchRecord> t_launch_log;

Device* configured_device(int dev) {
  if (dev < 0 || dev >= kMaxDevices || !g_devices[dev].configured) return nullptr;
  return &g_devices[dev];
}

Pool g_pool;  // pool.h

// ------------------------------------------------------------------------------ block state
enum class Lane : uint8_t { kRunning, kCollective, kBarrier, kExited };
constexpr int kSlotWords = 6;  // mma.sync: 4 A registers + 2 B registers; a shuffle uses 1

// Waiting: the bookkeeping is done under the mutex, the wait itself on an atomic counter that the
// completing thread bumps (release) and the waiters load (acquire): a woken thread does not contend
// for the mutex again, which matters with 128 threads per block on a few cores.
void wait_for_change(const std::atomic<uint32_t>& counter, uint32_t seen) {
  while (counter.load(std::memory_order_acquire) == seen) counter.wait(seen, std::memory_order_acquire);
}

struct Warp {
  std::mutex m;
  int size = 32;
  Lane state[32] = {};
  uint32_t barrier_generation[32] = {};  // the __syncthreads generation a kBarrier lane waits for
  int in_collective = 0;                 // lanes deposited in the current round
  const char* collective = nullptr;      // its instruction (a string literal)
  std::atomic<uint32_t> round{0};        // completed collectives; bumped under m
  uint32_t slots[2][32][kSlotWords];     // double-buffered by round parity (see collective())
};

// A barrier over the `live` threads of a block (__syncthreads) or of a cluster (barrier.cluster).
struct Barrier {
  std::mutex m;
  int live = 0, arrived = 0;
  std::atomic<uint32_t> generation{0};  // completed barriers; bumped under m, read relaxed by the deadlock check

  void complete(std::unique_lock<std::mutex>& lk) {  // called with m held, as the last thread arrives
    arrived = 0;
    generation.fetch_add(1, std::memory_order_release);
    lk.unlock();
    generation.notify_all();
  }
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lk(m);
    const uint32_t open = generation.load(std::memory_order_relaxed);
    if (++arrived == live) {
      complete(lk);
    } else {
      lk.unlock();
      wait_for_change(generation, open);
    }
  }
  void leave() {  // a thread that exits: a barrier waiting only for it completes
    std::unique_lock<std::mutex> lk(m);
    --live;
    if (arrived > 0 && arrived == live) complete(lk);
  }
};

struct Block {
  int nthreads = 0;
  Barrier barrier;  // __syncthreads
  std::unique_ptr<Warp[]> warps;
  unsigned char* dynamic = nullptr;
  size_t dynamic_bytes = 0, smem_limit = 0;  // the block's total shared-memory limit
  std::mutex static_m;
  std::vector<std::pair<void*, size_t>> statics;
  size_t static_bytes = 0;
};

// This thread's cp.async copies not yet performed, oldest first, and the end of each committed group.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
};
thread_local std::vector<AsyncCopy> t_async_copies;
thread_local std::vector<size_t> t_async_group_ends;

// The blocks of one cluster launch together; `live` counts their threads still running (cluster_sync).
struct Cluster {
  std::vector<Block*> blocks;  // by rank (the block's linear index inside the cluster)
  Barrier barrier;             // barrier.cluster
};

thread_local Block* t_block = nullptr;
thread_local Cluster* t_cluster = nullptr;
thread_local int t_lane = 0, t_warp = 0;
thread_local size_t t_static_index = 0;

Block& block() {
  if (t_block == nullptr) die("a device function was called outside a kernel launch");
  return *t_block;
}

unsigned char* alloc_smem(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 16, bytes) != 0) die("out of memory allocating %zu bytes of shared memory", bytes);
  std::memset(p, 0xff, bytes);  // 0xff..: NaN as fp32, fp16 and bf16
  return static_cast<unsigned char*>(p);
}

// Called with w.m held. A collective completes only when all lanes of the warp join it, and a
// barrier only when every live thread (these lanes included) arrives: lanes in a collective while
// others wait at a still-open barrier, or have exited, can never proceed.
void check_warp_can_progress(const Block& b, const Warp& w, int warp) {
  if (w.in_collective == 0) return;
  const uint32_t open_generation = b.barrier.generation.load(std::memory_order_relaxed);
  for (int l = 0; l < w.size; ++l) {
    if (w.state[l] == Lane::kExited)
      die("warp %d: lane %d has exited while lanes wait in '%s' (a warp collective needs all 32 lanes)", warp, l,
          w.collective);
    if (w.state[l] == Lane::kBarrier && w.barrier_generation[l] == open_generation)
      die("warp %d: lane %d waits at __syncthreads while other lanes wait in '%s': deadlock (divergent barrier)",
          warp, l, w.collective);
  }
}

// Deposits this lane's `words` for the warp collective `what` and returns every lane's deposit
// (slots[lane][word]) once all 32 lanes have deposited theirs. The returned buffer stays valid
// until this lane's next collective: buffer (round % 2) is refilled only in round + 2, which cannot
// start before this lane has deposited in round + 1.
const uint32_t (*collective(const char* what, const uint32_t* words, int nwords))[kSlotWords] {
  Block& b = block();
  Warp& w = b.warps[t_warp];
  if (w.size != 32) die("warp %d has %d threads: '%s' needs a full warp", t_warp, w.size, what);
  std::unique_lock<std::mutex> lk(w.m);
  if (w.in_collective == 0) {
    w.collective = what;
  } else if (std::strcmp(w.collective, what) != 0) {
    die("warp %d: lane %d is in '%s' while other lanes are in '%s' (divergent warp)", t_warp, t_lane, what,
        w.collective);
  }
  const uint32_t my_round = w.round.load(std::memory_order_relaxed);
  auto& buffer = w.slots[my_round & 1];
  std::memcpy(buffer[t_lane], words, sizeof(uint32_t) * nwords);
  w.state[t_lane] = Lane::kCollective;
  if (++w.in_collective == w.size) {
    for (int l = 0; l < w.size; ++l) w.state[l] = Lane::kRunning;
    w.in_collective = 0;
    w.round.fetch_add(1, std::memory_order_release);
    lk.unlock();
    w.round.notify_all();
  } else {
    check_warp_can_progress(b, w, t_warp);
    lk.unlock();
    wait_for_change(w.round, my_round);
  }
  return buffer;
}

// A thread returning from the kernel: it leaves the barrier count (a barrier waiting only for it
// completes) and no collective may wait for it.
void exit_thread() {
  Block& b = block();
  if (!t_async_copies.empty())
    die("thread %u exits with %zu cp.async copies never waited for (cp.async.wait_group)", threadIdx.x,
        t_async_copies.size());
  t_async_group_ends.clear();
  {
    Warp& w = b.warps[t_warp];
    std::lock_guard<std::mutex> lk(w.m);
    w.state[t_lane] = Lane::kExited;
    if (w.in_collective > 0) check_warp_can_progress(b, w, t_warp);
  }
  b.barrier.leave();
  t_cluster->barrier.leave();
}

// Runs the blocks of one cluster (cluster_dim blocks from block `origin`; one block without clusters) at
// the same time: worker i plays thread i % nthreads of block i / nthreads.
void run_cluster(dim3 grid, dim3 block_dim, dim3 cluster_dim, uint3 origin, size_t dynamic_bytes, size_t smem_limit,
                 const std::function<void()>& body) {
  const int nthreads = (int)(block_dim.x * block_dim.y * block_dim.z);
  const int nblocks = (int)(cluster_dim.x * cluster_dim.y * cluster_dim.z);
  std::vector<std::unique_ptr<Block>> blocks;
  Cluster cluster;
  for (int i = 0; i < nblocks; ++i) {
    auto b = std::make_unique<Block>();
    b->nthreads = nthreads;
    b->barrier.live = nthreads;
    const int nwarps = (nthreads + 31) / 32;
    b->warps.reset(new Warp[nwarps]);
    for (int w = 0; w < nwarps; ++w) b->warps[w].size = std::min(32, nthreads - 32 * w);
    b->dynamic = alloc_smem(dynamic_bytes);
    b->dynamic_bytes = dynamic_bytes;
    b->smem_limit = smem_limit;
    cluster.blocks.push_back(b.get());
    blocks.push_back(std::move(b));
  }
  cluster.barrier.live = nthreads * nblocks;
  g_pool.run(nthreads * nblocks, [&](int id) {
    const int rank = id / nthreads, tid = id % nthreads;
    t_block = cluster.blocks[rank];
    t_cluster = &cluster;
    t_lane = tid & 31;
    t_warp = tid >> 5;
    t_static_index = 0;
    threadIdx = uint3{tid % block_dim.x, (tid / block_dim.x) % block_dim.y, tid / (block_dim.x * block_dim.y)};
    blockIdx = uint3{origin.x + rank % cluster_dim.x, origin.y + (rank / cluster_dim.x) % cluster_dim.y,
                     origin.z + rank / (cluster_dim.x * cluster_dim.y)};
    blockDim = block_dim;
    gridDim = grid;
    body();
    exit_thread();
    t_block = nullptr;
    t_cluster = nullptr;
  });
  for (auto& b : blocks) {
    std::free(b->dynamic);
    for (auto& st : b->statics) std::free(st.first);
  }
}

// ------------------------------------------------------------------------------ PTX operands
struct MmaForm {
  const char* suffix;
  int k;            // 16: m16n8k16 with .f16 / .bf16 A and B; 8: m16n8k8 with .tf32
  bool bf16, tf32;  // element type of A and B
};
constexpr MmaForm kMmaForms[] = {
    {"m16n8k16.row.col.f32.f16.f16.f32", 16, false, false},
    {"m16n8k16.row.col.f32.bf16.bf16.f32", 16, true, false},
    {"m16n8k8.row.col.f32.tf32.tf32.f32", 8, false, true},
};

double f16_value(uint32_t h) { return __half2float(__half{(uint16_t)h}); }  // exact
double bf16_value(uint32_t b) { return __bfloat162float(__nv_bfloat16{(uint16_t)b}); }
double tf32_value(uint32_t r) { return std::bit_cast<float>(r & 0xffffe000u); }  // the low 13 bits are ignored

}  // namespace

// ------------------------------------------------------------------------------ public: devices
void configure_device(int dev, DeviceConfig config) {
  std::lock_guard<std::mutex> lk(g_devices_m);
  if (dev < 0 || dev >= kMaxDevices) die("configure_device: id %d out of range", dev);
  if (g_devices[dev].configured) die("configure_device: device %d configured twice (launchers cache it)", dev);
  if (config.sms < 1 || config.smem_optin < (int)kDefaultSmemLimit / 8) die("configure_device: bad config");
  g_devices[dev].configured = true;
  g_devices[dev].config = config;
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  std::lock_guard<std::mutex> lk(g_devices_m);
  Device* d = configured_device(t_device);
  if (d == nullptr) return t_last_error = cudaErrorInvalidDevice;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > d->config.smem_optin)
    return t_last_error = cudaErrorInvalidValue;
  d->max_dynamic_smem[kernel] = value;
  return cudaSuccess;
}

// ------------------------------------------------------------------------------ public: launch
cudaError_t launch(const void* kernel, dim3 grid, dim3 block_dim, size_t dynamic_bytes,
                   const std::function<void()>& body, dim3 cluster) {
  size_t limit = 0, block_limit = 0;
  bool clusters = false;
  {
    std::lock_guard<std::mutex> lk(g_devices_m);
    Device* d = configured_device(t_device);
    if (d == nullptr) return t_last_error = cudaErrorInvalidDevice;
    const size_t optin = (size_t)d->config.smem_optin;
    auto it = d->max_dynamic_smem.find(kernel);
    limit = it != d->max_dynamic_smem.end() ? (size_t)it->second : std::min(kDefaultSmemLimit, optin);
    block_limit = std::max(kDefaultSmemLimit, optin);
    clusters = d->config.clusters;
  }
  const uint64_t threads = (uint64_t)block_dim.x * block_dim.y * block_dim.z;
  if (threads == 0 || threads > 1024 || block_dim.x > 1024 || block_dim.y > 1024 || block_dim.z > 64)
    return t_last_error = cudaErrorInvalidConfiguration;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    return t_last_error = cudaErrorInvalidConfiguration;
  if (dynamic_bytes > limit) return t_last_error = cudaErrorInvalidValue;
  const uint64_t cluster_blocks = (uint64_t)cluster.x * cluster.y * cluster.z;
  if (cluster_blocks == 0 || cluster_blocks > 8 || grid.x % cluster.x || grid.y % cluster.y || grid.z % cluster.z ||
      (cluster_blocks > 1 && !clusters))
    return t_last_error = cudaErrorInvalidConfiguration;
  for (unsigned z = 0; z < grid.z; z += cluster.z)
    for (unsigned y = 0; y < grid.y; y += cluster.y)
      for (unsigned x = 0; x < grid.x; x += cluster.x)
        run_cluster(grid, block_dim, cluster, uint3{x, y, z}, dynamic_bytes, block_limit, body);
  return cudaSuccess;
}

void record_launch(LaunchRecord record) { t_launch_log.push_back(std::move(record)); }

std::vector<LaunchRecord> take_launch_log() { return std::exchange(t_launch_log, {}); }

// ------------------------------------------------------------------------------ public: device side
namespace {
// A lane waiting at `bar` (its block's or its cluster's): marked in its warp, so that a collective the other
// lanes wait in is reported as a deadlock instead of hanging.
void wait_at(Barrier& bar) {
  Block& b = block();
  Warp& w = b.warps[t_warp];
  {
    std::lock_guard<std::mutex> lk(w.m);
    w.state[t_lane] = Lane::kBarrier;
    w.barrier_generation[t_lane] = b.barrier.generation.load(std::memory_order_relaxed);
    if (w.in_collective > 0) check_warp_can_progress(b, w, t_warp);
  }
  bar.arrive_and_wait();
  std::lock_guard<std::mutex> lk(w.m);
  w.state[t_lane] = Lane::kRunning;
}
}  // namespace

void syncthreads() { wait_at(block().barrier); }

unsigned char* dynamic_smem() { return block().dynamic; }

// barrier.cluster.arrive.release + barrier.cluster.wait.acquire over every live thread of the cluster.
void cluster_sync() { wait_at(t_cluster->barrier); }

void* map_shared_rank(const void* p, unsigned rank) {
  const Block& b = block();
  const Cluster& c = *t_cluster;
  const auto* q = static_cast<const unsigned char*>(p);
  if (!(q >= b.dynamic && q < b.dynamic + b.dynamic_bytes))
    die("map_shared_rank: %p is not inside this block's dynamic shared memory", p);
  if (rank >= c.blocks.size()) die("map_shared_rank: rank %u of a cluster of %zu blocks", rank, c.blocks.size());
  return c.blocks[rank]->dynamic + (q - b.dynamic);
}

void* static_smem(size_t bytes) {
  Block& b = block();
  std::lock_guard<std::mutex> lk(b.static_m);
  const size_t i = t_static_index++;
  if (i == b.statics.size()) {
    b.static_bytes += bytes;
    if (b.static_bytes > kDefaultSmemLimit) die("static __shared__ arrays total %zu bytes (> 48 KiB)", b.static_bytes);
    if (b.static_bytes + b.dynamic_bytes > b.smem_limit)
      die("static (%zu) + dynamic (%zu) shared memory exceed the device's %zu bytes: the launch would fail",
          b.static_bytes, b.dynamic_bytes, b.smem_limit);
    b.statics.emplace_back(alloc_smem(bytes), bytes);
  } else if (i > b.statics.size() || b.statics[i].second != bytes) {
    die("thread %u reached static __shared__ array #%zu (%zu bytes) unlike the block's first thread", threadIdx.x, i,
        bytes);
  }
  return b.statics[i].first;
}

uint32_t shfl_xor_u32(unsigned mask, uint32_t value, int lane_mask, int width) {
  if (mask != 0xffffffffu || width != 32 || lane_mask < 0 || lane_mask > 31)
    die("__shfl_xor_sync(mask=%#x, laneMask=%d, width=%d): only full-warp shuffles are emulated", mask, lane_mask,
        width);
  const auto* all = collective("shfl.sync.bfly.b32", &value, 1);
  return all[t_lane ^ lane_mask][0];
}

// D = A * B + C for one 16 x 8 tile; every lane holds four D elements (the accumulator layout,
// identical for both shapes: c_i at row groupID + 8 * (i >= 2), column 2 * threadID_in_group + (i & 1)).
// Products of the decoded operands are exact in double, summed with C in double, rounded to fp32.
void mma_sync(const char* shape_types, float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const MmaForm* form = nullptr;
  for (const MmaForm& f : kMmaForms)
    if (std::strcmp(f.suffix, shape_types) == 0) form = &f;
  if (form == nullptr) die("mma.sync.aligned.%s is not emulated", shape_types);
  const uint32_t mine[kSlotWords] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const auto* all = collective(form->suffix, mine, kSlotWords);

  double A[16][16], B[16][8];  // A[row][k], B[k][col]
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;  // groupID, threadID_in_group
    const uint32_t* ra = all[lane];
    const uint32_t* rb = all[lane] + 4;
    if (form->k == 16) {  // .f16 / .bf16: two elements per register, the lower index in the low half
      auto elem = [&](const uint32_t* regs, int i) {
        const uint32_t h = (regs[i / 2] >> (16 * (i & 1))) & 0xffffu;
        return form->bf16 ? bf16_value(h) : f16_value(h);
      };
      for (int i = 0; i < 8; ++i)  // a0..a7
        A[g + ((i < 2 || (i >= 4 && i < 6)) ? 0 : 8)][2 * t + (i & 1) + (i >= 4 ? 8 : 0)] = elem(ra, i);
      for (int i = 0; i < 4; ++i)  // b0..b3
        B[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = elem(rb, i);
    } else {  // .tf32: one element per register
      for (int i = 0; i < 4; ++i) A[g + ((i == 1 || i == 3) ? 8 : 0)][t + (i >= 2 ? 4 : 0)] = tf32_value(ra[i]);
      for (int i = 0; i < 2; ++i) B[t + 4 * i][g] = tf32_value(rb[i]);
    }
  }
  const int g = t_lane >> 2, t = t_lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    double s = c[i];
    for (int k = 0; k < form->k; ++k) s += A[row][k] * B[k][col];
    c[i] = (float)s;
  }
}

void cp_async(void* smem, const void* gmem, int cp_bytes, int src_bytes) {
  Block& b = block();
  const auto* d = static_cast<unsigned char*>(smem);
  if (cp_bytes != 16 || src_bytes < 0 || src_bytes > cp_bytes)
    die("cp.async: cp-size %d / src-size %d (only .cg with 16 bytes and src-size in [0, 16] are used)", cp_bytes,
        src_bytes);
  if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) % 16 != 0)
    die("cp.async: misaligned address (shared %p, global %p): both must be 16-byte aligned", smem, gmem);
  const bool in_dynamic = d >= b.dynamic && d + cp_bytes <= b.dynamic + b.dynamic_bytes;
  if (!in_dynamic) die("cp.async: destination %p is not inside the block's dynamic shared memory", smem);
  t_async_copies.push_back({smem, gmem, cp_bytes, src_bytes});
}

void cp_async_commit() { t_async_group_ends.push_back(t_async_copies.size()); }

void cp_async_wait(int pending_groups) {
  if (pending_groups < 0) die("cp.async.wait_group %d", pending_groups);
  const size_t groups = t_async_group_ends.size();
  if (groups <= (size_t)pending_groups) return;
  const size_t done_groups = groups - (size_t)pending_groups;
  const size_t done = t_async_group_ends[done_groups - 1];
  for (size_t i = 0; i < done; ++i) {
    const AsyncCopy& c = t_async_copies[i];
    std::memcpy(c.dst, c.src, (size_t)c.src_bytes);  // src_bytes = 0 reads nothing
    std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, (size_t)(c.bytes - c.src_bytes));
  }
  t_async_copies.erase(t_async_copies.begin(), t_async_copies.begin() + (std::ptrdiff_t)done);
  t_async_group_ends.erase(t_async_group_ends.begin(), t_async_group_ends.begin() + (std::ptrdiff_t)done_groups);
  for (size_t& end : t_async_group_ends) end -= done;
}

// Lane l supplies the address of row l % 8 of matrix l / 8 (lanes past 8 * nmat: ignored) and gets, for each
// matrix m, the 32-bit word (two b16 elements) at row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1; with .trans
// the matrix read as its transpose: the elements at rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4 (the
// lower row in the lower 16 bits).
void ldmatrix(int nmat, const void* row_address, uint32_t* out, bool trans) {
  if (nmat != 2 && nmat != 4) die("ldmatrix .x%d is not emulated", nmat);
  const auto addr = reinterpret_cast<uintptr_t>(row_address);
  const uint32_t mine[2] = {(uint32_t)addr, (uint32_t)(addr >> 32)};
  static const char* const kForms[2][2] = {
      {"ldmatrix.sync.aligned.m8n8.x2.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.shared.b16"},
      {"ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"}};
  const auto* all = collective(kForms[trans][nmat == 4], mine, 2);
  Block& b = block();
  auto row_of = [&](int src_lane) {  // the checked address of the row lane src_lane supplied
    const uintptr_t row = (uintptr_t)all[src_lane][0] | ((uintptr_t)all[src_lane][1] << 32);
    if (row % 16 != 0) die("ldmatrix: lane %d's row address %#zx is not 16-byte aligned", src_lane, (size_t)row);
    const auto* p = reinterpret_cast<const unsigned char*>(row);
    if (!(p >= b.dynamic && p + 16 <= b.dynamic + b.dynamic_bytes))
      die("ldmatrix: lane %d's row address %p is not inside the block's dynamic shared memory", src_lane, (const void*)p);
    return p;
  };
  for (int m = 0; m < nmat; ++m) {
    if (!trans) {
      std::memcpy(&out[m], row_of(8 * m + t_lane / 4) + 4 * (t_lane % 4), 4);
    } else {
      uint16_t lo = 0, hi = 0;
      std::memcpy(&lo, row_of(8 * m + 2 * (t_lane % 4)) + 2 * (t_lane / 4), 2);
      std::memcpy(&hi, row_of(8 * m + 2 * (t_lane % 4) + 1) + 2 * (t_lane / 4), 2);
      out[m] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
  }
}

// cvt.rna.tf32.f32: round to a 10-bit mantissa, to nearest with ties away from zero (adding half
// of the dropped 13 bits to the magnitude; a carry into the exponent is right, up to +-inf);
// +-inf stays, NaN becomes the canonical NaN.
uint32_t cvt_rna_tf32_f32(float value) {
  const uint32_t x = std::bit_cast<uint32_t>(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffffffu;
  if ((x & 0x7f800000u) == 0x7f800000u) return x;
  return (x + 0x1000u) & 0xffffe000u;
}

}  // namespace emu

// ------------------------------------------------------------------------------ runtime API
cudaError_t cudaGetDevice(int* device) {
  *device = emu::t_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  std::lock_guard<std::mutex> lk(emu::g_devices_m);
  if (emu::configured_device(device) == nullptr) return emu::t_last_error = cudaErrorInvalidDevice;
  emu::t_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  std::lock_guard<std::mutex> lk(emu::g_devices_m);
  const emu::Device* d = emu::configured_device(device);
  if (d == nullptr) return emu::t_last_error = cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d->config.sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d->config.smem_optin; return cudaSuccess;
    case cudaDevAttrClusterLaunch: *value = d->config.clusters ? 1 : 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = std::min((int)emu::kDefaultSmemLimit, d->config.smem_optin);
      return cudaSuccess;
  }
  return emu::t_last_error = cudaErrorInvalidValue;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::t_last_error;
  emu::t_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
  }
  return "unknown error";
}
