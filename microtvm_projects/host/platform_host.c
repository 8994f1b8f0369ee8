/* The host build: files through stdio (platform_stdio.c); no instruction counter, and stack and heap are left to the OS
 * (a host stack says nothing about a board's), so they read 0. */
#include "platform.h"

const char *const platform_counter_name = 0;

void platform_init(void) {}

uint64_t platform_counter(void) { return 0; }

uint32_t platform_stack_peak(void) { return 0; }

uint32_t platform_heap_peak(void) { return 0; }
