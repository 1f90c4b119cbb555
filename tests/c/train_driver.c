/* Test driver: a few training steps and a forward pass through a compiled
 * model library, so the whole native path can run under valgrind. Needs the
 * header (-include) of a digits model (the MLP or the CNN: both read 64
 * floats an image and predict 10 classes); an odd batch exercises every tail
 * (-DBATCH=n for another). -DFIRST_MODE=m starts at training mode m: every mode
 * runs the same forward and backward kernels, so a large model may run one
 * mode (its kernels under memcheck) while a small one runs every update. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef BATCH
#define BATCH 13
#endif
#ifndef FIRST_MODE
#define FIRST_MODE 0
#endif

static void *aligned(size_t bytes) {
    size_t rounded = (bytes + 63) / 64 * 64;
    return aligned_alloc(64, rounded ? rounded : 64);
}

int main(void) {
    float *params = aligned(SC_PARAM_SIZE * sizeof(float));
    float *grads = aligned(SC_PARAM_SIZE * sizeof(float));
    float *state = aligned(SC_STATE_SIZE * sizeof(float));
    memcpy(params, sc_default_params(), SC_PARAM_SIZE * sizeof(float));
    memset(grads, 0, SC_PARAM_SIZE * sizeof(float));
    memset(state, 0, SC_STATE_SIZE * sizeof(float));
    float *x = aligned(BATCH * 64 * sizeof(float));
    int32_t *y = aligned(BATCH * sizeof(int32_t));
    for (int i = 0; i < BATCH * 64; i++) x[i] = (float)((i * 37) % 17) / 16.0f;
    for (int i = 0; i < BATCH; i++) y[i] = i % 10;
    int64_t dims[SC_N_DIMS] = {BATCH};
    size_t ws_bytes = (size_t)sc_train_workspace(dims);
    if ((size_t)sc_forward_workspace(dims) > ws_bytes) ws_bytes = (size_t)sc_forward_workspace(dims);
    void *ws = aligned(ws_bytes);
    float hyper[SC_N_HYPER] = {0.05f, 0.9f, 0.9f, 0.999f, 1e-8f, 0.05f, 1.0f, 0.0f};
    float loss = 0, probs[BATCH * 10];
    void *inputs[] = {x, y}, *outputs[] = {&loss};
    for (int mode = FIRST_MODE; mode <= 3; mode++) {
        if (sc_train(params, grads, state, ws, inputs, outputs, dims, hyper, mode) != 0) return 1;
        printf("mode %d loss %.6f\n", mode, loss);
    }
    void *fout[] = {probs};
    if (sc_forward(params, NULL, NULL, ws, inputs, fout, dims, NULL, 0) != 0) return 1;
    printf("p00 %.6f\n", probs[0]);
    free(ws); free(x); free(y); free(params); free(grads); free(state);
    return 0;
}
