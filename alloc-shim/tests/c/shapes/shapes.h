/* Helpers of the programs of alloc-shim/tests/shapes.rs.
 *
 * The programs are not linked with libgallocy: they use the C API of gallocy.h through weak
 * references that the preloaded libgallocy.so resolves, exactly as an unmodified program that
 * only gains a few gallocy calls would. Without the library they stop at once with exit code 2
 * (`need_api`), so a test can never pass by running without the shim.
 *
 * Every failure is one line "<program>: rank R: FAIL: ..." on stderr and exit code 1.
 */
#ifndef SHAPES_H
#define SHAPES_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gallocy.h"

#pragma weak gallocy_init
#pragma weak gallocy_rank
#pragma weak gallocy_size
#pragma weak gallocy_barrier
#pragma weak gallocy_lock
#pragma weak gallocy_unlock
#pragma weak gallocy_alloc_collective
#pragma weak gallocy_broadcast
#pragma weak gallocy_stats_print
#pragma weak gallocy_finalize

/* The default heap of gallocy (GALLOCY_HEAP_BASE / GALLOCY_HEAP_SIZE are never set by the
 * tests); rank r of N allocates from the r-th of N equal arenas (the last one takes the rest). */
#define SHAPES_HEAP_BASE 0x200000000000ULL
#define SHAPES_HEAP_SIZE (16ULL << 30)

static const char *shapes_prog = "shapes";
static int shapes_rank = -1;
/* Called by fail() before it exits, if set (e.g. to tell the other ranks to stop waiting). */
static void (*shapes_on_fail)(void);

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fail(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (shapes_on_fail)
        shapes_on_fail();
    fprintf(stderr, "%s: rank %d: FAIL: %s\n", shapes_prog, shapes_rank, msg);
    fflush(stderr);
    exit(1);
}

#define CHECK(c) do { if (!(c)) fail("check failed at %s:%d: %s", __FILE__, __LINE__, #c); } while (0)

/* Stops with exit code 2 unless libgallocy.so is loaded (its C API resolved). */
static inline void need_api(const char *prog) {
    shapes_prog = prog;
    if (!gallocy_init || !gallocy_rank || !gallocy_size || !gallocy_barrier || !gallocy_alloc_collective ||
        !gallocy_broadcast || !gallocy_finalize) {
        fprintf(stderr, "%s: FAIL: gallocy's C API is not resolved: libgallocy.so is not loaded\n", prog);
        exit(2);
    }
}

/* Which rank's arena `p` lies in (of a job of n), or -1 outside the shared heap. */
static inline int arena_of(const void *p, int n) {
    uint64_t a = (uint64_t)(uintptr_t)p;
    if (a < SHAPES_HEAP_BASE || a >= SHAPES_HEAP_BASE + SHAPES_HEAP_SIZE || n < 1)
        return -1;
    uint64_t arena = (SHAPES_HEAP_SIZE / (uint64_t)n) / 65536 * 65536;
    uint64_t i = (a - SHAPES_HEAP_BASE) / arena;
    return i >= (uint64_t)n ? n - 1 : (int)i;
}

/* Fails unless `p` (from malloc & co. of rank r of n) lies in rank r's arena. */
#define check_arena(block, r, n, what) check_arena_at((uintptr_t)(block), r, n, what)
static inline void check_arena_at(uintptr_t p, int r, int n, const char *what) {
    int a = arena_of((const void *)p, n);
    if (a != r)
        fail("%s %#lx is %s (expected rank %d's arena of %d)", what, (unsigned long)p,
             a < 0 ? "outside the shared heap" : "in another rank's arena", r, n);
}

/* Fails unless this process is single-threaded and has no socket: what a process that has not
 * joined (and so has no service thread and no connection) looks like. */
static inline int count_threads(void) {
    int threads = 0;
    DIR *d = opendir("/proc/self/task");
    CHECK(d != NULL);
    for (struct dirent *e; (e = readdir(d));)
        if (e->d_name[0] != '.')
            threads++;
    closedir(d);
    return threads;
}

