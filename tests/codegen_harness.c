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
  for (int32_t i = 0; i < n; i++) {
    if (tinytrain_train_step(images[i], labels[i], &loss) != 0) return 3;
    fwrite(&loss, sizeof loss, 1, out);
    write_params(out);
  }
  for (int32_t i = 0; i < n; i++) {
    float logits[TINYTRAIN_NUM_CLASSES];
    if (tinytrain_infer(images[i], logits) != 0) return 3;
    fwrite(logits, sizeof logits[0], TINYTRAIN_NUM_CLASSES, out);
  }
  return fclose(out) == 0 ? 0 : 2;
}
