/* linked TAG: a program LINKED with libgallocy (`cc linked.c $(pkg-config --cflags --libs gallocy)`),
 * run as the ranks of a Slurm job step by alloc-shim/tests/slurm.rs.
 *
 * It first prints the launcher's variables it was given, as one line
 *   "env: SLURM_PROCID=.. SLURM_NTASKS=.. PMI_RANK=.. PMI_SIZE=.. GALLOCY_RANK=.. GALLOCY_SIZE=.. LD_PRELOAD=.."
 * ("-" for an unset one), so the test can see where rank and size came from and that gallocy was
 * neither preloaded nor told its rank directly. Then, before joining, it reads gallocy_rank() and
 * gallocy_size() and checks that malloc already serves blocks from its rank's arena of the shared
 * heap; joins with gallocy_barrier(); does the job-wide shared-data check of shapes.h (rank 0 writes
 * a collective block and a malloc'ed string whose pointer it broadcasts, every rank reads them,
 * every rank writes a slot all others read); adds 100 to a shared counter under a global lock, one
 * increment per lock/unlock; and prints "rank R of N: TAG ok".
 *
 * Every failure is one line "linked: rank R: FAIL: ..." on stderr and exit code 1. */
#include "shapes.h"

static const char *env_or_dash(const char *name) {
    const char *v = getenv(name);
    return v ? v : "-";
}

int main(int argc, char **argv) {
    need_api("linked");
    if (argc < 2) {
        fprintf(stderr, "usage: linked TAG\n");
        return 2;
    }
    const char *tag = argv[1];
    printf("env: SLURM_PROCID=%s SLURM_NTASKS=%s PMI_RANK=%s PMI_SIZE=%s GALLOCY_RANK=%s GALLOCY_SIZE=%s "
           "LD_PRELOAD=%s\n",
           env_or_dash("SLURM_PROCID"), env_or_dash("SLURM_NTASKS"), env_or_dash("PMI_RANK"),
           env_or_dash("PMI_SIZE"), env_or_dash("GALLOCY_RANK"), env_or_dash("GALLOCY_SIZE"),
           env_or_dash("LD_PRELOAD"));
    fflush(stdout);

    int r = gallocy_rank(), n = gallocy_size();
    shapes_rank = r;
    if (n < 1 || r < 0 || r >= n)
        fail("gallocy_rank()/gallocy_size() = %d/%d before joining", r, n);
    /* Some allocation traffic before joining, all from this rank's arena. */
    char *keep[32];
    for (int i = 0; i < 32; i++) {
        keep[i] = malloc(24 + (size_t)i * 300);
        CHECK(keep[i] != NULL);
        check_arena(keep[i], r, n, "malloc before joining");
        memset(keep[i], i + 1, 24 + (size_t)i * 300);
    }

    gallocy_barrier();
    CHECK(gallocy_rank() == r && gallocy_size() == n);
    shared_check(r, n);

    long *counter = gallocy_alloc_collective(sizeof(long));
    CHECK(counter != NULL);
    for (int i = 0; i < 100; i++) {
        gallocy_lock(7);
        *counter += 1;
        gallocy_unlock(7);
    }
    gallocy_barrier();
    if (*counter != 100L * n)
        fail("the shared counter is %ld after %d ranks added 100 each under lock 7", *counter, n);
    gallocy_barrier();

    for (int i = 0; i < 32; i++) {
        for (size_t k = 0; k < 24 + (size_t)i * 300; k++)
            if (keep[i][k] != (char)(i + 1))
                fail("block %d allocated before joining changed at byte %zu", i, k);
        free(keep[i]);
    }
    printf("rank %d of %d: %s ok\n", r, n, tag);
    return 0;
}
