// pyops._C._fma_peak: the arithmetic ceiling of this CPU, measured, for the benchmarks' roofline. Each
// thread keeps kAcc independent accumulators of at::vec::Vectorized<float> (the vector width the CPU
// kernels are built for) in registers and updates them with fused multiply-adds; with 12 chains in
// flight the FMA latency (4 cycles) times the FMA pipes (2) is covered, so the loop runs at the FMA
// units' throughput, not their latency. No memory is touched inside the loop.
#include "roofline.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>
#include <vector>

namespace pyops {
namespace {

using Vec = at::vec::Vectorized<float>;
using Clock = std::chrono::steady_clock;
constexpr int kAcc = 12;
constexpr int64_t kBatch = 4096;  // FMA rounds between two reads of the clock

// Flops per second of one thread over `seconds` (after a tenth of it as warm-up); *sink keeps the
// accumulators observable so the compiler cannot drop the loop.
double fma_rate(double seconds, float* sink) {
  Vec acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = Vec(1.0f + 1e-3f * float(i));
  const Vec a(0.999999f), b(1e-7f);  // acc -> acc * a + b converges to 0.1: no overflow, no denormals
  int64_t rounds = 0;
  Clock::time_point start;
  for (int phase = 0; phase < 2; ++phase) {
    const auto t0 = Clock::now();
    const auto until = t0 + std::chrono::duration<double>(phase == 0 ? 0.1 * seconds : seconds);
    rounds = 0;
    start = t0;
    do {
      for (int64_t r = 0; r < kBatch; ++r) {
#pragma GCC unroll 12
        for (int i = 0; i < kAcc; ++i) acc[i] = at::vec::fmadd(acc[i], a, b);
      }
      rounds += kBatch;
    } while (Clock::now() < until);
  }
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  Vec total = acc[0];
  for (int i = 1; i < kAcc; ++i) total = total + acc[i];
  float lanes[Vec::size()];
  total.store(lanes);
  *sink = lanes[0];
  return double(rounds) * kAcc * Vec::size() * 2.0 / elapsed;
}

}  // namespace

PyObject* py_fma_peak(PyObject*, PyObject* args) {
  int threads = 1;
  double seconds = 0.2;
  if (!PyArg_ParseTuple(args, "|id", &threads, &seconds)) return nullptr;
  if (threads < 1 || threads > 4096 || !(seconds > 0.0 && seconds <= 60.0)) {
    PyErr_Format(PyExc_ValueError, "pyops._fma_peak: threads must be in [1, 4096] and seconds in (0, 60]");
    return nullptr;
  }
  std::vector<double> rates(size_t(threads), 0.0);
  std::vector<float> sinks(size_t(threads), 0.0f);
  Py_BEGIN_ALLOW_THREADS;
  std::atomic<int> ready{0};
  std::vector<std::thread> pool;
  pool.reserve(size_t(threads));
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load() < threads) std::this_thread::yield();  // all threads start together
      rates[size_t(t)] = fma_rate(seconds, &sinks[size_t(t)]);
    });
  }
  for (auto& th : pool) th.join();
  Py_END_ALLOW_THREADS;
  double total = 0.0;
  for (int t = 0; t < threads; ++t) total += std::isfinite(sinks[size_t(t)]) ? rates[size_t(t)] : 0.0;
  return PyFloat_FromDouble(total / 1e9);
}

}  // namespace pyops
