/* exitprog MODE [FAIL_RANK]
 *
 * Ends a joined job member while another of its threads is busy in the shared heap. Every rank
 * joins (gallocy_barrier), gets one shared page (gallocy_alloc_collective) and starts a worker
 * thread that writes it for ever (a word all ranks write, so the page keeps moving between the
 * ranks, and a counter of its own) and allocates now and then. Once every rank's counter has
 * reached 1000, the process prints "rank R of N: leaving by HOW" and ends, with the worker
 * still running, by MODE:
 *   exit     another thread calls exit(0) (main is blocked in pthread_join)
 *   exit3    another thread calls exit(3) on rank FAIL_RANK, exit(0) on the others
 *   return   main returns 0
 *   _exit    another thread calls _exit(0)
 *   _exit3   another thread calls _exit(3) on rank FAIL_RANK, _exit(0) on the others
 *   _Exit    another thread calls _Exit(0) */
#include <pthread.h>

#include "shapes.h"

static volatile long *w;
static int r, n, fail_rank = -1;
static const char *mode;

static void *worker(void *arg) {
    (void)arg;
    for (unsigned long i = 0;; i++) {
        w[0] = w[0] + 1;
        w[1 + r] = w[1 + r] + 1;
        if (i % 256 == 0) {
            char *p = malloc(1 + i % 1000);
            if (p)
                p[0] = 1;
            free(p);
        }
    }
    return NULL;
}

static void *exiter(void *arg) {
    (void)arg;
    int code = (strcmp(mode, "exit3") == 0 || strcmp(mode, "_exit3") == 0) && r == fail_rank ? 3 : 0;
    const char *how = strncmp(mode, "_exit", 5) == 0 ? "_exit" : strcmp(mode, "_Exit") == 0 ? "_Exit" : "exit";
    printf("rank %d of %d: leaving by %s(%d) from a thread\n", r, n, how, code);
    fflush(stdout);
    fflush(stderr);
    if (strncmp(mode, "_exit", 5) == 0)
        _exit(code);
    if (strcmp(mode, "_Exit") == 0)
        _Exit(code);
    exit(code);
}

int main(int argc, char **argv) {
    need_api("exitprog");
    if (argc < 2) {
        fprintf(stderr, "usage: exitprog exit|exit3|return|_exit|_exit3|_Exit [FAIL_RANK]\n");
        return 2;
    }
    mode = argv[1];
    if (argc > 2)
        fail_rank = atoi(argv[2]);
    if (strcmp(mode, "exit") && strcmp(mode, "exit3") && strcmp(mode, "return") && strcmp(mode, "_exit") &&
        strcmp(mode, "_exit3") && strcmp(mode, "_Exit")) {
        fprintf(stderr, "exitprog: unknown mode %s\n", mode);
        return 2;
    }
    rank_and_size(&r, &n);
    if (n > 63)
        fail("too many ranks");
    gallocy_barrier();
    w = gallocy_alloc_collective(4096);
    CHECK(w != NULL);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, worker, NULL) == 0);
    for (;;) {
        int all = 1;
        for (int k = 0; k < n; k++)
            if (w[1 + k] < 1000)
                all = 0;
        if (all)
            break;
        usleep(1000);
    }
    if (strcmp(mode, "return") == 0) {
        printf("rank %d of %d: leaving by returning from main\n", r, n);
        return 0;
    }
    pthread_t e;
    CHECK(pthread_create(&e, NULL, exiter, NULL) == 0);
    pthread_join(e, NULL);
    fail("the exiting thread came back");
}
