/* Stand-in model: logits = W * mean(channels) / 128 + b, squared-error loss against the one-hot label, SGD on W and b.
 * Squared error rather than softmax cross-entropy keeps it free of exp/log, whose libm versions differ between the
 * host and newlib; with -ffp-contract=off every board then computes the same float32 weights bit for bit. */
#include "tinytrain_model.h"

#include <string.h>

#define C TINYTRAIN_INPUT_C
#define K TINYTRAIN_NUM_CLASSES
#define HW (TINYTRAIN_INPUT_H * TINYTRAIN_INPUT_W)

/* Initial values live in flash; tinytrain_init copies them to the RAM copies that training updates. */
static const float initial_weight[K][C] = {{0.1f, -0.2f, 0.05f}, {-0.1f, 0.15f, 0.0f}, {0.2f, 0.1f, -0.1f}, {0.0f, -0.05f, 0.1f}};
static const float initial_bias[K] = {0.05f, -0.05f, 0.0f, 0.1f};
static float weight[K][C], bias[K];

const tinytrain_param_t tinytrain_params[TINYTRAIN_NUM_TRAINABLE] = {
    {"fc.weight", weight, sizeof weight, "float32"},
    {"fc.bias", bias, sizeof bias, "float32"},
};

/* The arena: features and logits of the current image. */
static struct {
    float features[C];
    float logits[K];
} arena;

static float learning_rate = 0.05f;

int tinytrain_init(void) {
    memcpy(weight, initial_weight, sizeof weight);
    memcpy(bias, initial_bias, sizeof bias);
    return 0;
}

void tinytrain_set_lr(float lr) { learning_rate = lr; }

/* Reads the image one row at a time, as a generated model that streams its input does. */
static int forward(tinytrain_row_reader_t read, void *ctx) {
    int8_t row[TINYTRAIN_INPUT_W];
    for (int c = 0; c < C; c++) {
        int32_t sum = 0;
        for (int r = 0; r < TINYTRAIN_INPUT_H; r++) {
            if (read(ctx, c, r, row) != 0) return -1;
            for (int i = 0; i < TINYTRAIN_INPUT_W; i++) sum += row[i];
        }
        arena.features[c] = (float)sum / (float)(128 * HW);
    }
    for (int k = 0; k < K; k++) {
        float acc = bias[k];
        for (int c = 0; c < C; c++) acc += weight[k][c] * arena.features[c];
        arena.logits[k] = acc;
    }
    return 0;
}

int tinytrain_infer_rows(tinytrain_row_reader_t read, void *ctx, float *logits) {
    if (forward(read, ctx) != 0) return 2;
    memcpy(logits, arena.logits, sizeof arena.logits);
    return 0;
}

int tinytrain_train_step_rows(tinytrain_row_reader_t read, void *ctx, int32_t label, float *loss) {
    if (label < 0 || label >= K) return 1;
    if (forward(read, ctx) != 0) return 2;
    float total = 0.0f;
    for (int k = 0; k < K; k++) {
        float grad = arena.logits[k] - (k == label ? 1.0f : 0.0f);
        total += 0.5f * grad * grad;
        bias[k] -= learning_rate * grad;
        for (int c = 0; c < C; c++) weight[k][c] -= learning_rate * grad * arena.features[c];
    }
    *loss = total;
    return 0;
}

static int image_rows(void *ctx, int32_t channel, int32_t row, int8_t *dst) {
    memcpy(dst, (const int8_t *)ctx + (channel * TINYTRAIN_INPUT_H + row) * TINYTRAIN_INPUT_W, TINYTRAIN_INPUT_W);
    return 0;
}

int tinytrain_infer(const int8_t *input, float *logits) { return tinytrain_infer_rows(image_rows, (void *)input, logits); }

int tinytrain_train_step(const int8_t *input, int32_t label, float *loss) {
    return tinytrain_train_step_rows(image_rows, (void *)input, label, loss);
}
