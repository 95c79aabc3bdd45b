/*
 * mt_malloc: a multi-threaded malloc/free stress program for allocator testing.
 *
 * THREADS threads make PAIRS malloc/free pairs in total (PAIRS / THREADS each) with varied
 * sizes (8..4096 bytes, more small ones than large ones; 1 in 32 by calloc, 1 in 32 grown to its
 * size by realloc), write a tag into every block (first
 * and last words, plus a word every 512 bytes) and check the tag when the block is freed. Each
 * thread keeps a window of live blocks freed in random order; about one block in 16 is handed to
 * the next thread through a small mutex-protected exchange and freed there, so blocks are often
 * freed by a thread other than the one that allocated them.
 *
 * The checksum printed on stdout depends only on the sequence of sizes and tags each thread
 * generates (deterministic per thread) and not on allocator addresses or on thread timing, so
 * it is identical under any correct malloc. On stderr it prints the address of one block, which
 * tests use to see which allocator served it.
 *
 * Usage: mt_malloc [PAIRS [THREADS]]    (defaults: 10000000 pairs, 4 threads)
 * Exit status: 0 on success, 1 on a corrupted block or a failed allocation.
 *
 * Build: cc -O2 -pthread -o mt_malloc examples/mt_malloc.c
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WINDOW 256       /* live blocks per thread */
#define XCHG_CAP 512     /* capacity of each thread's exchange inbox */
#define MAX_THREADS 64

struct block_hdr {
    uint64_t tag;
    uint64_t size;
};

struct inbox {
    pthread_mutex_t mu;
    size_t len;
    void *items[XCHG_CAP];
};

struct worker {
    int id;
    int nthreads;
    uint64_t pairs;
    uint64_t checksum;   /* sum of the tags this thread wrote */
    uint64_t remote_frees;
    int failed;
    pthread_t thread;
};

static struct inbox inboxes[MAX_THREADS];
static struct worker workers[MAX_THREADS];
static void *sample_block;

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static size_t pick_size(uint64_t r) {
    /* A power-of-two ceiling chosen uniformly from 16..4096, then a uniform size under it:
       small blocks are common, large ones still frequent. */
    unsigned shift = 4 + (unsigned)(r % 9);   /* 16 .. 4096 */
    size_t size = (size_t)((r >> 8) % (1u << shift)) + 1;
    return size < 8 ? 8 : size;
}

static void fill(unsigned char *p, size_t size, uint64_t tag) {
    /* Every block is at least 8 bytes; blocks of 16+ get a header (tag, size), blocks of 24+ also a
       trailing tag and, below it, a word every 512 bytes. */
    if (size < sizeof(struct block_hdr)) {
        memcpy(p, &tag, 8);
        return;
    }
    struct block_hdr h = { tag, size };
    memcpy(p, &h, sizeof h);
    if (size < sizeof h + 8)
        return;
    for (size_t off = 512; off + 16 <= size; off += 512) {
        uint64_t v = tag ^ off;
        memcpy(p + off, &v, 8);
    }
    memcpy(p + size - 8, &tag, 8);
}

/* Returns 0 if the block still holds what fill() wrote. */
static int check(const unsigned char *p, size_t size, uint64_t tag) {
    uint64_t v;
    memcpy(&v, p, 8);
    if (v != tag)
        return -1;
    if (size < sizeof(struct block_hdr))
        return 0;
    struct block_hdr h;
    memcpy(&h, p, sizeof h);
    if (h.size != size)
        return -1;
    if (size < sizeof h + 8)
        return 0;
    for (size_t off = 512; off + 16 <= size; off += 512) {
        memcpy(&v, p + off, 8);
        if (v != (tag ^ off))
            return -1;
    }
    memcpy(&v, p + size - 8, 8);
    return v == tag ? 0 : -1;
}

/* A block handed to another thread carries its own size in the header (size >= 16); it is
   freed only if intact. */
static int check_and_free_remote(void *p) {
    struct block_hdr h;
    memcpy(&h, p, sizeof h);
    if (h.size < sizeof h || h.size > 4096 || check(p, (size_t)h.size, h.tag) != 0)
        return -1;
    free(p);
    return 0;
}

static int drain_inbox(struct worker *w, struct inbox *in) {
    void *local[XCHG_CAP];
    size_t n;
    pthread_mutex_lock(&in->mu);
    n = in->len;
    memcpy(local, in->items, n * sizeof(void *));
    in->len = 0;
    pthread_mutex_unlock(&in->mu);
    for (size_t i = 0; i < n; i++) {
        if (check_and_free_remote(local[i]) != 0) {
            fprintf(stderr, "mt_malloc: thread %d: corrupted block %p received from another thread\n", w->id,
                    local[i]);
            return -1;
        }
        w->remote_frees++;
    }
    return 0;
}

/* Hand `p` to the next thread; 0 if the inbox took it. */
static int send_block(struct worker *w, void *p) {
    struct inbox *in = &inboxes[(w->id + 1) % w->nthreads];
    int ok = -1;
    pthread_mutex_lock(&in->mu);
    if (in->len < XCHG_CAP) {
        in->items[in->len++] = p;
        ok = 0;
    }
    pthread_mutex_unlock(&in->mu);
    return ok;
}

/* Mostly malloc; 1 in 32 is a calloc (checked to be zero), 1 in 32 a malloc grown by realloc
   (checked to keep its contents). Prints the reason and returns NULL on failure. */
