/* dlplug PLUGIN_SO
 *
 * dlopens plugin_thread.so (whose constructor runs allocating threads, one of them while dlopen
 * holds the loader lock), checks the first thread's result, waits for the second, then joins
 * the job with gallocy_barrier(), does the shared-data check and prints
 * "rank R of N: plugin threads ok". */
#include <dlfcn.h>

#include "shapes.h"

int main(int argc, char **argv) {
    need_api("dlplug");
    if (argc != 2) {
        fprintf(stderr, "usage: dlplug PLUGIN_SO\n");
        return 2;
    }
    int r, n;
    rank_and_size(&r, &n);
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h)
        fail("dlopen(%s): %s", argv[1], dlerror());
    long (*t1)(void) = (long (*)(void))dlsym(h, "plugin_t1");
    long (*join)(void) = (long (*)(void))dlsym(h, "plugin_join");
    if (!t1 || !join)
        fail("plugin symbols missing: %s", dlerror());
    long a = t1();
    if (a != 20000)
        fail("the constructor's first thread did %ld of 20000 good allocation rounds", a);
    long b = join();
    if (b != 200000)
        fail("the constructor's second thread did %ld of 200000 good allocation rounds", b);
    char *p = malloc(1000);
    CHECK(p != NULL);
    check_arena(p, r, n, "malloc after the plugin's threads");
    free(p);
    gallocy_barrier();
    shared_check(r, n);
    printf("rank %d of %d: plugin threads ok\n", r, n);
    return 0;
}
