/* sanitizer.h — LN_UNDER_ASAN is 1 in the ASan build: tests that put a real RLIMIT_AS on a
 * process (ASan's shadow memory needs terabytes of address space) or make an allocation far beyond
 * memory (ASan's allocator aborts instead of returning NULL) skip there. */
#ifndef LN_TEST_SANITIZER_H
#define LN_TEST_SANITIZER_H

#if defined(__SANITIZE_ADDRESS__)
#define LN_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LN_UNDER_ASAN 1
#endif
#endif
#ifndef LN_UNDER_ASAN
#define LN_UNDER_ASAN 0
#endif

#endif
