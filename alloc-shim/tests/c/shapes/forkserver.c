/* forkserver [CHILDREN [STRIDE]]
 *
 * A forking server in a joined job member. Every rank joins (gallocy_barrier) and gets the
 * same 1 MiB block (gallocy_alloc_collective). Rank 0 fills it; the other ranks read its first
 * half, so rank 0 then holds those pages read-only and the rest writable. Rank 0 then forks
 * CHILDREN (default 20) children in a loop. Right after each fork the parent overwrites the
 * whole block, and from the first fork on a second parent thread overwrites it continuously,
 * while the other ranks keep reading the first half (so pages keep changing hands and
 * protections). Each child sleeps 20 ms, then requires every byte of the block to equal what
 * the parent saw at the moment of the fork (a private copy the parent took just before
 * forking, with its writer paused), allocates and frees, overwrites the block with its own
 * pattern, checks it, and exits 0 (1 on a mismatch). The parent reaps every child, requires
 * exit 0 of each, and checks that its own block holds exactly what its threads last wrote
 * (no child's write reached it). Finally rank 0 writes a last generation that every rank
 * checks after a barrier, and each rank prints "rank R of N: forking server ok".
 *
 * With STRIDE k (default 1) the other ranks read only every k-th page of the first half, so that
 * rank 0's pages alternate between read-only and writable there (many kernel mappings).
 *
 * Every page of the block holds its generation (8 bytes), its index (8 bytes) and bytes
 * derived from both, so a page is checkable by itself. */
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include "shapes.h"

#define BLK (1 << 20)
#define FINAL_GEN 0x5eedf00dULL

static size_t pg, npages;
static unsigned char *blk;
static volatile long *done_flag;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t gen;         /* last generation written; under mu */
static uint64_t *last_gen;   /* per page, what this process last wrote (private memory) */
static unsigned char *snap;  /* the block as it was at the last fork (private memory) */
static atomic_int stop;
static size_t stride = 1;   /* the other ranks read every stride-th page of the first half */

static unsigned char pat(uint64_t g, size_t k, size_t i) {
    return (unsigned char)(g * 131 + k * 7 + i * 3 + 1);
}

/* Caller holds mu (or is alone). */
static void write_page(size_t k, uint64_t g) {
    unsigned char *p = blk + k * pg;
    uint64_t kk = k;
    memcpy(p, &g, 8);
    memcpy(p + 8, &kk, 8);
    for (size_t i = 16; i < pg; i++)
        p[i] = pat(g, k, i);
    last_gen[k] = g;
}

/* The generation of page k of `base` if the page is consistent, else 0. */
static uint64_t page_gen(const unsigned char *base, size_t k) {
    const unsigned char *p = base + k * pg;
    uint64_t g, kk;
    memcpy(&g, p, 8);
    memcpy(&kk, p + 8, 8);
    if (kk != k || g == 0)
        return 0;
    for (size_t i = 16; i < pg; i++)
        if (p[i] != pat(g, k, i))
            return 0;
    return g;
}

static void overwrite_all(void) {
    for (size_t k = 0; k < npages; k++) {
        pthread_mutex_lock(&mu);
        write_page(k, ++gen);
        pthread_mutex_unlock(&mu);
    }
}

static void *writer(void *arg) {
    (void)arg;
    while (!atomic_load(&stop)) {
        overwrite_all();
        sched_yield();
    }
    return NULL;
}

static void compare_with_snapshot(int c, const char *when) {
    if (memcmp(blk, snap, BLK) == 0)
        return;
    size_t i = 0;
    while (blk[i] == snap[i])
        i++;
    fail("child %d, %s: byte %zu (page %zu) is %u but was %u at fork: the child does not see the heap as it was "
         "at fork",
         c, when, i, i / pg, blk[i], snap[i]);
}

/* A failure of rank 0 must not leave the other ranks polling done_flag for ever. */
static void tell_the_others(void) {
    *done_flag = 2;
}

static void child(int c) {
    shapes_on_fail = NULL;
    usleep(20000);
    compare_with_snapshot(c, "20 ms after fork");
    for (size_t k = 0; k < npages; k++)
        if (page_gen(blk, k) == 0)
            fail("child %d: page %zu is inconsistent", c, k);
    /* The child keeps allocating and freeing. */
    char *keep[100];
    for (int i = 0; i < 100; i++) {
        keep[i] = malloc(8 + (size_t)i * 37);
        CHECK(keep[i] != NULL);
        memset(keep[i], i, 8 + (size_t)i * 37);
    }
    for (int i = 0; i < 3000; i++) {
        char *p = malloc(1 + (size_t)(i * 53) % 6000);
        CHECK(p != NULL);
        p[0] = 1;
        free(p);
    }
    for (int i = 0; i < 100; i++) {
        for (size_t k = 0; k < 8 + (size_t)i * 37; k++)
            CHECK(keep[i][k] == (char)i);
        free(keep[i]);
    }
    compare_with_snapshot(c, "after allocating");
    /* Its own copy: written here, seen here only. */
    unsigned char mine = (unsigned char)(0xa0 + c % 16);
    memset(blk, mine, BLK);
    usleep(5000);
    for (size_t i = 0; i < BLK; i++)
        if (blk[i] != mine)
            fail("child %d: byte %zu of its own copy is %u, it wrote %u", c, i, blk[i], mine);
    exit(0);
}

