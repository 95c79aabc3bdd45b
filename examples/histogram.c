/*
 * histogram: a parallel histogram in shared memory, updated under global locks.
 *
 * N items (item i's key is a hash of i) are counted into 64 bins. The bins live in memory
 * every rank allocates together (gallocy_alloc_collective: the same zero-filled block at the
 * same address everywhere). Items are split into batches; batch c belongs to rank c % size.
 * A rank counts a batch locally, then adds its counts to the shared bins group by group: the
 * 64 bins form 8 lock groups (bin b belongs to group b % 8, guarded by gallocy_lock(b % 8)),
 * and each group sits on its own page, so different groups can be updated at the same time by
 * different ranks. Each group also counts the items added under its lock.
 *
 * After a barrier every rank recomputes the whole histogram locally and checks every shared
 * bin and group counter against it.
 *
 * Build:  PKG_CONFIG_PATH=target/release/pkgconfig cc -O2 -o histogram examples/histogram.c \
 *             $(pkg-config --cflags --libs gallocy)
 * Run:    target/release/gallocy run -n 4 -- ./histogram [N [BATCH]]   (defaults 1000000, 1000)
 *         (BATCH 1 takes a lock for every single item: slow, but a good stress of the locks)
 *
 * Prints "rank R: histogram ok ..." on success; exits 1 with a message on a mismatch.
 */
#include <gallocy.h>

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BINS 64
#define GROUPS 8
#define GROUP_STRIDE 4096 /* bytes between groups: one page each */

/* One lock group's page: its 8 bins (bins g, g+8, ..., g+56) and its item counter. */
struct group {
    uint64_t bin[BINS / GROUPS];
    uint64_t items;
};

static uint64_t mix(uint64_t x) {
    /* splitmix64 finalizer */
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static unsigned bin_of(uint64_t item) {
    return (unsigned)(mix(item) >> 58); /* top 6 bits: 0..63 */
}

static struct group *group_at(unsigned char *shared, unsigned g) {
    return (struct group *)(shared + (size_t)g * GROUP_STRIDE);
}

int main(int argc, char **argv) {
    uint64_t n = argc > 1 ? strtoull(argv[1], NULL, 10) : 1000000;
    uint64_t batch = argc > 2 ? strtoull(argv[2], NULL, 10) : 1000;
    if (batch == 0) {
        fprintf(stderr, "usage: histogram [N [BATCH>0]]\n");
        return 2;
    }
    int rc = gallocy_init();
    if (rc != 0) {
        fprintf(stderr, "histogram: gallocy_init failed: %s\n", strerror(-rc));
        return 1;
    }
    int rank = gallocy_rank();
    int size = gallocy_size();

    unsigned char *shared = gallocy_alloc_collective((size_t)GROUPS * GROUP_STRIDE);
    if (shared == NULL) {
        fprintf(stderr, "histogram: rank %d: gallocy_alloc_collective failed\n", rank);
        return 1;
    }

    uint64_t batches = (n + batch - 1) / batch;
    uint64_t mine = 0, lock_rounds = 0;
    for (uint64_t c = (uint64_t)rank; c < batches; c += (uint64_t)size) {
        uint64_t local[BINS] = { 0 };
        uint64_t end = (c + 1) * batch < n ? (c + 1) * batch : n;
        for (uint64_t i = c * batch; i < end; i++)
            local[bin_of(i)]++;
        mine += end - c * batch;
        /* Visit the groups starting at a different one per batch and rank, to spread contention. */
        for (unsigned k = 0; k < GROUPS; k++) {
            unsigned g = (unsigned)((c + (uint64_t)k) % GROUPS);
            uint64_t added = 0;
            for (unsigned j = 0; j < BINS / GROUPS; j++)
                added += local[g + GROUPS * j];
            if (added == 0)
                continue;
            gallocy_lock(g);
            struct group *grp = group_at(shared, g);
            for (unsigned j = 0; j < BINS / GROUPS; j++)
                grp->bin[j] += local[g + GROUPS * j];
            grp->items += added;
            gallocy_unlock(g);
            lock_rounds++;
        }
    }
    gallocy_barrier();

    /* Check every bin against a local computation of the whole histogram. */
    uint64_t expect[BINS] = { 0 };
    for (uint64_t i = 0; i < n; i++)
        expect[bin_of(i)]++;
    uint64_t total = 0, lo = UINT64_MAX, hi = 0;
    int bad = 0;
    for (unsigned g = 0; g < GROUPS; g++) {
        const struct group *grp = group_at(shared, g);
        uint64_t group_expect = 0;
        for (unsigned j = 0; j < BINS / GROUPS; j++) {
            unsigned b = g + GROUPS * j;
            uint64_t got = grp->bin[j];
            group_expect += expect[b];
            if (got != expect[b]) {
                fprintf(stderr, "histogram: rank %d: bin %u holds %" PRIu64 ", expected %" PRIu64 "\n", rank, b, got,
                        expect[b]);
                bad = 1;
            }
            total += got;
            lo = got < lo ? got : lo;
            hi = got > hi ? got : hi;
        }
        if (grp->items != group_expect) {
            fprintf(stderr, "histogram: rank %d: lock group %u counted %" PRIu64 " items, expected %" PRIu64 "\n", rank,
                    g, grp->items, group_expect);
            bad = 1;
        }
    }
    if (bad || total != n) {
        fprintf(stderr, "histogram: rank %d of %d: FAILED (bins hold %" PRIu64 " items, expected %" PRIu64 ")\n", rank,
                size, total, n);
        return 1;
    }
    printf("rank %d: histogram ok: %" PRIu64 " items in %d bins (min %" PRIu64 ", max %" PRIu64 "); this rank counted %"
           PRIu64 " items in %" PRIu64 " locked updates\n", rank, n, BINS, lo, hi, mine, lock_rounds);
    fflush(stdout);

    rc = gallocy_finalize();
    if (rc != 0) {
        fprintf(stderr, "histogram: rank %d: gallocy_finalize failed: %s\n", rank, strerror(-rc));
        return 1;
    }
    return 0;
}
