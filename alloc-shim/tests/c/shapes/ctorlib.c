/* ctorlib.so: a library preloaded next to libgallocy.so whose constructor, which runs before
 * main and possibly before libgallocy.so's own constructor, dlopens libm, calls into it,
 * allocates (malloc, calloc, realloc, strdup) and runs a thread that allocates, joined before
 * the constructor returns. shapes_ctorlib_status() says "ok" or what went wrong.
 *
 * Build: cc -O2 -shared -fPIC -pthread -o ctorlib.so ctorlib.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *status = "constructor did not run";
static char *saved;
static char why[200];

static void *thread_main(void *arg) {
    (void)arg;
    long good = 0;
    for (int i = 0; i < 5000; i++) {
        size_t n = 1 + (size_t)(i * 37) % 2000;
        unsigned char *p = malloc(n);
        if (!p)
            return (void *)-1L;
        p[0] = (unsigned char)i;
        p[n - 1] = (unsigned char)i;
        char *s = strdup("thread of a preloaded constructor");
        if (s && p[0] == (unsigned char)i && p[n - 1] == (unsigned char)i && strlen(s) == 33)
            good++;
        free(s);
        free(p);
    }
    return (void *)good;
}

__attribute__((constructor)) static void ctorlib_init(void) {
    void *h = dlopen("libm.so.6", RTLD_NOW);
    if (!h) {
        snprintf(why, sizeof why, "dlopen(libm.so.6) failed: %s", dlerror());
        status = why;
        return;
    }
    double (*cosine)(double) = (double (*)(double))dlsym(h, "cos");
    double (*root)(double) = (double (*)(double))dlsym(h, "sqrt");
    if (!cosine || !root || cosine(0.0) != 1.0 || root(49.0) != 7.0) {
        status = "libm's cos/sqrt missing or wrong";
        return;
    }
    saved = strdup("made in a preloaded constructor");
    int *a = calloc(1000, sizeof(int));
    if (!saved || !a) {
        status = "strdup/calloc returned NULL";
        return;
    }
    for (int i = 0; i < 1000; i++) {
        if (a[i] != 0) {
            status = "calloc block not zeroed";
            return;
        }
        a[i] = i;
    }
    a = realloc(a, 100000 * sizeof(int));
    if (!a || a[999] != 999) {
        status = "realloc lost the contents";
        return;
    }
    free(a);
    pthread_t t;
    void *ret = NULL;
    if (pthread_create(&t, NULL, thread_main, NULL) != 0 || pthread_join(t, &ret) != 0 || (long)ret != 5000) {
        snprintf(why, sizeof why, "the constructor's thread did %ld of 5000 allocation rounds", (long)ret);
        status = why;
        return;
    }
    status = "ok";
}

const char *shapes_ctorlib_status(void) {
    if (saved && strcmp(saved, "made in a preloaded constructor") != 0)
        return "the constructor's strdup block changed";
    return status;
}
