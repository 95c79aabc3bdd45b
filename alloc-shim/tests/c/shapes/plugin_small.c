/* plugin_small.so: loaded and unloaded over and over by dlloop. Its constructor and destructor
 * allocate and free, and plugin_work allocates and uses the plugin's dynamic TLS (which glibc
 * allocates with malloc on a thread's first access after each load).
 *
 * Build: cc -O2 -shared -fPIC -o plugin_small.so plugin_small.c */
#include <stdlib.h>
#include <string.h>

static char *name;
static __thread unsigned char tls_block[8192];

__attribute__((constructor)) static void small_init(void) {
    name = strdup("small plugin");
}

__attribute__((destructor)) static void small_fini(void) {
    free(name);
    name = NULL;
}

/* 3 * x + strlen("small plugin"), computed the long way; -1 if something is wrong. */
long plugin_work(long x) {
    if (!name || strcmp(name, "small plugin") != 0)
        return -1;
    size_t n = 1 + (size_t)x % 3000;
    unsigned char *p = malloc(n);
    if (!p)
        return -1;
    memset(p, 3, n);
    tls_block[(size_t)x % sizeof tls_block] = 1;
    long sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += p[i];
    free(p);
    if (tls_block[(size_t)x % sizeof tls_block] != 1)
        return -1;
    return sum / (long)n * x + (long)strlen(name);
}
