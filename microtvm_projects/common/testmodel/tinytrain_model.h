/* Stand-in for a generated model (tests only): a linear classifier over the mean of each input channel. */
#ifndef TINYTRAIN_MODEL_H
#define TINYTRAIN_MODEL_H

#include <stdint.h>

#define TINYTRAIN_INPUT_C 3
#define TINYTRAIN_INPUT_H 8
#define TINYTRAIN_INPUT_W 8
#define TINYTRAIN_INPUT_BYTES (TINYTRAIN_INPUT_C * TINYTRAIN_INPUT_H * TINYTRAIN_INPUT_W)
#define TINYTRAIN_NUM_CLASSES 4
#define TINYTRAIN_ARENA_BYTES ((TINYTRAIN_INPUT_C + TINYTRAIN_NUM_CLASSES) * 4)
#define TINYTRAIN_TRAINABLE_BYTES ((TINYTRAIN_NUM_CLASSES * TINYTRAIN_INPUT_C + TINYTRAIN_NUM_CLASSES) * 4)
#define TINYTRAIN_NUM_TRAINABLE 2

typedef struct {
    const char *name;
    void *data;
    uint32_t bytes;
    const char *dtype;
} tinytrain_param_t;

extern const tinytrain_param_t tinytrain_params[TINYTRAIN_NUM_TRAINABLE];

int tinytrain_init(void);
void tinytrain_set_lr(float lr);
typedef int (*tinytrain_row_reader_t)(void *ctx, int32_t channel, int32_t row, int8_t *dst);
#define TINYTRAIN_STREAMS_INPUT 1

int tinytrain_train_step_rows(tinytrain_row_reader_t read, void *ctx, int32_t label, float *loss);
int tinytrain_infer_rows(tinytrain_row_reader_t read, void *ctx, float *logits);
int tinytrain_train_step(const int8_t *input, int32_t label, float *loss);
int tinytrain_infer(const int8_t *input, float *logits);

#endif