static inline void check_not_joined(const char *when) {
    int threads = count_threads(), sockets = 0;
    /* A thread that was just joined (pthread_join returns when the kernel clears its tid, a
     * moment before the thread is gone) can still be listed: give it up to 2 s to go. */
    for (int i = 0; i < 200 && threads > 1; i++) {
        usleep(10000);
        threads = count_threads();
    }
    DIR *d = opendir("/proc/self/fd");
    CHECK(d != NULL);
    for (struct dirent *e; (e = readdir(d));) {
        char path[300], target[64];
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t len = readlink(path, target, sizeof target - 1);
        if (len > 0) {
            target[len] = 0;
            if (strncmp(target, "socket:", 7) == 0)
                sockets++;
        }
    }
    closedir(d);
    if (threads != 1 || sockets != 0)
        fail("%s: %d threads and %d sockets; a process that has not joined has 1 thread and no socket", when,
             threads, sockets);
    /* An RDMA build loads libibverbs when the transport starts, never before. */
    FILE *maps = fopen("/proc/self/maps", "r");
    CHECK(maps != NULL);
    char line[512];
    while (fgets(line, sizeof line, maps))
        if (strstr(line, "libibverbs"))
            fail("%s: libibverbs is loaded; gallocy loads it only when it joins the job: %s", when, line);
    fclose(maps);
}

/* Rank and size as the process knows them before joining, checked against the allocator:
 * a fresh malloc block must come from this rank's arena; and the process has not joined yet
 * (no thread or socket of gallocy's). Call it while the program is single-threaded. */
static inline void rank_and_size(int *r, int *n) {
    *r = gallocy_rank();
    *n = gallocy_size();
    shapes_rank = *r;
    if (*n < 1 || *r < 0 || *r >= *n)
        fail("gallocy_rank()/gallocy_size() = %d/%d before joining", *r, *n);
    char *p = malloc(200);
    CHECK(p != NULL);
    check_arena(p, *r, *n, "malloc(200) before joining");
    memset(p, 0x5a, 200);
    free(p);
    check_not_joined("before the first job-wide call");
}

static inline unsigned char shared_pattern(size_t i, int n) {
    return (unsigned char)(i * 131 + (size_t)n * 17 + 7);
}

/* The job-wide check: rank 0 fills a collective block and a malloc'ed string whose pointer it
 * broadcasts; after a barrier every rank reads both; then every rank writes its own slot of a
 * collective array and reads all the others'. Joins the job if the caller has not yet. */
static inline void shared_check(int r, int n) {
    CHECK(gallocy_rank() == r && gallocy_size() == n);
    enum { LEN = 3 * 4096 + 100 };
    unsigned char *b = gallocy_alloc_collective(LEN);
    if (!b)
        fail("gallocy_alloc_collective(%d) returned NULL", LEN);
    if (arena_of(b, n) < 0)
        fail("gallocy_alloc_collective block %p is outside the shared heap", (void *)b);
    char *msg = NULL;
    if (r == 0) {
        for (size_t i = 0; i < LEN; i++)
            b[i] = shared_pattern(i, n);
        msg = malloc(64);
        CHECK(msg != NULL);
        snprintf(msg, 64, "written by rank 0 of %d", n);
    }
    gallocy_broadcast(&msg, sizeof msg, 0);
    gallocy_barrier();
    for (size_t i = 0; i < LEN; i++)
        if (b[i] != shared_pattern(i, n))
            fail("collective block byte %zu is %u, rank 0 wrote %u", i, b[i], shared_pattern(i, n));
    char want[64];
    snprintf(want, sizeof want, "written by rank 0 of %d", n);
    if (!msg)
        fail("the broadcast pointer is NULL");
    check_arena(msg, 0, n, "rank 0's malloc block");
    if (strcmp(msg, want) != 0)
        fail("rank 0's malloc block reads \"%.63s\", expected \"%s\"", msg, want);
    long *slots = gallocy_alloc_collective(64 * sizeof(long));
    CHECK(slots != NULL);
    slots[r] = 1000 + r;
    gallocy_barrier();
    for (int k = 0; k < n; k++)
        if (slots[k] != 1000 + k)
            fail("slot %d is %ld, rank %d wrote %d", k, slots[k], k, 1000 + k);
    gallocy_barrier();
    if (r == 0)
        free(msg);
}

#endif
