/*
 * fork_malloc: fork() under a malloc replacement, while other threads allocate.
 *
 * The parent fills BLOCKS heap blocks with known contents, starts 2 threads that keep
 * allocating and freeing, and forks CHILDREN times. Each child checks the parent's blocks,
 * overwrites them all, frees half of them, allocates (also from a new thread of its own) and
 * exits: by exit() or by _exit(), alternately, and every fourth child forks a grandchild that
 * does the same checks. After each child the parent checks that its own blocks are untouched
 * (fork gives the child a copy of the heap, not a shared one) and that it can still allocate.
 *
 * This is the classic place where allocators deadlock (a lock held by another thread at fork
 * time stays locked forever in the child) or corrupt memory. The output does not depend on
 * allocator addresses or on timing.
 *
 * Usage: fork_malloc [CHILDREN]     (default 40)
 * Build: cc -O2 -pthread -o fork_malloc examples/fork_malloc.c
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define BLOCKS 2000

static unsigned char *blocks[BLOCKS];
static size_t sizes[BLOCKS];
static atomic_int stop;

static unsigned char pattern(size_t i, size_t k) {
    return (unsigned char)(i * 31 + k * 7 + 1);
}

static size_t size_of(size_t i) {
    return 8 + (i * 2654435761u) % 3000;
}

/* 0 if block i holds its pattern. */
static int check_block(size_t i) {
    for (size_t k = 0; k < sizes[i]; k++)
        if (blocks[i][k] != pattern(i, k))
            return -1;
    return 0;
}

static int check_all(const char *who) {
    for (size_t i = 0; i < BLOCKS; i++) {
        if (check_block(i) != 0) {
            fprintf(stderr, "fork_malloc: %s: block %zu (%zu bytes at %p) was changed\n", who, i, sizes[i],
                    (void *)blocks[i]);
            return -1;
        }
    }
    return 0;
}

/* Allocate and free in a loop until told to stop (or `rounds` times when rounds > 0). */
static void *churn(void *arg) {
    long rounds = (long)(intptr_t)arg;
    uint64_t x = 88172645463325252ull ^ (uint64_t)rounds;
    void *keep[64] = { 0 };
    for (long r = 0; rounds == 0 ? !atomic_load(&stop) : r < rounds; r++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        unsigned s = (unsigned)(x % 64);
        free(keep[s]);
        keep[s] = malloc(16 + x % 2048);
        if (keep[s] == NULL)
            abort();
        memset(keep[s], (int)s, 16);
    }
    for (unsigned s = 0; s < 64; s++)
        free(keep[s]);
    return NULL;
}

/* What a child (or grandchild) does; returns its exit status. */
static int child_work(int n, int depth) {
    char who[64];
    snprintf(who, sizeof who, "%s %d", depth == 1 ? "child" : "grandchild", n);
    if (check_all(who) != 0)
        return 3;
    if (depth == 1 && n % 4 == 0) {
        pid_t g = fork();
        if (g < 0) {
            perror("fork_malloc: fork (grandchild)");
            return 4;
        }
        if (g == 0)
            _exit(child_work(n, 2));
        int st;
        if (waitpid(g, &st, 0) != g || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "fork_malloc: grandchild of child %d failed (status %#x)\n", n, st);
            return 5;
        }
    }
    /* The copy is ours: scribble over it, free half, allocate. */
    for (size_t i = 0; i < BLOCKS; i++)
        memset(blocks[i], 0xEE, sizes[i]);
    for (size_t i = 0; i < BLOCKS; i += 2) {
        free(blocks[i]);
        blocks[i] = NULL;
    }
    for (size_t i = 0; i < BLOCKS; i += 2) {
        blocks[i] = malloc(sizes[i]);
        if (blocks[i] == NULL)
            return 6;
        memset(blocks[i], 0x11, sizes[i]);
    }
    pthread_t t;
    if (pthread_create(&t, NULL, churn, (void *)(intptr_t)20000) != 0)
        return 7;
    pthread_join(t, NULL);
    return 0;
}

int main(int argc, char **argv) {
    int children = argc > 1 ? atoi(argv[1]) : 40;
    uint64_t checksum = 0;
    for (size_t i = 0; i < BLOCKS; i++) {
        sizes[i] = size_of(i);
        blocks[i] = malloc(sizes[i]);
        if (blocks[i] == NULL) {
            fprintf(stderr, "fork_malloc: malloc failed\n");
            return 1;
        }
        for (size_t k = 0; k < sizes[i]; k++)
            blocks[i][k] = pattern(i, k);
        checksum += sizes[i];
    }
    pthread_t threads[2];
    for (int t = 0; t < 2; t++) {
        if (pthread_create(&threads[t], NULL, churn, NULL) != 0) {
            fprintf(stderr, "fork_malloc: pthread_create failed\n");
            return 1;
        }
    }
    int failed = 0;
    for (int n = 0; n < children && !failed; n++) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork_malloc: fork");
            failed = 1;
            break;
        }
        if (pid == 0) {
            int rc = child_work(n, 1);
            if (n % 2 == 0)
                exit(rc); /* atexit handlers, stdio flush, the allocator's exit hooks */
            _exit(rc);
        }
        int st = 0;
        if (waitpid(pid, &st, 0) != pid) {
            perror("fork_malloc: waitpid");
            failed = 1;
            break;
        }
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            if (WIFSIGNALED(st))
                fprintf(stderr, "fork_malloc: child %d killed by signal %d\n", n, WTERMSIG(st));
            else
                fprintf(stderr, "fork_malloc: child %d exited with status %d\n", n, WEXITSTATUS(st));
            failed = 1;
        }
        if (check_all("parent after a child") != 0)
            failed = 1;
        /* The parent's allocator still works after the fork (replace one block). */
        size_t i = (size_t)n % BLOCKS;
        free(blocks[i]);
        blocks[i] = malloc(sizes[i]);
        if (blocks[i] == NULL) {
            failed = 1;
            break;
        }
        for (size_t k = 0; k < sizes[i]; k++)
            blocks[i][k] = pattern(i, k);
        checksum = checksum * 31 + (uint64_t)n;
    }
    atomic_store(&stop, 1);
    for (int t = 0; t < 2; t++)
        pthread_join(threads[t], NULL);
    if (failed || check_all("parent at the end") != 0) {
        fprintf(stderr, "fork_malloc: FAILED\n");
        return 1;
    }
    for (size_t i = 0; i < BLOCKS; i++)
        free(blocks[i]);
    printf("fork_malloc: %d children ok, checksum %016" PRIx64 "\n", children, checksum);
    return 0;
}
