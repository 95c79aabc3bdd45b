/* forkflush [FORKS [hook]]
 *
 * A joined job member forks while another of its threads keeps flushing every stdio stream.
 * `fflush(NULL)` holds stdio's list lock while it writes the FILE structures, which live on the
 * heap; glibc's `fork` takes that same lock after the fork handlers. A fork that froze the heap
 * while the flushing thread held the lock deadlocked here: the flushing thread waited for the
 * heap while holding the lock, and the fork waited for the lock.
 *
 * Every rank joins (gallocy_barrier), opens /dev/null as a stdio stream (its FILE and buffer come
 * from malloc, so from the shared heap) and fills a 64 KiB block with a pattern. A second thread
 * then writes a line to the stream and calls fflush(NULL) in a loop, and from time to time
 * rewrites the block under a mutex. The main thread forks FORKS times (default 200): the child
 * requires the block to be one whole generation of the pattern (the one the mutex, held across
 * the fork, left there), writes to the stream, allocates and frees, and exits 0; the parent
 * reaps it and requires exit 0. Each rank prints "rank R of N: fork beside fflush ok (F forks)".
 *
 * With `hook`, forkhook.so is preloaded too (its `forkhook_*` symbols must resolve): its child
 * handler reads and bumps the block's first byte. The child then requires that the handler read
 * the byte the parent had at the fork and that its write stuck, and the parent requires that its
 * own byte did not change.
 *
 * A third argument `clone` instead makes each rank create one child with a raw clone system call,
 * which runs no fork handlers: the child touches the heap, which it does not have, and must end
 * with gallocy's clear error (the parent requires exit code 1) instead of using the parent's
 * connections. Each rank then prints "rank R of N: raw clone child stopped (page P)", P being the
 * page of the heap it touched.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include "shapes.h"

#define BLK (64 * 1024)

static unsigned char *blk;
static uint64_t gen;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static atomic_int stop;
static FILE *sink;

static void fill(uint64_t g) {
    for (size_t i = 0; i < BLK; i++)
        blk[i] = (unsigned char)(g * 31 + i * 7);
}

/* Whether the block holds one whole generation of the pattern (of any generation). */
static int whole(void) {
    unsigned char first = blk[0];
    for (size_t i = 1; i < BLK; i++)
        if (blk[i] != (unsigned char)(first + i * 7))
            return 0;
    return 1;
}

static void *flusher(void *arg) {
    (void)arg;
    unsigned long n = 0;
    while (!atomic_load(&stop)) {
        fprintf(sink, "line %lu of the flushing thread\n", n);
        fflush(NULL);
        if (++n % 64 == 0) {
            pthread_mutex_lock(&mu);
            fill(++gen);
            pthread_mutex_unlock(&mu);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    need_api("forkflush");
    int forks = argc > 1 ? atoi(argv[1]) : 200;
    int hook = argc > 2 && strcmp(argv[2], "hook") == 0;
    volatile unsigned char **hook_block = NULL;
    volatile int *hook_read = NULL;
    if (hook) {
        hook_block = dlsym(RTLD_DEFAULT, "forkhook_block");
        hook_read = dlsym(RTLD_DEFAULT, "forkhook_read");
        CHECK(hook_block && hook_read);
    }
    gallocy_barrier();
    shapes_rank = gallocy_rank();
    int n = gallocy_size();
    sink = fopen("/dev/null", "w");
    CHECK(sink != NULL);
    CHECK(arena_of(sink, n) == shapes_rank);
    blk = malloc(BLK);
    CHECK(blk != NULL && arena_of(blk, n) == shapes_rank);
    fill(gen);
    if (argc > 2 && strcmp(argv[2], "clone") == 0) {
        pid_t pid = (pid_t)syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
        if (pid == 0) {
            volatile unsigned char b = blk[0];
            (void)b;
            _exit(0);
        }
        CHECK(pid > 0);
        int status;
        CHECK(waitpid(pid, &status, 0) == pid);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 1)
            fail("the raw clone child ended with status %#x, not exit code 1", status);
        gallocy_barrier();
        printf("rank %d of %d: raw clone child stopped (page %llu)\n", shapes_rank, n,
               (unsigned long long)(((uintptr_t)blk - SHAPES_HEAP_BASE) / (uintptr_t)sysconf(_SC_PAGESIZE)));
        fflush(stdout);
        return 0;
    }
    if (hook)
        *hook_block = blk;
    pthread_t t;
    CHECK(pthread_create(&t, NULL, flusher, NULL) == 0);
    for (int i = 0; i < forks; i++) {
        /* The block is whole at the fork: the mutex keeps the flusher from rewriting it. */
        pthread_mutex_lock(&mu);
        unsigned char at_fork = blk[0];
        pid_t pid = fork();
        if (pid == 0) {
            if (hook) {
                if (*hook_read != at_fork || blk[0] != (unsigned char)(at_fork + 1))
                    _exit(6);
                blk[0] = at_fork;
            }
            if (!whole())
                _exit(3);
            fprintf(sink, "child %d\n", i);
            if (fflush(sink) != 0)
                _exit(4);
            void *p = malloc(1000);
            if (!p)
                _exit(5);
            memset(p, 1, 1000);
            free(p);
            _exit(0);
        }
        CHECK(blk[0] == at_fork);
        pthread_mutex_unlock(&mu);
        CHECK(pid > 0);
        int status;
        CHECK(waitpid(pid, &status, 0) == pid);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fail("fork %d: the child ended with status %#x", i, status);
    }
    atomic_store(&stop, 1);
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(fclose(sink) == 0);
    free(blk);
    gallocy_barrier();
    printf("rank %d of %d: fork beside fflush ok (%d forks)%s\n", shapes_rank, n, forks, hook ? " with a hook" : "");
    fflush(stdout);
    return 0;
}
