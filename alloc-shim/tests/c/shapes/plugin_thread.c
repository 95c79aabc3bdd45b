/* plugin_thread.so: a plugin whose constructor starts threads that allocate.
 *
 * The constructor runs inside dlopen, which holds the dynamic loader's lock. It starts thread
 * T1 and waits for it (at most 30 s) before returning, so T1's first allocation, its
 * allocations through the plugin's dynamic TLS (__tls_get_addr allocates) and its exit all
 * happen while the loader lock is held by another thread: none of them may need that lock.
 * It then starts thread T2, which goes on allocating after dlopen returned; the program waits
 * for it with plugin_join().
 *
 * Build: cc -O2 -shared -fPIC -pthread -o plugin_thread.so plugin_thread.c */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Larger than glibc's static TLS surplus: a dlopen'ed module's TLS block then comes from
 * malloc, on each thread's first access. */
static __thread unsigned char tls_block[16384];

static pthread_t t2;
static long t1_result = -1;
static int t2_started;

/* `rounds` rounds of malloc/calloc/realloc/strdup/free with contents checked; returns the
 * number of good rounds. */
static void *churn(void *arg) {
    long rounds = (long)arg, good = 0;
    for (long i = 0; i < rounds; i++) {
        size_t n = 1 + (size_t)(i * 7919) % 5000;
        unsigned char *p = malloc(n);
        if (!p)
            break;
        memset(p, (int)(i & 0xff), n);
        tls_block[(size_t)i % sizeof tls_block] = (unsigned char)i;
        unsigned char *q = (i % 7 == 0) ? realloc(p, n * 3) : p;
        if (!q)
            break;
        int *z = (i % 5 == 0) ? calloc(16, sizeof(int)) : NULL;
        char *s = (i % 3 == 0) ? strdup("plugin thread") : NULL;
        int ok = q[0] == (unsigned char)i && q[n - 1] == (unsigned char)i &&
                 tls_block[(size_t)i % sizeof tls_block] == (unsigned char)i && (!z || z[15] == 0) &&
                 (!s || strcmp(s, "plugin thread") == 0);
        free(s);
        free(z);
        free(q);
        if (ok)
            good++;
    }
    return (void *)good;
}

enum { T1_ROUNDS = 20000, T2_ROUNDS = 200000 };

__attribute__((constructor)) static void plugin_init(void) {
    pthread_t t1;
    if (pthread_create(&t1, NULL, churn, (void *)(long)T1_ROUNDS) != 0) {
        fprintf(stderr, "plugin_thread: pthread_create failed in the constructor\n");
        return;
    }
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 30;
    void *ret = NULL;
    int e = pthread_timedjoin_np(t1, &ret, &deadline);
    if (e != 0) {
        fprintf(stderr,
                "plugin_thread: FAIL: the thread started by the constructor did not finish within 30 s while "
                "dlopen holds the loader lock (%s)\n",
                e == ETIMEDOUT ? "still running" : strerror(e));
        fflush(stderr);
        _exit(4);
    }
    t1_result = (long)ret;
    if (pthread_create(&t2, NULL, churn, (void *)(long)T2_ROUNDS) == 0)
        t2_started = 1;
}

/* Good rounds of T1 (T1_ROUNDS when all went well). */
long plugin_t1(void) {
    return t1_result;
}

/* Waits for T2; its good rounds (T2_ROUNDS when all went well), -1 if it never started. */
long plugin_join(void) {
    if (!t2_started)
        return -1;
    void *ret = NULL;
    if (pthread_join(t2, &ret) != 0)
        return -2;
    return (long)ret;
}
