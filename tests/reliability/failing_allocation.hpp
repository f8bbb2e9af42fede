#pragma once
// Allocation-failure injection for the reliability suite, two ways:
//  - `FailNthAllocation`: the reliability binary replaces the global operator new (see
//    failing_allocation.cpp); while one of these is alive it counts every allocation of the
//    thread and throws std::bad_alloc at the n-th (once). Eigen's own buffers come from
//    std::malloc and are not counted.
//  - `FailingResource`: a std::pmr::memory_resource for the library's injection point (the host
//    memory of the offloaded values) that fails its n-th allocation and tracks what is still
//    allocated.

#include <cstddef>
#include <cstdint>
#include <memory_resource>

namespace skv_test {

/// What an injector reports after a run.
struct InjectionReport {
  std::int64_t allocations = 0;  ///< counted while armed
  bool fired = false;            ///< the n-th came and failed
};

/// Fails the `n`-th (1-based) global operator new of this thread while alive; 0 only counts.
/// Not nestable.
class FailNthAllocation {
 public:
  explicit FailNthAllocation(std::int64_t n);
  ~FailNthAllocation();
  FailNthAllocation(const FailNthAllocation&) = delete;
  FailNthAllocation& operator=(const FailNthAllocation&) = delete;
  InjectionReport report() const;
};

/// A memory resource over the heap that fails its `fail_at`-th allocation (1-based; 0: never)
/// by throwing std::bad_alloc, and counts the bytes still allocated.
class FailingResource : public std::pmr::memory_resource {
 public:
  void arm(std::int64_t fail_at) {
    fail_at_ = fail_at;
    allocations_ = 0;
    fired_ = false;
  }
  InjectionReport report() const { return {allocations_, fired_}; }
  /// Bytes allocated and not yet given back.
  std::size_t outstanding() const { return outstanding_; }

 private:
  void* do_allocate(std::size_t bytes, std::size_t align) override;
  void do_deallocate(void* p, std::size_t bytes, std::size_t align) override;
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }

  std::int64_t fail_at_ = 0, allocations_ = 0;
  bool fired_ = false;
  std::size_t outstanding_ = 0;
};

}  // namespace skv_test
