/* What two workers can do for the Jacobi workload of `gallocy-bench workloads` on this machine,
 * without any DSM: the same 5-point sweep of an N x N double grid (N = 2048, 100 sweeps, two
 * grids that swap), its rows split in blocks among T threads of one process that each first
 * touch their own rows, with a pthread barrier after every sweep. T = 1 is the sequential time.
 * The ratio of the T = 2 time to the T = 1 time is the best a 2-rank job can reach here (both
 * workers share the memory bandwidth and the two vCPUs).
 *
 *   gcc -O2 -pthread -o jacobi-threads jacobi-threads.c
 *   for i in 1 2 3 4 5; do ./jacobi-threads 1; ./jacobi-threads 2; done
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { N = 2048, SWEEPS = 100 };
static int threads;
static double *grid_a, *grid_b;
static pthread_barrier_t sweep_done;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void sweep(const double *src, double *dst, int first, int end) {
    for (int i = first; i < end; i++) {
        if (i == 0 || i + 1 >= N)
            continue;
        const double *up = src + (size_t)(i - 1) * N, *mid = src + (size_t)i * N, *down = src + (size_t)(i + 1) * N;
        double *out = dst + (size_t)i * N;
        for (int j = 1; j < N - 1; j++)
            out[j] = 0.25 * ((up[j] + down[j]) + (mid[j - 1] + mid[j + 1]));
    }
}

static void *worker(void *arg) {
    long t = (long)arg;
    int first = N * t / threads, end = N * (t + 1) / threads;
    double *src = grid_a, *dst = grid_b;
    memset(src + (size_t)first * N, 0, (size_t)(end - first) * N * sizeof(double));
    memset(dst + (size_t)first * N, 0, (size_t)(end - first) * N * sizeof(double));
    for (int i = first; i < end; i++)
        src[(size_t)i * N] = dst[(size_t)i * N] = 1.0;
    pthread_barrier_wait(&sweep_done);
    for (int k = 0; k < SWEEPS; k++) {
        sweep(src, dst, first, end);
        pthread_barrier_wait(&sweep_done);
        double *x = src;
        src = dst;
        dst = x;
    }
    return NULL;
}

int main(int argc, char **argv) {
    threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1 || threads > 64)
        return fprintf(stderr, "usage: %s THREADS (1-64)\n", argv[0]), 2;
    grid_a = malloc((size_t)N * N * sizeof(double));
    grid_b = malloc((size_t)N * N * sizeof(double));
    pthread_barrier_init(&sweep_done, NULL, threads + 1);
    pthread_t tid[64];
    for (long t = 0; t < threads; t++)
        pthread_create(&tid[t], NULL, worker, (void *)t);
    pthread_barrier_wait(&sweep_done); /* set-up done */
    double t0 = now_ms();
    for (int k = 0; k < SWEEPS; k++)
        pthread_barrier_wait(&sweep_done);
    double t1 = now_ms();
    for (int t = 0; t < threads; t++)
        pthread_join(tid[t], NULL);
    printf("threads=%d %.1f ms\n", threads, t1 - t0);
    return 0;
}
