// A small fixed pool for splitting one large reduction. The calling thread works too, so a pool
// of size 1 spawns nothing. Kept small on purpose: monitor() runs between optimizer steps, and
// a pool that grabbed every core would fight the framework's own intra-op threads.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace zetaguard {

class ThreadPool {
public:
    explicit ThreadPool(int threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const noexcept { return static_cast<int>(workers_.size()) + 1; }

    // Calls fn(i) for every i in [0, n) across the pool and returns when all are done.
    void run(std::size_t n, const std::function<void(std::size_t)>& fn);

private:
    void worker_loop();
    void drain();

    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::condition_variable done_;
    const std::function<void(std::size_t)>* job_ = nullptr;
    std::size_t job_size_ = 0;
    std::atomic<std::size_t> next_{0};
    std::size_t busy_ = 0;
    std::size_t generation_ = 0;
    bool stop_ = false;
};

}  // namespace zetaguard
