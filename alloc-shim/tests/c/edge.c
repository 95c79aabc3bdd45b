/* Edge cases of the malloc replacement: threads racing gallocy's start, thread-exit destructors
 * that allocate, fork, dlopen, and the whole malloc family. Prints "edge ok" and exits 0. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "edge: check failed at line %d: %s\n", __LINE__, #c); exit(1); } } while (0)

static pthread_key_t key;

static void destructor(void *p) {
    /* Runs at thread exit: allocate and free while TLS is being torn down. */
    char *q = malloc(100);
    CHECK(q != NULL);
    memset(q, 7, 100);
    free(q);
    free(p);
}

static void *early_worker(void *arg) {
    (void)arg;
    void *keep = malloc(32);
    pthread_setspecific(key, keep);
    for (int i = 0; i < 20000; i++) {
        size_t n = 1 + (size_t)(i * 37) % 3000;
        unsigned char *p = malloc(n);
        CHECK(p != NULL);
        p[0] = (unsigned char)i;
        p[n - 1] = (unsigned char)i;
        p = realloc(p, n * 2);
        CHECK(p != NULL && p[0] == (unsigned char)i);
        free(p);
    }
    return NULL;
}

static void family(void) {
    void *p = NULL;
    CHECK(posix_memalign(&p, 4096, 100) == 0 && ((uintptr_t)p % 4096) == 0);
    free(p);
    CHECK(posix_memalign(&p, 3, 100) == EINVAL);
    p = aligned_alloc(64, 640);
    CHECK(p && ((uintptr_t)p % 64) == 0);
    free(p);
    p = memalign(256, 10);
    CHECK(p && ((uintptr_t)p % 256) == 0);
    free(p);
    p = valloc(10);
    CHECK(p && ((uintptr_t)p % 4096) == 0);
    free(p);
    p = pvalloc(5000);
    CHECK(p && ((uintptr_t)p % 4096) == 0 && malloc_usable_size(p) >= 8192);
    free(p);
    int *a = calloc(1000, sizeof(int));
    CHECK(a);
    for (int i = 0; i < 1000; i++) CHECK(a[i] == 0);
    a = reallocarray(a, 2000, sizeof(int));
    CHECK(a);
    free(a);
    errno = 0;
    CHECK(reallocarray(NULL, SIZE_MAX / 2, 4) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(calloc(SIZE_MAX / 2, 4) == NULL && errno == ENOMEM);
    /* Rounding up to whole pages must not wrap around to a one-page block. */
    errno = 0;
    CHECK(pvalloc(SIZE_MAX) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(pvalloc(SIZE_MAX - 10) == NULL && errno == ENOMEM);
    /* An alignment that cannot be rounded up to a power of two is refused, as glibc does. */
    errno = 0;
    CHECK(memalign((SIZE_MAX >> 1) + 2, 64) == NULL && errno == EINVAL);
    char *s = malloc(10);
    strcpy(s, "abc");
    s = realloc(s, 100000);
    CHECK(strcmp(s, "abc") == 0 && malloc_usable_size(s) >= 100000);
    s = realloc(s, 5);
    CHECK(memcmp(s, "abc", 4) == 0);
    free(s);
    CHECK(realloc(malloc(1), 0) == NULL);
    free(NULL);
}

int main(void) {
    /* Threads that start allocating at once, racing the allocator's start-up. */
    pthread_key_create(&key, destructor);
    pthread_t t[4];
    for (int i = 0; i < 4; i++) CHECK(pthread_create(&t[i], NULL, early_worker, NULL) == 0);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);

    family();

    /* dlopen a library and use it. */
    void *m = dlopen("libm.so.6", RTLD_NOW);
    CHECK(m != NULL);
    double (*cosine)(double) = (double (*)(double))dlsym(m, "cos");
    CHECK(cosine && cosine(0.0) == 1.0);
    dlclose(m);

    /* fork: the child allocates, frees and checks the parent's data; the parent's data survives. */
    int *data = malloc(1000 * sizeof(int));
    for (int i = 0; i < 1000; i++) data[i] = i;
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        for (int i = 0; i < 1000; i++) if (data[i] != i) _exit(3);
        for (int i = 0; i < 1000; i++) data[i] = -1; /* must not reach the parent */
        for (int i = 0; i < 10000; i++) { char *q = malloc(1 + i % 500); if (!q) _exit(4); q[0] = 1; free(q); }
        free(data);
        exit(0); /* runs exit handlers: a child of a job member must not try to leave the job */
    }
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    for (int i = 0; i < 1000; i++) CHECK(data[i] == i);
    free(data);

    printf("edge ok\n");
    return 0;
}
