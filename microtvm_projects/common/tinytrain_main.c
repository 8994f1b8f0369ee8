/* The training program every board runs: tinytrain data.bin steps out_dir [lr|-] [eval_count]
 *
 * Reads a TTDS dataset, measures accuracy on its first eval_count records, trains `steps` steps cycling
 * through the records (batch 1), measures accuracy again and writes out_dir/log.json and out_dir/weights.bin
 * (the trainable parameters concatenated in tinytrain_params order). Exit codes: 0 ok, 1 I/O or data error
 * during the run, 2 bad arguments or a dataset that does not fit the model. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "platform.h"
#include "tinytrain_model.h"

#define HEADER_BYTES 20u
#define RECORD_BYTES (4u + TINYTRAIN_INPUT_BYTES)

static uint32_t record_count;

/* A whole decimal number, or -1. */
static int parse_count(const char *text, uint32_t *value) {
    char *end;
    unsigned long long v = strtoull(text, &end, 10);
    if (end == text || *end != '\0' || text[0] == '-' || v > UINT32_MAX) return -1;
    *value = (uint32_t)v;
    return 0;
}

static uint32_t read_u32(const uint8_t *p) { return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

static int open_dataset(const char *path) {
    if (platform_data_open(path) != 0) {
        fprintf(stderr, "tinytrain: cannot open dataset %s\n", path);
        return 2;
    }
    const uint8_t *h = platform_data_read(0, HEADER_BYTES);
    if (h == NULL || memcmp(h, "TTDS", 4) != 0 || read_u32(h + 4) != 1) {
        fprintf(stderr, "tinytrain: %s is not a TTDS version 1 dataset\n", path);
        return 2;
    }
    record_count = read_u32(h + 8);
    uint32_t image_bytes = read_u32(h + 12), num_classes = read_u32(h + 16);
    if (image_bytes != TINYTRAIN_INPUT_BYTES || num_classes != TINYTRAIN_NUM_CLASSES) {
        fprintf(stderr, "tinytrain: %s has %lu-byte images and %lu classes; the model takes %lu-byte images (%dx%dx%d) and %d classes\n", path,
                (unsigned long)image_bytes, (unsigned long)num_classes, (unsigned long)TINYTRAIN_INPUT_BYTES, TINYTRAIN_INPUT_C, TINYTRAIN_INPUT_H,
                TINYTRAIN_INPUT_W, TINYTRAIN_NUM_CLASSES);
        return 2;
    }
    if (record_count == 0) {
        fprintf(stderr, "tinytrain: %s has no records\n", path);
        return 2;
    }
    if (record_count > (UINT32_MAX - HEADER_BYTES) / RECORD_BYTES ||
        platform_data_read(HEADER_BYTES + record_count * RECORD_BYTES - 1, 1) == NULL) {
        fprintf(stderr, "tinytrain: %s is shorter than the %lu records its header announces\n", path, (unsigned long)record_count);
        return 2;
    }
    return 0;
}

/* The row reader of a record: ctx points to the byte offset of its image in the dataset.  On a board whose dataset
 * is in flash the rows are copied from there; elsewhere each row is read from the file when the step needs it, so no
 * image-sized buffer is needed when the model streams its input (TINYTRAIN_STREAMS_INPUT). */
static int read_image_row(void *ctx, int32_t channel, int32_t row, int8_t *dst) {
    uint32_t offset = *(const uint32_t *)ctx + ((uint32_t)channel * TINYTRAIN_INPUT_H + (uint32_t)row) * TINYTRAIN_INPUT_W;
    const void *src = platform_data_read_to(offset, TINYTRAIN_INPUT_W, dst);
    if (src == NULL) return -1;
    if (src != dst) memcpy(dst, src, TINYTRAIN_INPUT_W);
    return 0;
}

/* Record i: its label, and the offset of its image for read_image_row; -1 (after a message) on a read error. */
static int read_record(uint32_t i, int32_t *label, uint32_t *image_offset) {
    uint32_t offset = HEADER_BYTES + i * RECORD_BYTES;
    const uint8_t *r = platform_data_read(offset, 4);
    if (r == NULL) {
        fprintf(stderr, "tinytrain: cannot read record %lu of %lu\n", (unsigned long)i, (unsigned long)record_count);
        return -1;
    }
    *label = (int32_t)read_u32(r);
    *image_offset = offset + 4;
    return 0;
}

static void report_image_error(uint32_t i) {
    fprintf(stderr, "tinytrain: cannot read the image of record %lu of %lu\n", (unsigned long)i, (unsigned long)record_count);
}

/* Correct predictions (argmax, first index on ties) on the first `count` records; -1 on a read error. */
static int32_t count_correct(uint32_t count) {
    float logits[TINYTRAIN_NUM_CLASSES];
    int32_t correct = 0;
    for (uint32_t i = 0; i < count; i++) {
        int32_t label;
        uint32_t image;
        if (read_record(i, &label, &image) != 0) return -1;
        if (tinytrain_infer_rows(read_image_row, &image, logits) != 0) {
            report_image_error(i);
            return -1;
        }
        int32_t best = 0;
        for (int32_t k = 1; k < TINYTRAIN_NUM_CLASSES; k++)
            if (logits[k] > logits[best]) best = k;
        correct += best == label;
    }
    return correct;
}

/* log.json is written while training runs, so the log needs no RAM per step; a failed write is reported at the end. */
static void *log_file;
static int log_failed;

static void log_printf(const char *fmt, ...) {
    char line[128]; /* every call writes less: one key and one number, or a short string */
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof line || platform_out_write(log_file, line, (uint32_t)n) != 0) log_failed = 1;
}

