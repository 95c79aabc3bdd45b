/* interleavefork [PAGES]
 *
 * More scattered pages than vm.max_map_count allows mappings, in a preloaded program that forks.
 * Every rank joins (gallocy_barrier) and gets the same block of PAGES pages
 * (gallocy_alloc_collective; default 1.5 x vm.max_map_count). Rank r writes the pages k with
 * k % n == r, so every rank holds every n-th page: its view of the heap would need a mapping
 * per page, and closes instead (see the README on vm.max_map_count). Rank 0 then forks: the
 * child must read each page rank 0 wrote with the value written, though the parent's view had
 * closed most of them and the child may not have the mappings to open them all at once; then
 * it overwrites them and exits 0. The parent requires exit 0 and its own pages unchanged by the
 * child. After a barrier every rank reads every page, and each prints
 * "rank R of N: interleaved fork ok (PAGES pages)". */
#include <sys/wait.h>

#include "shapes.h"

static uint64_t value(size_t k) {
    return 0x9e3779b97f4a7c15ULL * (k + 1);
}

static long max_map_count(void) {
    FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
    long v = 65530;
    if (f) {
        if (fscanf(f, "%ld", &v) != 1)
            v = 65530;
        fclose(f);
    }
    return v;
}

int main(int argc, char **argv) {
    need_api("interleavefork");
    long limit = max_map_count();
    size_t pages = argc > 1 ? strtoul(argv[1], NULL, 10) : (size_t)(limit + limit / 2);
    int r, n;
    rank_and_size(&r, &n);
    gallocy_barrier();
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    unsigned char *blk = gallocy_alloc_collective(pages * pg);
    if (!blk)
        fail("gallocy_alloc_collective(%zu pages) returned NULL", pages);
    for (size_t k = (size_t)r; k < pages; k += (size_t)n)
        *(volatile uint64_t *)(blk + k * pg) = value(k);
    gallocy_barrier();
    if (r == 0) {
        fflush(stdout);
        fflush(stderr);
        pid_t pid = fork();
        if (pid < 0)
            fail("fork failed");
        if (pid == 0) {
            shapes_on_fail = NULL;
            for (size_t k = 0; k < pages; k += (size_t)n) {
                uint64_t got = *(volatile uint64_t *)(blk + k * pg);
                if (got != value(k))
                    fail("child: page %zu holds %#llx, the parent wrote %#llx", k, (unsigned long long)got,
                         (unsigned long long)value(k));
                *(volatile uint64_t *)(blk + k * pg) = ~value(k);
            }
            for (size_t k = 0; k < pages; k += (size_t)n)
                CHECK(*(volatile uint64_t *)(blk + k * pg) == ~value(k));
            _exit(0);
        }
        int st = 0;
        if (waitpid(pid, &st, 0) != pid)
            fail("waitpid failed");
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            fail("the child failed (%s %d)", WIFEXITED(st) ? "exit code" : "signal",
                 WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
    }
    gallocy_barrier();
    for (size_t k = 0; k < pages; k++) {
        uint64_t got = *(volatile uint64_t *)(blk + k * pg);
        if (got != value(k))
            fail("page %zu holds %#llx, expected %#llx", k, (unsigned long long)got, (unsigned long long)value(k));
    }
    gallocy_barrier();
    printf("rank %d of %d: interleaved fork ok (%zu pages)\n", r, n, pages);
    return 0;
}
