// The global operator new and delete of the reliability binary: std::malloc / posix_memalign
// and std::free, plus the counter and the one injected failure of `FailNthAllocation`. Every
// form is replaced, so that new and delete always pair (AddressSanitizer checks that they do),
// and so that a request too large for AddressSanitizer's allocator comes back as
// std::bad_alloc (its own operator new ends the process instead).

#include "failing_allocation.hpp"

#include <stdlib.h>  // posix_memalign

#include <algorithm>
#include <cstdlib>
#include <new>

namespace {

struct Injection {
  bool armed = false;
  std::int64_t fail_at = 0;
  std::int64_t count = 0;
  bool fired = false;
};

thread_local Injection injection;

/// True when this allocation is the one to fail.
bool inject() noexcept {
  if (!injection.armed) return false;
  ++injection.count;
  if (injection.count != injection.fail_at) return false;
  injection.fired = true;
  return true;
}

void* allocate(std::size_t size) {
  if (inject()) throw std::bad_alloc();
  if (void* p = std::malloc(size ? size : 1)) return p;
  throw std::bad_alloc();
}

void* allocate_aligned(std::size_t size, std::align_val_t align) {
  if (inject()) throw std::bad_alloc();
  void* p = nullptr;
  const std::size_t a = std::max(static_cast<std::size_t>(align), sizeof(void*));
  if (posix_memalign(&p, a, size ? size : 1) == 0) return p;
  throw std::bad_alloc();
}

/// The nothrow forms: the same, null instead of the exception.
template <class... Args>
void* nothrow(void* (*alloc)(std::size_t, Args...), std::size_t size, Args... args) noexcept {
  try {
    return alloc(size, args...);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}

}  // namespace

void* operator new(std::size_t size) { return allocate(size); }
void* operator new[](std::size_t size) { return allocate(size); }
void* operator new(std::size_t size, const std::nothrow_t&) noexcept { return nothrow(allocate, size); }
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept { return nothrow(allocate, size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void* operator new(std::size_t size, std::align_val_t a) { return allocate_aligned(size, a); }
void* operator new[](std::size_t size, std::align_val_t a) { return allocate_aligned(size, a); }
void* operator new(std::size_t size, std::align_val_t a, const std::nothrow_t&) noexcept {
  return nothrow(allocate_aligned, size, a);
}
void* operator new[](std::size_t size, std::align_val_t a, const std::nothrow_t&) noexcept {
  return nothrow(allocate_aligned, size, a);
}
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

// Under AddressSanitizer an allocation larger than it serves returns null (std::bad_alloc
// through operator new) instead of ending the process: the suites ask for such sizes on
// purpose. ASAN_OPTIONS still overrides this.
extern "C" const char* __asan_default_options() { return "allocator_may_return_null=1"; }

namespace skv_test {

FailNthAllocation::FailNthAllocation(std::int64_t n) { injection = {true, n, 0, false}; }
FailNthAllocation::~FailNthAllocation() { injection.armed = false; }
InjectionReport FailNthAllocation::report() const { return {injection.count, injection.fired}; }

void* FailingResource::do_allocate(std::size_t bytes, std::size_t align) {
  if (++allocations_ == fail_at_) {
    fired_ = true;
    throw std::bad_alloc();
  }
  void* p = std::pmr::new_delete_resource()->allocate(bytes, align);
  outstanding_ += bytes;
  return p;
}

void FailingResource::do_deallocate(void* p, std::size_t bytes, std::size_t align) {
  outstanding_ -= bytes;
  std::pmr::new_delete_resource()->deallocate(p, bytes, align);
}

}  // namespace skv_test
