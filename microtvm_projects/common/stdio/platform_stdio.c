/* Dataset and output files through C stdio: native files on the host, host files through semihosting on QEMU. */
#include <stdio.h>

#include "platform.h"
#include "tinytrain_model.h"

/* The 20-byte header or a 4-byte label; image rows are read straight into the model's window. */
#define BUFFER_BYTES 20u

static FILE *dataset;
static uint8_t buffer[BUFFER_BYTES];

int platform_data_open(const char *path) {
    dataset = fopen(path, "rb");
    /* Unbuffered: every read is one whole field or image row, and a stdio buffer would only cost heap on a board. */
    return dataset != NULL && setvbuf(dataset, NULL, _IONBF, 0) == 0 ? 0 : -1;
}

const void *platform_data_read_to(uint32_t offset, uint32_t bytes, void *dst) {
    if (fseek(dataset, (long)offset, SEEK_SET) != 0 || fread(dst, 1, bytes, dataset) != bytes) return NULL;
    return dst;
}

const void *platform_data_read(uint32_t offset, uint32_t bytes) {
    return bytes <= sizeof buffer ? platform_data_read_to(offset, bytes, buffer) : NULL;
}

void *platform_out_open(const char *out_dir, const char *name) {
    char path[512];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", out_dir, name) >= sizeof path) return NULL;
    FILE *f = fopen(path, "wb");
    if (f != NULL && setvbuf(f, NULL, _IONBF, 0) != 0) {
        fclose(f);
        return NULL;
    }
    return f;
}

int platform_out_write(void *out, const void *data, uint32_t bytes) { return fwrite(data, 1, bytes, out) == bytes ? 0 : -1; }

int platform_out_close(void *out) { return fclose(out) == 0 ? 0 : -1; }
