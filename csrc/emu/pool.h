// The emulator's thread pool (csrc/emu/emu.cpp): the OS threads that play a launch's CUDA threads.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace emu {

// Worker i always plays linear thread id i of the current block; workers past the block size idle.
class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    start_cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  void run(int nthreads, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> lk(m_);
    while ((int)workers_.size() < nthreads) {
      const int id = (int)workers_.size();
      workers_.emplace_back([this, id] { work(id); });
    }
    job_ = &job;
    job_threads_ = nthreads;
    done_ = 0;
    ++generation_;
    start_cv_.notify_all();
    done_cv_.wait(lk, [&] { return done_ == job_threads_; });
    job_ = nullptr;
  }

 private:
  void work(int id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      start_cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (id >= job_threads_) continue;
      const std::function<void(int)>* job = job_;
      lk.unlock();
      (*job)(id);
      lk.lock();
      if (++done_ == job_threads_) done_cv_.notify_one();
    }
  }
  std::mutex m_;
  std::condition_variable start_cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int job_threads_ = 0, done_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace emu
