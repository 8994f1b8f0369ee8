/* Host driver for the generated C training step (tests/test_codegen.py).
 *
 * usage: harness IN OUT [LR]
 *   IN:  int32 n, then n records of (int8 image[TINYTRAIN_INPUT_BYTES], int32 label)
 *   OUT: per step: float32 loss, then every trainable parameter as (name, NUL, uint32 bytes, data);
 *        then, after the last step, float32 logits[TINYTRAIN_NUM_CLASSES] of every image
 *   LR:  optional learning rate (C99 hex float, exact), set with tinytrain_set_lr
 * Exit codes: 0 ok, 2 usage or I/O, 3 API contract broken.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tinytrain_model.h"

#define MAX_IMAGES 8

static int8_t images[MAX_IMAGES][TINYTRAIN_INPUT_BYTES];
static int32_t labels[MAX_IMAGES];

static int read_input(const char *path, int32_t *n) {
  FILE *f = fopen(path, "rb");
  if (!f) return 0;
  int ok = fread(n, sizeof *n, 1, f) == 1 && *n >= 0 && *n <= MAX_IMAGES;
  for (int32_t i = 0; ok && i < *n; i++) {
    ok = fread(images[i], 1, TINYTRAIN_INPUT_BYTES, f) == TINYTRAIN_INPUT_BYTES && fread(&labels[i], sizeof labels[i], 1, f) == 1;
  }
  fclose(f);
  return ok;
}

/* A row reader over one of the images that fails at row fail_row (-1: never) and notes any row it should not be asked for. */
typedef struct {
  const int8_t *image;
  int32_t fail_row;
  int bad_request;
} rows_ctx;

static int read_row(void *ctx, int32_t channel, int32_t row, int8_t *dst) {
  rows_ctx *r = ctx;
  if (channel < 0 || channel >= TINYTRAIN_INPUT_C || row < 0 || row >= TINYTRAIN_INPUT_H) {
    r->bad_request = 1;
    return -1;
  }
  if (row == r->fail_row) return -1;
  memcpy(dst, r->image + ((size_t)channel * TINYTRAIN_INPUT_H + row) * TINYTRAIN_INPUT_W, TINYTRAIN_INPUT_W);
  return 0;
}

/* Whether the trainable parameters still equal `saved` (their bytes concatenated). */
static int params_equal(const uint8_t *saved) {
  for (int i = 0; i < TINYTRAIN_NUM_TRAINABLE; i++) {
    if (memcmp(saved, tinytrain_params[i].data, tinytrain_params[i].bytes) != 0) return 0;
    saved += tinytrain_params[i].bytes;
  }
  return 1;
}

static uint8_t initial[TINYTRAIN_TRAINABLE_BYTES];

static void write_params(FILE *out) {
  for (int i = 0; i < TINYTRAIN_NUM_TRAINABLE; i++) {
    const tinytrain_param_t *p = &tinytrain_params[i];
    fwrite(p->name, 1, strlen(p->name) + 1, out);
    fwrite(&p->bytes, sizeof p->bytes, 1, out);
    fwrite(p->data, 1, p->bytes, out);
  }
}

int main(int argc, char **argv) {
  int32_t n;
  if (argc < 3 || !read_input(argv[1], &n)) {
    fprintf(stderr, "usage: %s IN OUT [LR]\n", argv[0]);
    return 2;
  }
  FILE *out = fopen(argv[2], "wb");
  if (!out || tinytrain_init() != 0) return 2;
  if (argc > 3) tinytrain_set_lr(strtof(argv[3], NULL));
  float loss = 0.0f;
  if (tinytrain_train_step(images[0], TINYTRAIN_NUM_CLASSES, &loss) != 1 || tinytrain_train_step(images[0], -1, &loss) != 1) {
    fprintf(stderr, "a label out of range must return 1\n");
    return 3;
  }
  uint8_t *p = initial;
  for (int i = 0; i < TINYTRAIN_NUM_TRAINABLE; p += tinytrain_params[i].bytes, i++) memcpy(p, tinytrain_params[i].data, tinytrain_params[i].bytes);
  rows_ctx failing = {images[0], TINYTRAIN_INPUT_H - 1, 0};
  if (n > 0 && (tinytrain_train_step_rows(read_row, &failing, labels[0], &loss) != 2 || !params_equal(initial))) {
    fprintf(stderr, "a failing row reader must return 2 and leave the parameters as they were\n");
    return 3;
  }
  /* Even steps read the image in place, odd ones through a row reader: the same training either way. */
  for (int32_t i = 0; i < n; i++) {
    rows_ctx reader = {images[i], -1, 0};
    int rc = i % 2 ? tinytrain_train_step_rows(read_row, &reader, labels[i], &loss) : tinytrain_train_step(images[i], labels[i], &loss);
    if (rc != 0 || reader.bad_request || failing.bad_request) return 3;
    fwrite(&loss, sizeof loss, 1, out);
    write_params(out);
  }
  for (int32_t i = 0; i < n; i++) {
    float logits[TINYTRAIN_NUM_CLASSES];
    rows_ctx reader = {images[i], -1, 0};
    if ((i % 2 ? tinytrain_infer_rows(read_row, &reader, logits) : tinytrain_infer(images[i], logits)) != 0 || reader.bad_request) return 3;
    fwrite(logits, sizeof logits[0], TINYTRAIN_NUM_CLASSES, out);
  }
  return fclose(out) == 0 ? 0 : 2;
}
