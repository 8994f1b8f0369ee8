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
static int8_t input_buffer[TINYTRAIN_INPUT_BYTES];

int8_t *tinytrain_input_buffer(void) { return input_buffer; }

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

static void forward(const int8_t *input) {
    for (int c = 0; c < C; c++) {
        int32_t sum = 0;
        for (int i = 0; i < HW; i++) sum += input[c * HW + i];
        arena.features[c] = (float)sum / (float)(128 * HW);
    }
    for (int k = 0; k < K; k++) {
        float acc = bias[k];
        for (int c = 0; c < C; c++) acc += weight[k][c] * arena.features[c];
        arena.logits[k] = acc;
    }
}

int tinytrain_infer(const int8_t *input, float *logits) {
    forward(input);
    memcpy(logits, arena.logits, sizeof arena.logits);
    return 0;
}

int tinytrain_train_step(const int8_t *input, int32_t label, float *loss) {
    if (label < 0 || label >= K) return 1;
    forward(input);
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
