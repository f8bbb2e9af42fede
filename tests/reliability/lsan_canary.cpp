// Leaks on purpose (test reliability.leak_sanitizer_active): under LeakSanitizer it must end
// with a leak report, which shows that leak detection runs in the sanitizer build.

#include <cstdio>
#include <cstdlib>

int main() {
  void* volatile leaked = std::malloc(64);
  std::printf("leaking %p\n", leaked);
  leaked = nullptr;
  return 0;
}
