/* dlloop PLUGIN_SO [ROUNDS]
 *
 * 4 threads each dlopen plugin_small.so, call it, and dlclose it ROUNDS times (default 150),
 * allocating and freeing between and around the calls, so that one thread's allocations run
 * while another holds the dynamic loader's lock (inside dlopen/dlclose and the plugin's
 * constructor and destructor). Once before joining the job, then again after gallocy_barrier()
 * has joined it; then the shared-data check, and "rank R of N: dlopen loop ok (C cycles)". */
#include <dlfcn.h>
#include <pthread.h>

#include "shapes.h"

enum { THREADS = 4 };

static const char *plugin;
static long rounds = 150;
static int my_rank, my_size;

static void *worker(void *arg) {
    long id = (long)arg, done = 0;
    for (long i = 0; i < rounds; i++) {
        size_t n = 1 + (size_t)(i * 131 + id * 17) % 4000;
        unsigned char *before = malloc(n);
        CHECK(before != NULL);
        memset(before, (int)id, n);
        void *h = dlopen(plugin, RTLD_NOW | RTLD_LOCAL);
        if (!h)
            fail("thread %ld: dlopen(%s): %s", id, plugin, dlerror());
        long (*work)(long) = (long (*)(long))dlsym(h, "plugin_work");
        if (!work)
            fail("thread %ld: dlsym(plugin_work): %s", id, dlerror());
        long x = i * THREADS + id;
        long got = work(x);
        if (got != 3 * x + 12)
            fail("thread %ld: plugin_work(%ld) = %ld, expected %ld", id, x, got, 3 * x + 12);
        char *s = strdup("between dlopen and dlclose");
        CHECK(s != NULL);
        if (dlclose(h) != 0)
            fail("thread %ld: dlclose: %s", id, dlerror());
        CHECK(strcmp(s, "between dlopen and dlclose") == 0);
        free(s);
        for (size_t k = 0; k < n; k++)
            if (before[k] != (unsigned char)id)
                fail("thread %ld: a block changed across dlopen/dlclose", id);
        check_arena(before, my_rank, my_size, "a worker thread's malloc");
        free(before);
        done++;
    }
    return (void *)done;
}

static void run_threads(const char *phase) {
    pthread_t t[THREADS];
    for (long i = 0; i < THREADS; i++)
        CHECK(pthread_create(&t[i], NULL, worker, (void *)i) == 0);
    for (int i = 0; i < THREADS; i++) {
        void *ret = NULL;
        CHECK(pthread_join(t[i], &ret) == 0);
        if ((long)ret != rounds)
            fail("%s: thread %d did %ld of %ld cycles", phase, i, (long)ret, rounds);
    }
}

int main(int argc, char **argv) {
    need_api("dlloop");
    if (argc < 2) {
        fprintf(stderr, "usage: dlloop PLUGIN_SO [ROUNDS]\n");
        return 2;
    }
    plugin = argv[1];
    if (argc > 2)
        rounds = atol(argv[2]);
    rank_and_size(&my_rank, &my_size);
    run_threads("before joining");
    gallocy_barrier();
    run_threads("after joining");
    shared_check(my_rank, my_size);
    printf("rank %d of %d: dlopen loop ok (%ld cycles)\n", my_rank, my_size, 2 * THREADS * rounds);
    return 0;
}
