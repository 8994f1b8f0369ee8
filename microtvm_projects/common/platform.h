/* The board interface of tinytrain_main.c: everything that differs between the host, QEMU and a real board,
 * so that all of them run the same training program and the same model code. */
#ifndef TINYTRAIN_PLATFORM_H
#define TINYTRAIN_PLATFORM_H

#include <stdint.h>

/* Starts the counter; main calls it first. */
void platform_init(void);

/* What platform_counter() counts ("instructions", "cycles"), or NULL when the board has no counter. */
extern const char *const platform_counter_name;
uint64_t platform_counter(void);

/* Deepest stack use and heap taken so far, in bytes; 0 where the board cannot tell. */
uint32_t platform_stack_peak(void);
uint32_t platform_heap_peak(void);

/* The dataset, read by byte offset. The pointer is valid until the next read (a board with the data in
 * flash returns a pointer into it, so it needs no RAM copy); NULL when the data is shorter or unreadable. */
int platform_data_open(const char *path);
const void *platform_data_read(uint32_t offset, uint32_t bytes);
/* The same, for image rows: bytes that must be copied are copied into `dst` (the model's own window of rows, so no
 * image-sized buffer is needed); data in flash is returned in place. */
const void *platform_data_read_to(uint32_t offset, uint32_t bytes, void *dst);

/* Output file out_dir/name: a host file through stdio or semihosting; a real board streams it on its serial line. */
void *platform_out_open(const char *out_dir, const char *name);
int platform_out_write(void *out, const void *data, uint32_t bytes);
int platform_out_close(void *out);

#endif
