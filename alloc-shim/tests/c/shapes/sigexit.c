/* sigexit MODE
 *
 * `_exit(0)` from a signal handler in rank 0 of a 2-rank job while rank 0 waits in
 * gallocy_barrier() for rank 1, which reaches that barrier 3 s later. Every rank joins first
 * (gallocy_barrier).
 *   thread       a second thread of rank 0 waits in the barrier; the handler runs on the main
 *                thread (outside gallocy), so `_exit` leaves the job properly: its barrier is the
 *                next one, which rank 1's exit completes. Rank 0's thread prints "rank 0 of 2:
 *                barrier passed"; rank 1 prints "rank 1 of 2: barrier passed" and returns 0
 *                2 s later (its exit ends rank 0's process, which must not cut the print).
 *   interrupted  the handler interrupts rank 0's main thread inside the barrier (gallocy's own
 *                code, which cannot be entered again): `_exit` ends the process at once, without
 *                leaving the job. Rank 1 must then stop with gallocy's clear error about rank 0
 *                (lost contact), not wait for ever. */
#include <pthread.h>
#include <signal.h>

#include "shapes.h"

static void on_alarm(int s) {
    (void)s;
    _exit(0);
}

static void *waiter(void *arg) {
    (void)arg;
    gallocy_barrier();
    printf("rank 0 of 2: barrier passed\n");
    fflush(stdout);
    return NULL;
}

int main(int argc, char **argv) {
    need_api("sigexit");
    CHECK(argc > 1);
    int thread = strcmp(argv[1], "thread") == 0;
    gallocy_barrier();
    shapes_rank = gallocy_rank();
    CHECK(gallocy_size() == 2);
    if (shapes_rank == 1) {
        sleep(3);
        gallocy_barrier();
        printf("rank 1 of 2: barrier passed\n");
        fflush(stdout);
        /* Rank 1's exit completes rank 0's leaving barrier, after which rank 0's process ends
         * with whatever its waiter thread has not printed yet: give that thread time to print. */
        sleep(2);
        return 0;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    CHECK(sigaction(SIGALRM, &sa, NULL) == 0);
    if (thread) {
        /* Only the main thread takes the signal. */
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGALRM);
        CHECK(pthread_sigmask(SIG_BLOCK, &s, NULL) == 0);
        pthread_t t;
        CHECK(pthread_create(&t, NULL, waiter, NULL) == 0);
        CHECK(pthread_sigmask(SIG_UNBLOCK, &s, NULL) == 0);
        alarm(1);
        for (;;)
            pause();
    }
    alarm(1);
    gallocy_barrier();
    fail("the barrier with rank 1 ended before rank 1 came");
}
