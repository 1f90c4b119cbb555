/* Inference with a compiled structc model from C, no Python involved.
 *
 *   structc train examples/digits_mlp.snet --data digits --out digits.npz
 *   structc compile examples/digits_mlp.snet -o digits.so -H digits.h --params digits.npz
 *   cc -O2 -I. examples/c/digits_infer.c digits.so -Wl,-rpath,'$ORIGIN' -o digits_infer
 *   ./digits_infer < image.txt      (64 pixel values in [0, 1]; without input, a built-in "0")
 *
 * The library records its own file name (its soname), and the rpath $ORIGIN makes the
 * program look for it in the program's folder, so it runs from any working directory as
 * long as the two stay together (or link with -Wl,-rpath,/folder/of/the/library).
 * The generated digits.so, digits.h, digits.npz and digits_infer are ignored by git.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "digits.h"

/* An 8x8 zero from the digits data set, pixels scaled to [0, 1]. */
static const float zero[64] = {
    0, 0, .3125f, .8125f, .5625f, .0625f, 0, 0,   0, 0, .8125f, .9375f, .625f, .9375f, .3125f, 0,
    0, .1875f, .9375f, .125f, 0, .6875f, .5f, 0,  0, .25f, .75f, 0, 0, .5f, .5f, 0,
    0, .3125f, .5f, 0, 0, .5625f, .5f, 0,         0, .25f, .6875f, 0, .0625f, .75f, .4375f, 0,
    0, .125f, .875f, .3125f, .625f, .75f, 0, 0,   0, 0, .375f, .8125f, .625f, 0, 0, 0,
};

static void *aligned(size_t bytes) {
    size_t rounded = (bytes + 63) / 64 * 64;
    return aligned_alloc(64, rounded ? rounded : 64);
}

int main(void) {
    float x[64];
    memcpy(x, zero, sizeof x);
    for (int i = 0; i < 64; i++)
        if (scanf("%f", &x[i]) != 1) { if (i) { fprintf(stderr, "expected 64 values, got %d\n", i); return 2; } break; }

    const float *trained = sc_default_params();
    if (!trained) { fprintf(stderr, "the library has no parameters built in (compile with --params)\n"); return 2; }
    float *params = aligned(SC_PARAM_SIZE * sizeof(float));
    memcpy(params, trained, SC_PARAM_SIZE * sizeof(float));

    int64_t dims[SC_N_DIMS] = {1};                 /* N = 1 image */
    int64_t bytes = sc_forward_workspace(dims);   /* -1: these dims overflow the size computation */
    if (bytes < 0) {
        fprintf(stderr, "workspace size overflows for these dims\n");
        return 1;
    }
    void *workspace = aligned((size_t)bytes);
    if (workspace == NULL) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    float probs[10];
    void *inputs[] = {x};
    void *outputs[] = {probs};
    if (sc_forward(params, NULL, NULL, workspace, inputs, outputs, dims, NULL, 0) != 0) {
        fprintf(stderr, "forward failed\n");
        return 1;
    }
    int best = 0;
    for (int k = 0; k < 10; k++) {
        printf("%.6f%c", probs[k], k == 9 ? '\n' : ' ');
        if (probs[k] > probs[best]) best = k;
    }
    printf("digit %d\n", best);
    free(workspace);
    free(params);
    return 0;
}
