/* Test driver: gradient-only calls of a dropout model's sc_train with hyper's
 * dropout slots left zero, as a C caller writes them: the library must draw
 * new masks each call (its own key and step count). Needs the header
 * (-include) of a model reading 64 floats an example and 10 classes
 * (examples/digits_dropout.snet) built with its parameters. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BATCH 5

static void *aligned(size_t bytes) {
    size_t rounded = (bytes + 63) / 64 * 64;
    return aligned_alloc(64, rounded ? rounded : 64);
}

int main(void) {
    float *params = aligned(SC_PARAM_SIZE * sizeof(float));
    float *grads = aligned(SC_PARAM_SIZE * sizeof(float));
    float *state = aligned(SC_STATE_SIZE * sizeof(float));
    if (sc_default_params() == NULL) return 2;
    memcpy(params, sc_default_params(), SC_PARAM_SIZE * sizeof(float));
    memset(state, 0, SC_STATE_SIZE * sizeof(float));
    float *x = aligned(BATCH * 64 * sizeof(float));
    int32_t *y = aligned(BATCH * sizeof(int32_t));
    for (int i = 0; i < BATCH * 64; i++) x[i] = (float)((i * 37) % 17) / 16.0f;
    for (int i = 0; i < BATCH; i++) y[i] = i % 10;
    int64_t dims[SC_N_DIMS] = {BATCH};
    void *ws = aligned((size_t)sc_train_workspace(dims));
    float hyper[SC_N_HYPER] = {0.05f};        /* the dropout slots stay zero */
    float loss = 0;
    void *inputs[] = {x, y}, *outputs[] = {&loss};
    for (int k = 0; k < 3; k++) {
        if (sc_train(params, grads, state, ws, inputs, outputs, dims, hyper, 0) != 0) return 1;
        printf("loss %.9g\n", loss);
    }
    printf("steps %u\n", sc_dropout_step());
    sc_set_dropout_step(1);                   /* as a resumed run restores it: the second call again */
    if (sc_train(params, grads, state, ws, inputs, outputs, dims, hyper, 0) != 0) return 1;
    printf("again %.9g\n", loss);
    free(ws); free(x); free(y); free(params); free(grads); free(state);
    return 0;
}