static void *private_map(size_t len) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        fail("mmap(%zu) failed", len);
    return p;
}

int main(int argc, char **argv) {
    need_api("forkserver");
    int children = argc > 1 ? atoi(argv[1]) : 20;
    int stride_arg = argc > 2 ? atoi(argv[2]) : 1;
    if (children < 1 || children > 1000 || stride_arg < 1 || stride_arg > 64) {
        fprintf(stderr, "usage: forkserver [CHILDREN (1..1000) [STRIDE (1..64)]]\n");
        return 2;
    }
    stride = (size_t)stride_arg;
    int r, n;
    rank_and_size(&r, &n);
    gallocy_barrier();
    CHECK(gallocy_rank() == r && gallocy_size() == n);
    pg = (size_t)sysconf(_SC_PAGESIZE);
    npages = BLK / pg;
    blk = gallocy_alloc_collective(BLK);
    done_flag = gallocy_alloc_collective(pg);
    if (!blk || !done_flag)
        fail("gallocy_alloc_collective returned NULL");
    last_gen = private_map(npages * sizeof(uint64_t));
    snap = private_map(BLK);

    if (r == 0) {
        gen = 1;
        for (size_t k = 0; k < npages; k++)
            write_page(k, 1);
    }
    gallocy_barrier();
    if (r != 0)
        for (size_t k = 0; k < npages / 2; k += stride)
            if (page_gen(blk, k) != 1)
                fail("page %zu: generation %llu, rank 0 wrote 1", k, (unsigned long long)page_gen(blk, k));
    gallocy_barrier();

    if (r == 0) {
        shapes_on_fail = tell_the_others;
        pid_t *pids = private_map((size_t)children * sizeof(pid_t));
        pthread_t w;
        for (int c = 0; c < children; c++) {
            pthread_mutex_lock(&mu);
            memcpy(snap, blk, BLK);
            fflush(stdout);
            fflush(stderr);
            pid_t pid = fork();
            if (pid < 0)
                fail("fork failed");
            if (pid == 0)
                child(c);
            pids[c] = pid;
            pthread_mutex_unlock(&mu);
            if (c == 0)
                CHECK(pthread_create(&w, NULL, writer, NULL) == 0);
            overwrite_all();
        }
        int bad = 0;
        for (int c = 0; c < children; c++) {
            int st = 0;
            if (waitpid(pids[c], &st, 0) != pids[c])
                fail("waitpid(child %d) failed", c);
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                bad++;
                if (WIFEXITED(st))
                    fprintf(stderr, "forkserver: child %d exited with code %d\n", c, WEXITSTATUS(st));
                else
                    fprintf(stderr, "forkserver: child %d was killed by signal %d\n", c, WTERMSIG(st));
            }
        }
        atomic_store(&stop, 1);
        CHECK(pthread_join(w, NULL) == 0);
        if (bad)
            fail("%d of %d children failed", bad, children);
        for (size_t k = 0; k < npages; k++) {
            uint64_t g = page_gen(blk, k);
            if (g != last_gen[k])
                fail("page %zu of the parent: generation %llu, but it last wrote %llu (a child's write reached the "
                     "parent?)",
                     k, (unsigned long long)g, (unsigned long long)last_gen[k]);
        }
        for (size_t k = 0; k < npages; k++)
            write_page(k, FINAL_GEN);
        shapes_on_fail = NULL;
        *done_flag = 1;
    } else {
        /* Keep taking read copies of the first half while rank 0 forks and writes. */
        unsigned long sum = 0;
        while (!*done_flag) {
            for (size_t k = 0; k < npages / 2; k += stride)
                sum += blk[k * pg + 100];
            usleep(500);
        }
        (void)sum;
        if (*done_flag != 1)
            fail("rank 0 failed");
    }
    gallocy_barrier();
    for (size_t k = 0; k < npages; k++)
        if (page_gen(blk, k) != FINAL_GEN)
            fail("page %zu after the forks: generation %llu, rank 0 wrote %llu last", k,
                 (unsigned long long)page_gen(blk, k), (unsigned long long)FINAL_GEN);
    gallocy_barrier();
    printf("rank %d of %d: forking server ok (%d children)\n", r, n, r == 0 ? children : 0);
    return 0;
}