/* newlib-nano's printf has no %llu, and counts of a real model's step can pass 2^32. */
static void log_u64(uint64_t v) {
    char digits[21];
    int i = sizeof digits - 1;
    digits[i] = '\0';
    do {
        digits[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    log_printf("%s", digits + i);
}

static void log_accuracy(const char *key, int32_t correct, uint32_t count) {
    if (count == 0)
        log_printf(",\n \"%s\": null", key);
    else
        log_printf(",\n \"%s\": %.9g", key, (double)correct / count);
}

static int write_weights(const char *out_dir) {
    void *out = platform_out_open(out_dir, "weights.bin");
    if (out == NULL) return -1;
    for (int i = 0; i < TINYTRAIN_NUM_TRAINABLE; i++)
        if (platform_out_write(out, tinytrain_params[i].data, tinytrain_params[i].bytes) != 0) return -1;
    return platform_out_close(out);
}

int main(int argc, char **argv) {
    platform_init();
#ifdef TINYTRAIN_TEST_HANG /* tests: a program that never ends must come back as a timeout */
    for (volatile int spin = 1; spin;) {
    }
#endif
#ifdef TINYTRAIN_TEST_FAULT /* tests: an access to an unmapped address must come back as a reported fault */
    (void)*(volatile uint32_t *)(TINYTRAIN_TEST_FAULT);
#endif
    uint32_t steps = 0, eval_count = 0;
    char *lr_end = NULL;
    /* strtod then a cast rounds the same on every libc (strtof can round differently from strtod + cast). */
    int has_lr = argc > 4 && strcmp(argv[4], "-") != 0;
    float lr = has_lr ? (float)strtod(argv[4], &lr_end) : 0.0f;
    if (argc < 4 || argc > 6 || parse_count(argv[2], &steps) != 0 || (has_lr && (lr_end == argv[4] || *lr_end != '\0')) ||
        (argc > 5 && parse_count(argv[5], &eval_count) != 0)) {
        fprintf(stderr, "usage: tinytrain data.bin steps out_dir [lr|-] [eval_count]\n");
        return 2;
    }
    const char *out_dir = argv[3];

    int rc = open_dataset(argv[1]);
    if (rc != 0) return rc;
    if (eval_count > record_count) eval_count = record_count;
    if (tinytrain_init() != 0) {
        fprintf(stderr, "tinytrain: tinytrain_init failed\n");
        return 1;
    }
    if (has_lr) tinytrain_set_lr(lr);
    log_file = platform_out_open(out_dir, "log.json");
    if (log_file == NULL) {
        fprintf(stderr, "tinytrain: cannot write %s/log.json\n", out_dir);
        return 1;
    }

    log_printf("{\"format\": 1, \"steps\": %lu, \"records\": %lu,", (unsigned long)steps, (unsigned long)record_count);
    log_printf(" \"eval_count\": %lu, \"counter\": ", (unsigned long)eval_count);
    if (platform_counter_name)
        log_printf("\"%s\"", platform_counter_name);
    else
        log_printf("null");
    int32_t correct = count_correct(eval_count);
    if (correct < 0) return 1;
    log_accuracy("accuracy_before", correct, eval_count);

    log_printf(",\n \"step_log\": [");
#ifdef TINYTRAIN_PROFILE
    tinytrain_profile_clock = platform_counter_name ? platform_counter : NULL;  /* the training steps only */
#endif
    for (uint32_t s = 0; s < steps; s++) {
        int32_t label;
        uint32_t image;
        if (read_record(s % record_count, &label, &image) != 0) return 1;
        float loss;
        uint64_t start = platform_counter();
        int step_rc = tinytrain_train_step_rows(read_image_row, &image, label, &loss);
        uint64_t spent = platform_counter() - start;
        if (step_rc == 2) {
            report_image_error(s % record_count);
            return 1;
        }
        if (step_rc != 0) {
            fprintf(stderr, "tinytrain: record %lu: label %ld is not in 0..%d\n", (unsigned long)(s % record_count), (long)label, TINYTRAIN_NUM_CLASSES - 1);
            return 1;
        }
        /* %.9g: enough digits to read the float32 back bit for bit. */
        log_printf("%s\n  {\"loss\": %.9g", s ? "," : "", (double)loss);
        if (platform_counter_name) {
            log_printf(", \"%s\": ", platform_counter_name);
            log_u64(spent);
        }
        log_printf("}");
    }
    log_printf("]");
#ifdef TINYTRAIN_PROFILE
    tinytrain_profile_clock = NULL;
    log_printf(",\n \"profile\": {");  /* counter units spent in each kernel kind, summed over the steps */
    for (int k = 0; k < TINYTRAIN_PROFILE_OPS; k++) {
        log_printf("%s\"%s\": ", k ? ", " : "", tinytrain_profile_ops[k]);
        log_u64(tinytrain_profile_counts[k]);
    }
    log_printf("}");
#endif

    correct = count_correct(eval_count);
    if (correct < 0) return 1;
    log_accuracy("accuracy_after", correct, eval_count);
    if (write_weights(out_dir) != 0) {
        fprintf(stderr, "tinytrain: cannot write %s/weights.bin\n", out_dir);
        return 1;
    }
    /* Last, so that they include writing the outputs. */
    log_printf(",\n \"stack_peak_bytes\": %lu, \"heap_peak_bytes\": %lu}\n", (unsigned long)platform_stack_peak(), (unsigned long)platform_heap_peak());
    if (platform_out_close(log_file) != 0 || log_failed) {
        fprintf(stderr, "tinytrain: cannot write %s/log.json\n", out_dir);
        return 1;
    }
    printf("tinytrain: %lu steps done\n", (unsigned long)steps);
    return 0;
}
