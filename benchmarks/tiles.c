/* What register tile a matmul could use on this core: GFLOP/s of whole
 * products C[M, N] = A[M, K] B[K, N] made of one tile shape (rows x 16-float
 * vectors), with B read as structc reads it (row-major rows of N) or packed
 * in contiguous panels of the tile's width. AVX-512 intrinsics; not part of
 * structc (benchmarks/RESULTS.md, stop 25, has what it measured).
 *
 *     gcc -O3 -march=native -o /tmp/tiles benchmarks/tiles.c && /tmp/tiles 264 128 384
 *
 * Each shape's M and N are rounded down to whole tiles; best of 7 runs of 200
 * products, after 2 rounds of warm-up. */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* One MR x NV tile: C[MR, 16 NV] = A[MR, K] B[K, 16 NV], B's rows ldb apart. */
#define TILE(MR, NV)                                                                             \
    static void tile_##MR##x##NV(const float *A, int lda, const float *B, int ldb, float *C, int ldc, \
                                 int K) {                                                        \
        __m512 acc[MR][NV];                                                                      \
        for (int r = 0; r < MR; r++)                                                             \
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();                        \
        for (int k = 0; k < K; k++) {                                                            \
            __m512 b[NV];                                                                        \
            for (int v = 0; v < NV; v++) b[v] = _mm512_loadu_ps(B + (size_t)k * ldb + 16 * v);   \
            for (int r = 0; r < MR; r++) {                                                       \
                __m512 a = _mm512_set1_ps(A[(size_t)r * lda + k]);                               \
                for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);    \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < MR; r++)                                                             \
            for (int v = 0; v < NV; v++) _mm512_storeu_ps(C + (size_t)r * ldc + 16 * v, acc[r][v]); \
    }

TILE(12, 2)
TILE(14, 2)
TILE(8, 3)
TILE(9, 3)
TILE(6, 4)
TILE(7, 4)

typedef void (*tile_fn)(const float *, int, const float *, int, float *, int, int);
static const struct { tile_fn fn; int rows, cols; const char *name; } TILES[] = {
    {tile_12x2, 12, 32, "12x2"}, {tile_14x2, 14, 32, "14x2"}, {tile_8x3, 8, 48, "8x3"},
    {tile_9x3, 9, 48, "9x3"}, {tile_6x4, 6, 64, "6x4"}, {tile_7x4, 7, 64, "7x4"},
};
#define N_TILES (int)(sizeof TILES / sizeof TILES[0])

/* The product, panel by panel of columns, tile by tile of rows down each panel. */
static void product(int t, int packed, const float *A, const float *B, const float *panels, float *C,
                    int M, int K, int N) {
    int mr = TILES[t].rows, nr = TILES[t].cols;
    for (int p = 0; p < N / nr; p++) {
        const float *b = packed ? panels + (size_t)p * K * nr : B + p * nr;
        for (int i = 0; i + mr <= M; i += mr)
            TILES[t].fn(A + (size_t)i * K, K, b, packed ? nr : N, C + (size_t)i * N + p * nr, N, K);
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s M K N\n", argv[0]);
        return 2;
    }
    int M = atoi(argv[1]), K = atoi(argv[2]), N = atoi(argv[3]);
    if (M < 1 || K < 1 || N < 64) {
        fprintf(stderr, "M and K must be positive, N at least 64\n");
        return 2;
    }
    float *A = aligned_alloc(64, sizeof(float) * M * K), *B = aligned_alloc(64, sizeof(float) * K * N);
    float *C = aligned_alloc(64, sizeof(float) * M * N), *panels[N_TILES];
    for (int i = 0; i < M * K; i++) A[i] = rand() / (float)RAND_MAX;
    for (int i = 0; i < K * N; i++) B[i] = rand() / (float)RAND_MAX;
    for (int t = 0; t < N_TILES; t++) {     /* B in contiguous panels of the tile's width */
        int nr = TILES[t].cols;
        panels[t] = aligned_alloc(64, sizeof(float) * K * N);
        for (int p = 0; p < N / nr; p++)
            for (int k = 0; k < K; k++)
                memcpy(panels[t] + (size_t)p * K * nr + (size_t)k * nr, B + (size_t)k * N + p * nr, nr * 4);
    }
    for (int round = 0; round < 3; round++)
        for (int t = 0; t < N_TILES; t++)
            for (int packed = 0; packed < 2; packed++) {
                int mr = TILES[t].rows, nr = TILES[t].cols, m = M / mr * mr, n = N / nr * nr;
                double best = 1e9;
                for (int run = 0; run < 7; run++) {
                    double t0 = now();
                    for (int q = 0; q < 200; q++) product(t, packed, A, B, panels[t], C, M, K, N);
                    double dt = (now() - t0) / 200;
                    if (dt < best) best = dt;
                }
                if (round == 2)
                    printf("%-5s %-8s %7.1f GFLOP/s (%d x %d x %d)\n", TILES[t].name,
                           packed ? "packed" : "as is", 2.0 * m * K * n / best / 1e9, m, K, n);
            }
    return 0;
}
