/* forkhook.so: a library preloaded next to libgallocy.so whose constructor registers a
 * `pthread_atfork` child handler that reads and rewrites the heap bytes `forkhook_block` points
 * to (set by the program), recording what it read in `forkhook_read`. Child handlers run in the
 * order they were registered; gallocy registers its own when it starts, at the process's first
 * allocation or in its constructor, so in practice this one runs after gallocy's has given the
 * child its copy of the heap.
 *
 * Build: cc -O2 -shared -fPIC -pthread -o forkhook.so forkhook.c */
#define _GNU_SOURCE
#include <pthread.h>

volatile unsigned char *forkhook_block;
volatile int forkhook_read = -1;

static void child(void) {
    volatile unsigned char *b = forkhook_block;
    if (!b)
        return;
    forkhook_read = b[0];
    b[0] = (unsigned char)(b[0] + 1);
}

__attribute__((constructor)) static void init(void) {
    pthread_atfork(NULL, NULL, child);
}