static unsigned char *allocate(struct worker *w, size_t size, uint64_t r) {
    unsigned char *p;
    switch (r % 32) {
    case 0:
        p = calloc(1, size);
        if (p == NULL)
            break;
        for (size_t k = 0; k < size; k++) {
            if (p[k] != 0) {
                fprintf(stderr, "mt_malloc: thread %d: calloc(1, %zu) byte %zu is %u\n", w->id, size, k, p[k]);
                return NULL;
            }
        }
        return p;
    case 1: {
        size_t first = size / 2 < 8 ? 8 : size / 2;
        p = malloc(first);
        if (p == NULL)
            break;
        memset(p, 0xA5, first);
        unsigned char *q = realloc(p, size);
        if (q == NULL) {
            free(p);
            break;
        }
        for (size_t k = 0; k < first && k < size; k++) {
            if (q[k] != 0xA5) {
                fprintf(stderr, "mt_malloc: thread %d: realloc(%zu -> %zu) lost byte %zu\n", w->id, first, size, k);
                return NULL;
            }
        }
        return q;
    }
    default:
        p = malloc(size);
        if (p != NULL)
            return p;
    }
    fprintf(stderr, "mt_malloc: thread %d: allocating %zu bytes failed\n", w->id, size);
    return NULL;
}

static void *run(void *arg) {
    struct worker *w = arg;
    void *live[WINDOW] = { 0 };
    size_t sizes[WINDOW] = { 0 };
    uint64_t tags[WINDOW] = { 0 };
    uint64_t rng = 0x9E3779B97F4A7C15ull * (uint64_t)(w->id + 1);

    for (uint64_t i = 0; i < w->pairs; i++) {
        uint64_t r = xorshift(&rng);
        unsigned slot = (unsigned)(r % WINDOW);
        if (live[slot] != NULL) {
            /* Retire the old block: hand it over (1 in 16, if big enough for a header) or free it here. */
            void *old = live[slot];
            if (check(old, sizes[slot], tags[slot]) != 0) {
                fprintf(stderr, "mt_malloc: thread %d: corrupted block %p (size %zu)\n", w->id, old, sizes[slot]);
                w->failed = 1;
                return NULL;
            }
            if (w->nthreads > 1 && ((r >> 40) & 15) == 0 && sizes[slot] >= sizeof(struct block_hdr) &&
                send_block(w, old) == 0) {
                /* the receiver checks and frees it */
            } else {
                free(old);
            }
            live[slot] = NULL;
        }
        size_t size = pick_size(xorshift(&rng));
        unsigned char *p = allocate(w, size, r >> 48);
        if (p == NULL) {
            w->failed = 1;
            return NULL;
        }
        if (w->id == 0 && i == 0)
            sample_block = p;
        uint64_t tag = xorshift(&rng) | 1;
        fill(p, size, tag);
        live[slot] = p;
        sizes[slot] = size;
        tags[slot] = tag;
        w->checksum += tag ^ (uint64_t)size;
        if ((i & 63) == 0 && drain_inbox(w, &inboxes[w->id]) != 0) {
            w->failed = 1;
            return NULL;
        }
    }
    for (unsigned s = 0; s < WINDOW; s++) {
        if (live[s] == NULL)
            continue;
        if (check(live[s], sizes[s], tags[s]) != 0) {
            fprintf(stderr, "mt_malloc: thread %d: corrupted block %p at the end\n", w->id, live[s]);
            w->failed = 1;
            return NULL;
        }
        free(live[s]);
    }
    return NULL;
}

int main(int argc, char **argv) {
    uint64_t pairs = argc > 1 ? strtoull(argv[1], NULL, 10) : 10000000ull;
    int nthreads = argc > 2 ? atoi(argv[2]) : 4;
    if (nthreads < 1 || nthreads > MAX_THREADS || pairs < (uint64_t)nthreads) {
        fprintf(stderr, "usage: mt_malloc [PAIRS [THREADS (1..%d)]]\n", MAX_THREADS);
        return 2;
    }
    for (int t = 0; t < nthreads; t++) {
        pthread_mutex_init(&inboxes[t].mu, NULL);
        workers[t].id = t;
        workers[t].nthreads = nthreads;
        workers[t].pairs = pairs / (uint64_t)nthreads + ((uint64_t)t < pairs % (uint64_t)nthreads ? 1 : 0);
    }
    for (int t = 0; t < nthreads; t++) {
        int rc = pthread_create(&workers[t].thread, NULL, run, &workers[t]);
        if (rc != 0) {
            fprintf(stderr, "mt_malloc: pthread_create: %s\n", strerror(rc));
            return 1;
        }
    }
    int failed = 0;
    uint64_t checksum = 0, remote = 0;
    for (int t = 0; t < nthreads; t++) {
        pthread_join(workers[t].thread, NULL);
        failed |= workers[t].failed;
        checksum += workers[t].checksum;
        remote += workers[t].remote_frees;
    }
    /* Blocks still waiting in inboxes are checked and freed by the main thread. */
    struct worker main_w = { .id = -1 };
    for (int t = 0; t < nthreads; t++)
        failed |= drain_inbox(&main_w, &inboxes[t]) != 0;
    remote += main_w.remote_frees;
    if (failed) {
        fprintf(stderr, "mt_malloc: FAILED\n");
        return 1;
    }
    fprintf(stderr, "mt_malloc: sample block %p; %" PRIu64 " blocks freed by another thread\n", sample_block,
            remote);
    printf("mt_malloc: %d threads, %" PRIu64 " malloc/free pairs, checksum %016" PRIx64 "\n", nthreads, pairs,
           checksum);
    return 0;
}
