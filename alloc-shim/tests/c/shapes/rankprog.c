/* rankprog TAG [ctorlib]
 *
 * Reads its rank and size before joining (and checks that its mallocs already come from its
 * rank's arena), joins with gallocy_barrier(), does the job-wide shared-data check, and prints
 * "rank R of N: TAG ok".
 *
 * With "ctorlib", also requires that the preloaded ctorlib.so ran its constructor (dlopen of
 * libm, mallocs, a thread) successfully before main. */
#include <dlfcn.h>

#include "shapes.h"

int main(int argc, char **argv) {
    need_api("rankprog");
    if (argc < 2) {
        fprintf(stderr, "usage: rankprog TAG [ctorlib]\n");
        return 2;
    }
    const char *tag = argv[1];
    int r, n;
    rank_and_size(&r, &n);
    if (argc > 2 && strcmp(argv[2], "ctorlib") == 0) {
        const char *(*status)(void) = (const char *(*)(void))dlsym(RTLD_DEFAULT, "shapes_ctorlib_status");
        if (!status)
            fail("ctorlib.so is not loaded (no shapes_ctorlib_status)");
        const char *s = status();
        if (strcmp(s, "ok") != 0)
            fail("ctorlib.so's constructor: %s", s);
    }
    /* Some allocation traffic before joining. */
    char *keep[64];
    for (int i = 0; i < 64; i++) {
        keep[i] = malloc(16 + (size_t)i * 100);
        CHECK(keep[i] != NULL);
        check_arena(keep[i], r, n, "malloc before joining");
        memset(keep[i], i, 16 + (size_t)i * 100);
    }
    gallocy_barrier();
    CHECK(gallocy_rank() == r && gallocy_size() == n);
    shared_check(r, n);
    for (int i = 0; i < 64; i++) {
        for (size_t k = 0; k < 16 + (size_t)i * 100; k++)
            if (keep[i][k] != (char)i)
                fail("block %d allocated before joining changed at byte %zu", i, k);
        free(keep[i]);
    }
    printf("rank %d of %d: %s ok\n", r, n, tag);
    return 0;
}
