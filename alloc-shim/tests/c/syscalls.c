/* System calls whose buffer lives in gallocy's shared heap, in every coherence state.
 *
 * For each of read, readv, pread, pread64, recv, recvfrom, recvmsg (into the buffer) and write,
 * writev, pwrite, pwrite64, send, sendto, sendmsg (out of the buffer), with a regular file, a
 * pipe, an AF_UNIX stream socketpair, an AF_UNIX datagram socketpair or named AF_UNIX datagram
 * sockets as the other end, the calling rank ("A") makes the call on a buffer in a page that it
 * holds writable, holds read-only (it read a page the other rank "B" wrote last), or does not hold
 * at all (B wrote it after A touched it), and in buffers spanning pages in different states.
 * Buffers are either page-aligned multi-page areas of one gallocy_alloc_collective block, or a
 * small malloc'ed block sharing its page with another block ("the neighbour") that the other rank
 * uses. Every byte moved is checked, on A right after the call and on B afterwards (B must see the
 * bytes a read() put into the shared buffer), and the bytes around the buffer must keep B's latest
 * writes. Before every call A checks in /proc/self/maps that its pages really are in the state the
 * case is about (so a case can never pass without testing what it claims).
 *
 * Usage: syscalls [--mode core|meta|blocking] [--dir DIR] [--no-init] [--quiet] [--calls C,C..] [--kinds K,K..]
 *   core      the above (default). In a one-process job: buffers held writable only.
 *   meta      the call's own structures (iovec array, msghdr, socket address and its length) also
 *             live in a shared page that A does not hold or holds read-only (2 ranks).
 *   blocking  A blocks in the call (empty FIFO or socket; full FIFO or socket queue) while B takes
 *             the buffer's page away by writing next to the buffer, then B provides the data or
 *             room (2 ranks). "staged" cases: B provides the first 8 KiB (data, or room in a
 *             full FIFO), waits, takes the buffer's last page, then provides the rest: a blocking
 *             write to a FIFO and recv(MSG_WAITALL) on a stream never return short on private
 *             memory. Datagram receives run last (a lost datagram hangs the run).
 *   --no-init one-process job without any gallocy_* call (the library is only the malloc).
 *   --calls / --kinds: only these calls (read, readv, ...) / other ends (file, pipe, stream, dgram,
 *             named-dgram), e.g. to reproduce one failure.
 * Before joining the job, the program also does read/write on blocks malloc'ed while it is still a
 * local process, and checks them after joining.
 *
 * Prints "rank R: syscalls ok (MODE): N cases" and exits 0, or prints one "FAIL" line per wrong
 * case and "rank R: syscalls FAILED (MODE): K of N cases" and exits 1. A watchdog thread ends the
 * process with "HANG ..." and exit code 3 when one step of a case takes longer than 15 s
 * (GALLOCY_TEST_STEP_TIMEOUT seconds).
 *
 * Build: cc -O2 -pthread -I alloc-shim/include syscalls.c           (run with LD_PRELOAD / --preload, or
 *                                                           with glibc alone as a one-process job)
 *        cc -O2 -pthread -DGALLOCY_LINKED syscalls.c $(pkg-config --cflags --libs gallocy)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "gallocy.h"

#ifdef GALLOCY_LINKED
#define HAVE_API 1
#else
/* Not linked with libgallocy: the API comes from the preloaded library, or is absent (glibc). */
#pragma weak gallocy_init
#pragma weak gallocy_rank
#pragma weak gallocy_size
#pragma weak gallocy_barrier
#pragma weak gallocy_alloc_collective
#pragma weak gallocy_broadcast
#pragma weak gallocy_finalize
#define HAVE_API (gallocy_init != 0)
#endif

/* ------------------------------------------------------------------------------------ basics */

static int rank = 0, nranks = 1;
static long PG;
static char dir[256];
static const char *mode = "core";
static int quiet;
static int failures, ncases;

static char logbuf[16384];

/* printf-like, one line on stdout with a single write(2) from private memory (no stdio buffer
 * in the heap). */
static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(logbuf, sizeof logbuf, "rank %d: ", rank);
    int m = vsnprintf(logbuf + n, sizeof logbuf - (size_t)n - 2, fmt, ap);
    va_end(ap);
    if (m < 0) m = 0;
    n += m;
    if (n > (int)sizeof logbuf - 2) n = (int)sizeof logbuf - 2;
    logbuf[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(1, logbuf + off, (size_t)(n - off));
        if (w <= 0) break;
        off += (int)w;
    }
}

#define DIE(...) do { say("FATAL (line %d): ", __LINE__); say(__VA_ARGS__); exit(2); } while (0)
#define SYS(c) do { if ((c) < 0) DIE("%s: %s", #c, strerror(errno)); } while (0)

static void barrier(void) {
    if (nranks > 1) gallocy_barrier();
}

static void bcast(void *p, size_t n, int root) {
    if (nranks > 1) gallocy_broadcast(p, n, root);
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The byte at position i of the pattern `seed`. */
static inline uint8_t pat(uint32_t seed, size_t i) {
    uint32_t x = (uint32_t)i * 2654435761u ^ (seed * 0x9E3779B9u + 0x7f4a7c15u);
    x ^= x >> 15;
    x *= 0x85ebca6bu;
    x ^= x >> 13;
    return (uint8_t)x;
}

static void touch_read(const void *p) {
    (void)*(const volatile uint8_t *)p;
}

/* -------------------------------------------------------------------------------- watchdog */

/* What this rank is doing (a string literal) and in which case; the watchdog reports it. */
static const char *volatile step = "starting";
static volatile int step_case = -1;
static volatile double step_since;
static double step_timeout = 15;
/* How long the other rank waits for more bytes of a blocked output call (blocking mode). */
static double idle_s = 3;

static void at(const char *what, int idx) {
    step = what;
    step_case = idx;
    step_since = now_s();
}

/* ------------------------------------------------------------------------- page protections */

static char maps[1 << 22];

/* Protection of the pages at pages[0..n) as "rw", "r-" or "--" (from /proc/self/maps). */
static int page_perms(uint8_t *const *pages, int n, char out[][3]) {
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t len = 0;
    ssize_t r;
    while (len < sizeof maps - 1 && (r = read(fd, maps + len, sizeof maps - 1 - len)) > 0) len += (size_t)r;
    close(fd);
    maps[len] = 0;
    for (int k = 0; k < n; k++) strcpy(out[k], "??");
    for (char *line = maps; *line;) {
        char *end = strchr(line, '\n');
        char *dash;
        uintptr_t lo = strtoul(line, &dash, 16);
        if (*dash == '-') {
            char *sp;
            uintptr_t hi = strtoul(dash + 1, &sp, 16);
            if (*sp == ' ') {
                for (int k = 0; k < n; k++) {
                    uintptr_t a = (uintptr_t)pages[k];
                    if (a >= lo && a < hi) {
                        out[k][0] = sp[1] == 'r' ? 'r' : '-';
                        out[k][1] = sp[2] == 'w' ? 'w' : '-';
                        out[k][2] = 0;
                    }
                }
            }
        }
        if (!end) break;
        line = end + 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------ the cases */

enum call {
    C_READ, C_READV, C_PREAD, C_PREAD64, C_RECV, C_RECVFROM, C_RECVMSG,
    C_WRITE, C_WRITEV, C_PWRITE, C_PWRITE64, C_SEND, C_SENDTO, C_SENDMSG, NCALLS
};
static const char *call_name[NCALLS] = {"read", "readv", "pread", "pread64", "recv", "recvfrom", "recvmsg",
                                        "write", "writev", "pwrite", "pwrite64", "send", "sendto", "sendmsg"};
static int is_input(int c) { return c <= C_RECVMSG; }

/* Whether `name` is in the comma-separated `list` (NULL: everything is). */
static int listed(const char *list, const char *name) {
    if (!list) return 1;
    size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && strncmp(p, name, n) == 0) return 1;
        if (!e) break;
        p = e + 1;
    }
    return 0;
}
static int is_vector(int c) { return c == C_READV || c == C_RECVMSG || c == C_WRITEV || c == C_SENDMSG; }

/* The other end: a regular file, a pipe (FIFO in blocking mode), an AF_UNIX stream socketpair, an
 * AF_UNIX datagram socketpair, named AF_UNIX datagram sockets. */
enum kind { K_FILE, K_PIPE, K_STREAM, K_DGRAM, K_NAMED, NKINDS };
static const char *kind_name[NKINDS] = {"file", "pipe", "stream", "dgram", "named-dgram"};
#define KB(k) (1u << (k))
static const unsigned core_kinds[NCALLS] = {
    [C_READ] = KB(K_FILE) | KB(K_PIPE) | KB(K_STREAM) | KB(K_DGRAM),
    [C_READV] = KB(K_FILE) | KB(K_PIPE) | KB(K_STREAM),
    [C_PREAD] = KB(K_FILE),
    [C_PREAD64] = KB(K_FILE),
    [C_RECV] = KB(K_STREAM) | KB(K_DGRAM),
    [C_RECVFROM] = KB(K_STREAM) | KB(K_NAMED),
    [C_RECVMSG] = KB(K_STREAM) | KB(K_DGRAM),
    [C_WRITE] = KB(K_FILE) | KB(K_PIPE) | KB(K_STREAM) | KB(K_DGRAM),
    [C_WRITEV] = KB(K_FILE) | KB(K_PIPE) | KB(K_STREAM),
    [C_PWRITE] = KB(K_FILE),
    [C_PWRITE64] = KB(K_FILE),
    [C_SEND] = KB(K_STREAM) | KB(K_DGRAM),
    [C_SENDTO] = KB(K_STREAM) | KB(K_NAMED),
    [C_SENDMSG] = KB(K_STREAM) | KB(K_DGRAM),
};
/* Calls with structures of their own (iovec array, msghdr, address): mode meta. */
static const unsigned meta_kinds[NCALLS] = {
    [C_READV] = KB(K_FILE) | KB(K_PIPE),
    [C_RECVFROM] = KB(K_STREAM) | KB(K_NAMED),
    [C_RECVMSG] = KB(K_STREAM) | KB(K_DGRAM),
    [C_WRITEV] = KB(K_FILE) | KB(K_PIPE),
    [C_SENDTO] = KB(K_NAMED),
    [C_SENDMSG] = KB(K_STREAM) | KB(K_DGRAM),
};
/* Calls that can block: mode blocking (pipe = a FIFO shared by the two ranks; named = datagram
 * sockets of the two ranks; send uses a datagram socket connected to the peer's). */
static const unsigned blocking_kinds[NCALLS] = {
    [C_READ] = KB(K_PIPE), [C_READV] = KB(K_PIPE), [C_RECV] = KB(K_NAMED), [C_RECVFROM] = KB(K_NAMED),
    [C_RECVMSG] = KB(K_NAMED), [C_WRITE] = KB(K_PIPE), [C_WRITEV] = KB(K_PIPE), [C_SEND] = KB(K_NAMED),
    [C_SENDTO] = KB(K_NAMED), [C_SENDMSG] = KB(K_NAMED),
};

/* State of the buffer's pages in A when A makes the call. */
enum state {
    S_RW,            /* all pages held writable */
    S_RO,            /* all pages held read-only */
    S_NONE,          /* no page held */
    S_MIXED,         /* pages: writable, read-only, not held */
    S_MIXED_REV,     /* pages: not held, read-only, writable */
    S_SLAB_RW,       /* small block, its page held writable */
    S_SLAB_RO_OWN,   /* small block malloc'ed by A, page held read-only */
    S_SLAB_RO_PEER,  /* small block malloc'ed by B, page held read-only */
    S_SLAB_NONE_OWN, /* small block malloc'ed by A, page not held */
    S_SLAB_NONE_PEER,/* small block malloc'ed by B, page not held */
    S_META_NONE,     /* data pages and the call's structures not held */
    S_META_RO,       /* data pages not held, the call's structures held read-only */
    S_STAGED,        /* blocking mode: no page held; the last page is taken midway through the call */
    NSTATES
};
static const char *state_name[NSTATES] = {"rw", "ro", "none", "rw+ro+none", "none+ro+rw", "slab-rw",
                                          "slab-ro(own block)", "slab-ro(peer's block)", "slab-none(own block)",
                                          "slab-none(peer's block)", "none+structs-none", "none+structs-ro",
                                          "none, last page taken midway"};
static int is_slab(int s) { return s >= S_SLAB_RW && s <= S_SLAB_NONE_PEER; }
static int is_meta(int s) { return s == S_META_NONE || s == S_META_RO; }

/* Expected protections of the data pages (and the structures' page) in A before the call. */
static const char *want_perm(int s, int page) {
    switch (s) {
    case S_RW: case S_SLAB_RW: return "rw";
    case S_RO: case S_SLAB_RO_OWN: case S_SLAB_RO_PEER: return "r-";
    case S_NONE: case S_SLAB_NONE_OWN: case S_SLAB_NONE_PEER: case S_STAGED: return "--";
    case S_MIXED: return page == 0 ? "rw" : page == 1 ? "r-" : "--";
    case S_MIXED_REV: return page == 0 ? "--" : page == 1 ? "r-" : "rw";
    case S_META_NONE: return "--";
    case S_META_RO: return page == 3 ? "r-" : "--";
    }
    return "??";
}

struct tcase {
    int call, kind, state, A;
    uint32_t bseed, dseed, sseed; /* before (B's fill), data moved, B's "steal" writes */
};
static struct tcase cases[4096];

/* ------------------------------------------------------------------------------ geometry */

#define XS 200   /* small block size */
#define XOFF 20  /* buffer offset in the small block */
#define XLEN 150 /* buffer length in the small block */
#define ROFF 100 /* buffer offset in the 3-page area */
#define PRIV 64  /* private segment in the middle of vectored calls */
#define FOFF 777 /* file offset of pread/pwrite */

struct geo {
    uint8_t *area[2];
    size_t area_len[2];
    int nareas;
    uint8_t *buf; /* in area[0] */
    size_t len, split;
    uint8_t *pages[4];
    int npages; /* data pages; pages[3] is the structures' page in meta states */
    uint8_t *meta;
};

static uint8_t *pool;
static size_t pool_slots;
#define SLOT_PAGES 4

static void geo_region(struct geo *g, int idx) {
    if ((size_t)idx >= pool_slots) DIE("case %d: pool of %zu slots exhausted", idx, pool_slots);
    uint8_t *slot = pool + (size_t)idx * SLOT_PAGES * PG;
    memset(g, 0, sizeof *g);
    g->nareas = 1;
    g->area[0] = slot;
    g->area_len[0] = 3 * PG;
    g->buf = slot + ROFF;
    g->len = 3 * PG - 2 * ROFF;
    g->split = PG + 37;
    g->npages = 3;
    for (int i = 0; i < 4; i++) g->pages[i] = slot + i * PG;
    g->meta = slot + 3 * PG;
}

static int in_one_page(uintptr_t p, size_t n) {
    return p / PG == (p + n - 1) / PG;
}

/* Two XS-byte blocks malloc'ed by `allocator`, wholly inside one page; same pointers on all ranks. */
static void geo_slab(struct geo *g, int allocator) {
    uint64_t xy[2] = {0, 0};
    if (rank == allocator) {
        void *tried[256];
        int nt = 0, found = 0;
        while (!found) {
            if (nt == 256) DIE("no two %d-byte blocks in one page after 256 mallocs", XS);
            uint8_t *p = malloc(XS);
            if (!p) DIE("malloc(%d) returned NULL", XS);
            tried[nt++] = p;
            if (!in_one_page((uintptr_t)p, XS)) continue;
            for (int i = 0; i < nt - 1; i++) {
                uintptr_t q = (uintptr_t)tried[i];
                if (in_one_page(q, XS) && q / PG == (uintptr_t)p / PG) {
                    xy[0] = q;
                    xy[1] = (uintptr_t)p;
                    tried[i] = tried[nt - 1] = NULL;
                    found = 1;
                    break;
                }
            }
        }
        /* The other blocks stay allocated (never touched): freeing them could let a later
         * allocation land in this page. */
    }
    bcast(xy, sizeof xy, allocator);
    memset(g, 0, sizeof *g);
    g->nareas = 2;
    g->area[0] = (uint8_t *)(uintptr_t)xy[0];
    g->area[1] = (uint8_t *)(uintptr_t)xy[1];
    g->area_len[0] = g->area_len[1] = XS;
    g->buf = g->area[0] + XOFF;
    g->len = XLEN;
    g->split = 70;
    g->npages = 1;
    g->pages[0] = (uint8_t *)((uintptr_t)g->buf & ~(uintptr_t)(PG - 1));
}

/* Whether byte i of area k is inside the buffer, and if so its index in the byte stream moved by
 * the call (vectored calls have a private segment of PRIV bytes after `split` bytes). */
static long stream_index(const struct tcase *c, const struct geo *g, int k, size_t i) {
    if (k != 0) return -1;
    size_t off = (size_t)(g->buf - g->area[0]);
    if (i < off || i >= off + g->len) return -1;
    size_t j = i - off;
    if (is_vector(c->call) && !is_meta(c->state) && j >= g->split) j += PRIV;
    return (long)j;
}

/* The byte B writes at position i of area k (before the call, or when stealing the page). */
static uint8_t area_fill(uint32_t seed, int k, size_t i) {
    return pat(seed, ((size_t)k << 20) + i);
}

/* Expected content of byte i of area k after the case: inside the buffer, the data moved
 * (input) or B's fill (output); elsewhere B's fill, or B's steal pattern in blocking mode. */
static uint8_t expected(const struct tcase *c, const struct geo *g, int k, size_t i) {
    long j = stream_index(c, g, k, i);
    int blocking = strcmp(mode, "blocking") == 0;
    if (j >= 0) return is_input(c->call) ? pat(c->dseed, (size_t)j) : area_fill(c->bseed, k, i);
    return area_fill(blocking ? c->sseed : c->bseed, k, i);
}

static void fill_area_range(const struct geo *g, int k, size_t from, size_t to, uint32_t seed) {
    for (size_t i = from; i < to; i++) g->area[k][i] = area_fill(seed, k, i);
}

static void fill_all(const struct geo *g, uint32_t seed) {
    for (int k = 0; k < g->nareas; k++) fill_area_range(g, k, 0, g->area_len[k], seed);
}

/* Write `seed` to every byte of the areas outside the buffer (takes the buffer's pages). */
static void fill_outside(const struct tcase *c, const struct geo *g, uint32_t seed) {
    for (int k = 0; k < g->nareas; k++)
        for (size_t i = 0; i < g->area_len[k]; i++)
            if (stream_index(c, g, k, i) < 0) g->area[k][i] = area_fill(seed, k, i);
}

static char casebuf[256];
static const char *case_str(const struct tcase *c, int idx) {
    snprintf(casebuf, sizeof casebuf, "case %d: %s on %s, buffer %s, A=rank %d", idx, call_name[c->call],
             kind_name[c->kind], state_name[c->state], c->A);
    return casebuf;
}

/* Compare the areas with `expected`; one FAIL line with the first difference. */
static int check_areas(const struct tcase *c, const struct geo *g, int idx, const char *who) {
    for (int k = 0; k < g->nareas; k++) {
        size_t bad = 0, first = 0;
        uint8_t got = 0, want = 0;
        for (size_t i = 0; i < g->area_len[k]; i++) {
            uint8_t e = expected(c, g, k, i), v = g->area[k][i];
            if (v != e) {
                if (!bad++) { first = i; got = v; want = e; }
            }
        }
        if (bad) {
            say("FAIL %s: %s: %zu wrong bytes in %s (%zu bytes at %p); first at offset %zu (%s the buffer): "
                "0x%02x, expected 0x%02x", case_str(c, idx), who, bad, k == 0 ? (g->nareas == 2 ? "the block" : "the area") : "the neighbour block",
                g->area_len[k], (void *)g->area[k], first, stream_index(c, g, k, first) >= 0 ? "inside" : "outside", got, want);
            return 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------ the fds */

static int fd_file, pipefd[2], sp[2], dp[2], na, nb, nc;
static int fifo_own = -1, fifo_peer = -1;
static int st_listen = -1, st_in = -1, st_out = -1; /* blocking mode: stream peer -> me, me -> peer */
static struct sockaddr_un na_addr, nb_addr;
static socklen_t na_len, nb_len;

static socklen_t make_addr(struct sockaddr_un *a, int r, char which) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    int n = snprintf(a->sun_path, sizeof a->sun_path, "%s/r%d-%c.sock", dir, r, which);
    if (n >= (int)sizeof a->sun_path) DIE("socket path too long: %s", dir);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + (size_t)n + 1);
}

static int named_socket(struct sockaddr_un *a, socklen_t *len, char which) {
    *len = make_addr(a, rank, which);
    unlink(a->sun_path);
    int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    SYS(s);
    SYS(bind(s, (struct sockaddr *)a, *len));
    int big = 1 << 20;
    setsockopt(s, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    return s;
}

static void open_fds(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/file-r%d", dir, rank);
    fd_file = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    SYS(fd_file);
    SYS(pipe2(pipefd, O_CLOEXEC));
    SYS(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp));
    SYS(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, dp));
    int big = 1 << 20;
    for (int i = 0; i < 2; i++) {
        setsockopt(sp[i], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
        setsockopt(dp[i], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
        setsockopt(dp[i], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    }
    na = named_socket(&na_addr, &na_len, 'a');
    nb = named_socket(&nb_addr, &nb_len, 'b');
    struct sockaddr_un ca;
    socklen_t cl;
    nc = named_socket(&ca, &cl, 'c');
}

static void close_fds(void) {
    char path[512];
    close(fd_file);
    snprintf(path, sizeof path, "%s/file-r%d", dir, rank);
    unlink(path);
    close(pipefd[0]);
    close(pipefd[1]);
    for (int i = 0; i < 2; i++) { close(sp[i]); close(dp[i]); }
    close(na); close(nb); close(nc);
    unlink(na_addr.sun_path);
    unlink(nb_addr.sun_path);
    struct sockaddr_un ca;
    make_addr(&ca, rank, 'c');
    unlink(ca.sun_path);
    if (fifo_own >= 0) {
        close(fifo_own);
        close(fifo_peer);
        snprintf(path, sizeof path, "%s/fifo-r%d", dir, rank);
        unlink(path);
        close(st_in);
        close(st_out);
        close(st_listen);
        struct sockaddr_un sa;
        make_addr(&sa, rank, 's');
        unlink(sa.sun_path);
    }
}

static void set_nonblock(int fd, int on) {
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK));
}

static uint8_t scratch[1 << 17], stage[1 << 17], back[1 << 17], priv[PRIV];

/* Throw away whatever is readable on fd. */
static void drain(int fd) {
    set_nonblock(fd, 1);
    while (read(fd, scratch, sizeof scratch) > 0) {}
    set_nonblock(fd, 0);
}

static void drain_all(void) {
    drain(pipefd[0]);
    drain(sp[0]);
    drain(sp[1]);
    drain(dp[0]);
    drain(dp[1]);
    drain(na);
    drain(nb);
    drain(nc);
    if (fifo_own >= 0) drain(fifo_own);
    if (st_in >= 0) drain(st_in);
}

static int write_all(int fd, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Read up to `want` bytes that are already there (stops when nothing more is readable). */
static size_t collect(int fd, uint8_t *to, size_t want) {
    size_t got = 0;
    set_nonblock(fd, 1);
    while (got < want) {
        ssize_t r = read(fd, to + got, want - got);
        if (r <= 0) break;
        got += (size_t)r;
    }
    set_nonblock(fd, 0);
    return got;
}

/* ------------------------------------------------------------- the call's own structures */

/* In the structures' page of a meta case (built by B). */
struct meta {
    struct iovec iov[2];
    struct msghdr mh;
    socklen_t addrlen;
    struct sockaddr_un addr;
};

static void build_meta(const struct tcase *c, const struct geo *g) {
    struct meta *m = (struct meta *)g->meta;
    memset(m, 0, sizeof *m);
    m->iov[0].iov_base = g->buf;
    m->iov[0].iov_len = g->split;
    m->iov[1].iov_base = g->buf + g->split;
    m->iov[1].iov_len = g->len - g->split;
    m->mh.msg_iov = m->iov;
    m->mh.msg_iovlen = 2;
    m->addrlen = sizeof m->addr;
    if (c->call == C_RECVMSG && c->kind == K_DGRAM) {
        m->mh.msg_name = &m->addr;
        m->mh.msg_namelen = sizeof m->addr;
    }
    if (c->call == C_SENDTO) make_addr(&m->addr, c->A, 'b'); /* A's own "b" socket */
}

/* ------------------------------------------------------------------------------ A's call */

static int input_fd(int kind) {
    switch (kind) {
    case K_FILE: return fd_file;
    case K_PIPE: return fifo_own >= 0 ? fifo_own : pipefd[0];
    case K_STREAM: return st_in >= 0 ? st_in : sp[0];
    case K_DGRAM: return dp[0];
    default: return na;
    }
}

/* Put the n bytes of the input stream where the call will find them (core and meta modes). */
static void stage_input(const struct tcase *c, size_t n) {
    for (size_t j = 0; j < n; j++) stage[j] = pat(c->dseed, j);
    switch (c->kind) {
    case K_FILE: {
        off_t off = (c->call == C_PREAD || c->call == C_PREAD64) ? FOFF : 0;
        SYS(ftruncate(fd_file, 0));
        if (pwrite(fd_file, stage, n, off) != (ssize_t)n) DIE("staging file: %s", strerror(errno));
        SYS(lseek(fd_file, 0, SEEK_SET));
        break;
    }
    case K_PIPE: if (write_all(pipefd[1], stage, n)) DIE("staging pipe: %s", strerror(errno)); break;
    case K_STREAM: if (write_all(sp[1], stage, n)) DIE("staging stream: %s", strerror(errno)); break;
    case K_DGRAM: if (write(dp[1], stage, n) != (ssize_t)n) DIE("staging dgram: %s", strerror(errno)); break;
    case K_NAMED:
        if (sendto(nb, stage, n, 0, (struct sockaddr *)&na_addr, na_len) != (ssize_t)n)
            DIE("staging named dgram: %s", strerror(errno));
        break;
    }
}

struct outcome {
    ssize_t ret;
    int err;
    size_t want;
};

/* A's input call (the data is there, or will be in blocking mode). */
static struct outcome do_input(const struct tcase *c, const struct geo *g) {
    int meta = is_meta(c->state), vec = is_vector(c->call);
    size_t n = g->len + (vec && !meta ? PRIV : 0);
    struct iovec iov3[3] = {{g->buf, g->split}, {priv, PRIV}, {g->buf + g->split, g->len - g->split}};
    struct meta *m = meta ? (struct meta *)g->meta : NULL;
    struct iovec *iov = meta ? m->iov : iov3;
    int iovcnt = meta ? 2 : 3;
    struct msghdr mh_priv;
    struct sockaddr_un from;
    socklen_t fromlen = sizeof from;
    memset(&mh_priv, 0, sizeof mh_priv);
    mh_priv.msg_iov = iov3;
    mh_priv.msg_iovlen = 3;
    memset(priv, 0, sizeof priv);
    int fd = input_fd(c->kind);
    /* Cross-rank stream (blocking mode): the whole buffer, as a program using MSG_WAITALL expects. */
    int wait_all = st_in >= 0 && c->kind == K_STREAM ? MSG_WAITALL : 0;
    struct outcome o = {0, 0, n};
    errno = 0;
    switch (c->call) {
    case C_READ: o.ret = read(fd, g->buf, n); break;
    case C_READV: o.ret = readv(fd, iov, iovcnt); break;
    case C_PREAD: o.ret = pread(fd, g->buf, n, FOFF); break;
    case C_PREAD64: o.ret = pread64(fd, g->buf, n, FOFF); break;
    case C_RECV: o.ret = recv(fd, g->buf, n, wait_all); break;
    case C_RECVFROM:
        if (meta) o.ret = recvfrom(fd, g->buf, n, 0, (struct sockaddr *)&m->addr, &m->addrlen);
        else if (c->kind == K_NAMED) o.ret = recvfrom(fd, g->buf, n, 0, (struct sockaddr *)&from, &fromlen);
        else o.ret = recvfrom(fd, g->buf, n, 0, NULL, NULL);
        break;
    case C_RECVMSG: o.ret = recvmsg(fd, meta ? &m->mh : &mh_priv, wait_all); break;
    }
    o.err = errno;
    /* Check what the call wrote besides the buffer (after the call: touching is fine now). */
    if (o.ret == (ssize_t)n && c->call == C_RECVFROM && c->kind == K_NAMED && strcmp(mode, "blocking") != 0) {
        struct sockaddr_un *a = meta ? &m->addr : &from;
        socklen_t al = meta ? m->addrlen : fromlen;
        if (al != nb_len || strcmp(a->sun_path, nb_addr.sun_path) != 0) {
            o.ret = -2;
            o.err = 0;
            say("FAIL: recvfrom reported source address length %u path \"%.100s\", expected %u \"%s\"", (unsigned)al,
                a->sun_path, (unsigned)nb_len, nb_addr.sun_path);
        }
    }
    if (o.ret == (ssize_t)n && c->call == C_RECVMSG) {
        int fl = meta ? m->mh.msg_flags : mh_priv.msg_flags;
        if (fl & (MSG_TRUNC | MSG_CTRUNC)) {
            say("FAIL: recvmsg msg_flags 0x%x", fl);
            o.ret = -2;
        }
    }
    return o;
}

static int output_fd(int kind) {
    switch (kind) {
    case K_FILE: return fd_file;
    case K_PIPE: return fifo_own >= 0 ? fifo_own : pipefd[1];
    case K_STREAM: return sp[0];
    case K_DGRAM: return dp[0];
    default: return na;
    }
}

/* The byte stream an output call of this case must send (computed, the buffer is not touched). */
static size_t expected_output(const struct tcase *c, const struct geo *g, uint8_t *to) {
    int meta = is_meta(c->state), vec = is_vector(c->call);
    size_t off = (size_t)(g->buf - g->area[0]), n = 0;
    for (size_t i = 0; i < g->len; i++) {
        if (vec && !meta && i == g->split)
            for (size_t j = 0; j < PRIV; j++) to[n++] = pat(c->dseed, j);
        to[n++] = area_fill(c->bseed, 0, off + i);
    }
    return n;
}

static struct outcome do_output(const struct tcase *c, const struct geo *g, int blocking) {
    int meta = is_meta(c->state), vec = is_vector(c->call);
    size_t n = g->len + (vec && !meta ? PRIV : 0);
    for (size_t j = 0; j < PRIV; j++) priv[j] = pat(c->dseed, j);
    struct iovec iov3[3] = {{g->buf, g->split}, {priv, PRIV}, {g->buf + g->split, g->len - g->split}};
    struct meta *m = meta ? (struct meta *)g->meta : NULL;
    struct iovec *iov = meta ? m->iov : iov3;
    int iovcnt = meta ? 2 : 3;
    struct msghdr mh_priv;
    memset(&mh_priv, 0, sizeof mh_priv);
    mh_priv.msg_iov = iov3;
    mh_priv.msg_iovlen = 3;
    struct sockaddr_un peer_b;
    socklen_t peer_b_len = 0;
    if (blocking) {
        /* Everything goes to the peer's "b" socket. */
        peer_b_len = make_addr(&peer_b, 1 - c->A, 'b');
        mh_priv.msg_name = &peer_b;
        mh_priv.msg_namelen = peer_b_len;
    }
    int fd = output_fd(c->kind);
    if (c->kind == K_FILE) {
        SYS(ftruncate(fd_file, 0));
        SYS(lseek(fd_file, 0, SEEK_SET));
    }
    struct outcome o = {0, 0, n};
    errno = 0;
    switch (c->call) {
    case C_WRITE: o.ret = write(fd, g->buf, n); break;
    case C_WRITEV: o.ret = writev(fd, iov, iovcnt); break;
    case C_PWRITE: o.ret = pwrite(fd, g->buf, n, FOFF); break;
    case C_PWRITE64: o.ret = pwrite64(fd, g->buf, n, FOFF); break;
    case C_SEND: o.ret = send(blocking ? nc : fd, g->buf, n, MSG_NOSIGNAL); break;
    case C_SENDTO:
        if (blocking) o.ret = sendto(fd, g->buf, n, MSG_NOSIGNAL, (struct sockaddr *)&peer_b, peer_b_len);
        else if (meta) o.ret = sendto(fd, g->buf, n, MSG_NOSIGNAL, (struct sockaddr *)&m->addr, nb_len);
        else if (c->kind == K_NAMED) o.ret = sendto(fd, g->buf, n, MSG_NOSIGNAL, (struct sockaddr *)&nb_addr, nb_len);
        else o.ret = sendto(fd, g->buf, n, MSG_NOSIGNAL, NULL, 0);
        break;
    case C_SENDMSG: o.ret = sendmsg(fd, meta ? &m->mh : &mh_priv, MSG_NOSIGNAL); break;
    }
    o.err = errno;
    return o;
}

/* What arrived at the other end of an output call (core and meta modes). */
static size_t collect_output(const struct tcase *c, size_t n, int *extra) {
    *extra = 0;
    switch (c->kind) {
    case K_FILE: {
        off_t off = (c->call == C_PWRITE || c->call == C_PWRITE64) ? FOFF : 0;
        struct stat st;
        SYS(fstat(fd_file, &st));
        if (st.st_size != (off_t)(off + n)) *extra = 1;
        ssize_t r = pread(fd_file, back, n, off);
        return r < 0 ? 0 : (size_t)r;
    }
    case K_PIPE: return collect(pipefd[0], back, n);
    case K_STREAM: return collect(sp[1], back, n);
    case K_DGRAM: {
        ssize_t r = recv(dp[1], back, sizeof back, MSG_DONTWAIT);
        return r < 0 ? 0 : (size_t)r;
    }
    default: {
        struct sockaddr_un from;
        socklen_t fl = sizeof from;
        ssize_t r = recvfrom(nb, back, sizeof back, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
        if (r >= 0 && (fl != na_len || strcmp(from.sun_path, na_addr.sun_path) != 0)) *extra = 2;
        return r < 0 ? 0 : (size_t)r;
    }
    }
}

static const char *errname(int e) {
    switch (e) {
    case EFAULT: return "EFAULT";
    case EAGAIN: return "EAGAIN";
    case EINVAL: return "EINVAL";
    case EBADF: return "EBADF";
    case EINTR: return "EINTR";
    case 0: return "no errno";
    default: return strerror(e);
    }
}

static int check_outcome(const struct tcase *c, int idx, struct outcome o) {
    if (o.ret == (ssize_t)o.want) return 0;
    if (o.ret == -2) {
        say("FAIL %s: see the line above", case_str(c, idx));
    } else if (o.ret < 0) {
        say("FAIL %s: %s returned -1, errno %d (%s); expected %zu", case_str(c, idx), call_name[c->call], o.err,
            errname(o.err), o.want);
    } else {
        say("FAIL %s: %s moved %zd bytes, expected %zu (a short transfer on data that was all there)",
            case_str(c, idx), call_name[c->call], o.ret, o.want);
    }
    return 1;
}

/* ------------------------------------------------------------------------------ one case */

static int check_perms(const struct tcase *c, const struct geo *g, int idx) {
    uint8_t *pages[4];
    char got[4][3];
    int n = g->npages;
    for (int i = 0; i < n; i++) pages[i] = g->pages[i];
    if (is_meta(c->state)) pages[n++] = g->meta;
    if (page_perms(pages, n, got) != 0) DIE("cannot read /proc/self/maps");
    for (int i = 0; i < n; i++) {
        const char *want = want_perm(c->state, is_meta(c->state) && i == g->npages ? 3 : i);
        if (strcmp(got[i], want) != 0) {
            say("FAIL %s: SETUP: page %d (%p) is %s in this rank before the call, the case needs %s", case_str(c, idx),
                i, (void *)pages[i], got[i], want);
            return 1;
        }
    }
    return 0;
}

/* B's page stealing, A's state. Both ranks call it; in a one-process job this rank is both. */
static void establish(const struct tcase *c, const struct geo *g, int me_A, int me_B) {
    size_t P = (size_t)PG;
    switch (c->state) {
    case S_RW:
    case S_SLAB_RW:
        if (me_A) fill_all(g, c->bseed);
        break;
    case S_RO:
        if (me_A) for (int i = 0; i < 3; i++) touch_read(g->pages[i]);
        break;
    case S_SLAB_RO_OWN:
    case S_SLAB_RO_PEER:
        if (me_A) touch_read(g->area[1]);
        break;
    case S_NONE:
    case S_STAGED:
        if (me_A) for (int i = 0; i < 3; i++) touch_read(g->pages[i]);
        barrier();
        if (me_B) fill_all(g, c->bseed);
        break;
    case S_SLAB_NONE_OWN:
    case S_SLAB_NONE_PEER:
        if (me_A) touch_read(g->area[1]);
        barrier();
        if (me_B) fill_area_range(g, 1, 0, XS, c->bseed);
        break;
    case S_MIXED:
        if (me_A) {
            for (int i = 0; i < 3; i++) touch_read(g->pages[i]);
            fill_area_range(g, 0, 0, P, c->bseed);
        }
        barrier();
        if (me_B) fill_area_range(g, 0, 2 * P, 3 * P, c->bseed);
        break;
    case S_MIXED_REV:
        if (me_A) {
            for (int i = 0; i < 3; i++) touch_read(g->pages[i]);
            fill_area_range(g, 0, 2 * P, 3 * P, c->bseed);
        }
        barrier();
        if (me_B) fill_area_range(g, 0, 0, P, c->bseed);
        break;
    case S_META_NONE:
    case S_META_RO:
        if (me_A) for (int i = 0; i < 4; i++) touch_read(g->pages[i]);
        barrier();
        if (me_B) {
            fill_all(g, c->bseed);
            if (c->state == S_META_NONE) build_meta(c, g);
        }
        break;
    }
    barrier();
}

static void run_case(const struct tcase *c, int idx) {
    int me_A = rank == c->A, me_B = nranks == 1 || rank != c->A;
    struct geo g;
    if (is_slab(c->state)) {
        int own = c->state == S_SLAB_RO_OWN || c->state == S_SLAB_NONE_OWN || c->state == S_SLAB_RW;
        geo_slab(&g, own ? c->A : (nranks == 1 ? 0 : 1 - c->A));
    } else {
        geo_region(&g, idx);
    }
    ncases++;
    drain_all();
    at("the other rank writes the buffer's pages", idx);
    if (me_B) {
        fill_all(&g, c->bseed);
        if (is_meta(c->state)) build_meta(c, &g);
    }
    barrier();
    at("setting up the page states (page faults and barriers)", idx);
    establish(c, &g, me_A, me_B);
    int bad = 0;
    at("the calling rank makes the call and checks it", idx);
    if (me_A) {
        bad = check_perms(c, &g, idx);
        if (!bad) {
            if (is_input(c->call)) {
                int meta = is_meta(c->state);
                stage_input(c, g.len + (is_vector(c->call) && !meta ? PRIV : 0));
                struct outcome o = do_input(c, &g);
                bad = check_outcome(c, idx, o);
                if (!bad) bad = check_areas(c, &g, idx, "right after the call, in the calling rank");
                if (!bad && is_vector(c->call) && !meta) {
                    for (size_t j = 0; j < PRIV; j++)
                        if (priv[j] != pat(c->dseed, g.split + j)) {
                            say("FAIL %s: private iovec segment byte %zu wrong", case_str(c, idx), j);
                            bad = 1;
                            break;
                        }
                }
            } else {
                struct outcome o = do_output(c, &g, 0);
                bad = check_outcome(c, idx, o);
                size_t n = expected_output(c, &g, stage);
                int extra = 0;
                size_t got = collect_output(c, n, &extra);
                if (!bad && (got != n || memcmp(back, stage, n) != 0 || extra)) {
                    size_t k = 0;
                    while (k < got && k < n && back[k] == stage[k]) k++;
                    say("FAIL %s: the other end received %zu bytes (expected %zu)%s%s; first difference at byte %zu",
                        case_str(c, idx), got, n, extra == 1 ? ", file size wrong" : "",
                        extra == 2 ? ", wrong source address" : "", k);
                    bad = 1;
                }
            }
        }
    }
    /* B checks what A's call left in the shared pages (unless A already failed the case). */
    int a_bad = bad;
    at("waiting for the calling rank's verdict", idx);
    bcast(&a_bad, sizeof a_bad, c->A);
    at("the other rank reads the buffer", idx);
    if (me_B && nranks > 1 && !a_bad)
        bad = check_areas(c, &g, idx, "afterwards, in the other rank");
    if (bad) failures++;
}

/* -------------------------------------------------------------------------- blocking mode */

/* Like run_case, but A's call blocks (no data yet / no room) while B writes next to the buffer
 * (taking its page), then B provides the data or makes room. */
static void run_blocking_case(const struct tcase *c, int idx) {
    int me_A = rank == c->A, me_B = !me_A;
    struct geo g;
    if (is_slab(c->state)) {
        int own = c->state == S_SLAB_NONE_OWN || c->state == S_SLAB_RO_OWN;
        geo_slab(&g, own ? c->A : 1 - c->A);
    } else {
        geo_region(&g, idx);
    }
    ncases++;
    drain_all();
    at("the other rank writes the buffer's pages", idx);
    if (me_B) fill_all(&g, c->bseed);
    barrier();
    at("setting up the page states (page faults and barriers)", idx);
    establish(c, &g, me_A, me_B);
    int bad = 0;
    int input = is_input(c->call);
    at("filling the FIFO / socket queue", idx);
    size_t n = g.len + (is_vector(c->call) ? PRIV : 0);
    uint64_t filler = 0;
    if (me_A) {
        bad = check_perms(c, &g, idx);
        if (!input) {
            /* Fill the FIFO / the peer's socket queue until it would block. */
            int fd = c->kind == K_PIPE ? fifo_own : (c->call == C_SEND ? nc : na);
            struct sockaddr_un pb;
            socklen_t pbl = make_addr(&pb, 1 - c->A, 'b');
            memset(scratch, 0xEE, 4096);
            if (c->kind == K_PIPE) {
                set_nonblock(fd, 1);
                ssize_t w;
                while ((w = write(fd, scratch, 4096)) > 0) filler += (uint64_t)w;
                while ((w = write(fd, scratch, 1)) > 0) filler += (uint64_t)w;
                set_nonblock(fd, 0);
            } else {
                for (;;) {
                    ssize_t w = c->call == C_SEND ? send(fd, scratch, 1, MSG_DONTWAIT)
                                                  : sendto(fd, scratch, 1, MSG_DONTWAIT, (struct sockaddr *)&pb, pbl);
                    if (w != 1) break;
                    filler++;
                    if (filler > 100000) DIE("the peer's socket queue never filled");
                }
            }
        }
    }
    bcast(&filler, sizeof filler, c->A);
    at(input ? "blocked in the call until the other rank sends" : "blocked in the call until the other rank makes room", idx);
    if (me_A && !bad) {
        double t0 = now_s();
        struct outcome o = input ? do_input(c, &g) : do_output(c, &g, 1);
        if (!quiet) say("%s: the call returned %zd after %.0f ms", case_str(c, idx), o.ret, (now_s() - t0) * 1e3);
        bad = check_outcome(c, idx, o);
        if (!bad && input) {
            bad = check_areas(c, &g, idx, "right after the call, in the calling rank");
            if (!bad && is_vector(c->call))
                for (size_t j = 0; j < PRIV; j++)
                    if (priv[j] != pat(c->dseed, g.split + j)) {
                        say("FAIL %s: private iovec segment byte %zu wrong", case_str(c, idx), j);
                        bad = 1;
                        break;
                    }
        }
    }
    if (me_B) {
        /* A is (most likely) blocked in the call by now. Take the buffer's page(s) twice; staged:
         * first let the call move 8 KiB, then take the buffer's pages, then let it go on. */
        int staged = c->state == S_STAGED;
        size_t first = staged ? 8192 : 0;
        sleep_ms(30);
        if (staged) {
            at("the other rank lets the call move its first 8 KiB", idx);
            for (size_t j = 0; j < n; j++) stage[j] = pat(c->dseed, j);
            if (input) {
                if (write_all(st_out, stage, first)) DIE("sending to the peer: %s", strerror(errno));
            } else {
                size_t k = 0;
                while (k < first) {
                    ssize_t r = read(fifo_peer, scratch, first - k);
                    if (r <= 0) DIE("reading the peer's FIFO: %s", strerror(errno));
                    k += (size_t)r;
                }
            }
            sleep_ms(30);
        }
        at("the other rank writes next to the buffer while the calling rank is blocked in the call", idx);
        fill_outside(c, &g, c->sseed);
        sleep_ms(20);
        fill_outside(c, &g, c->sseed);
        at(input ? "the other rank sends the data" : "the other rank reads the FIFO / socket", idx);
        if (input) {
            for (size_t j = 0; j < n; j++) stage[j] = pat(c->dseed, j);
            if (c->kind == K_STREAM) {
                if (write_all(st_out, stage + first, n - first)) DIE("sending to the peer: %s", strerror(errno));
            } else if (c->kind == K_PIPE) {
                if (write_all(fifo_peer, stage, n)) DIE("writing the peer's FIFO: %s", strerror(errno));
            } else {
                struct sockaddr_un pa;
                socklen_t pal = make_addr(&pa, c->A, 'a');
                if (sendto(nb, stage, n, 0, (struct sockaddr *)&pa, pal) != (ssize_t)n)
                    DIE("sending to the peer: %s", strerror(errno));
            }
        } else {
            /* Make room: take the filler and then the call's bytes. */
            size_t want = expected_output(c, &g, stage);
            /* Give up 20 s after starting, or idle_s after the last byte (A's call failed). */
            double deadline = now_s() + 20, idle = now_s() + idle_s;
            size_t got = 0;
            uint64_t skipped = first;
            if (c->kind == K_PIPE) {
                set_nonblock(fifo_peer, 1);
                while (got < want && now_s() < deadline && now_s() < idle) {
                    ssize_t r;
                    if (skipped < filler) {
                        size_t k = filler - skipped < sizeof scratch ? (size_t)(filler - skipped) : sizeof scratch;
                        r = read(fifo_peer, scratch, k);
                        if (r > 0) skipped += (uint64_t)r;
                    } else {
                        r = read(fifo_peer, back + got, want - got);
                        if (r > 0) got += (size_t)r;
                    }
                    if (r <= 0) sleep_ms(1);
                    else idle = now_s() + idle_s;
                }
                set_nonblock(fifo_peer, 0);
            } else {
                uint64_t seen = 0;
                skipped = filler;
                while (seen < filler + 1 && now_s() < deadline && now_s() < idle) {
                    ssize_t r = recv(nb, back, sizeof back, MSG_DONTWAIT);
                    if (r < 0) { sleep_ms(1); continue; }
                    idle = now_s() + idle_s;
                    seen++;
                    if (seen == filler + 1) got = (size_t)r;
                }
            }
            if (got != want || memcmp(back, stage, want) != 0) {
                say("FAIL %s: the other rank received %zu bytes of the blocked call's %zu%s (after %llu of the %llu bytes "
                    "or datagrams that filled the %s; %s)", case_str(c, idx), got, want,
                    got == want ? " with wrong contents" : "", (unsigned long long)skipped, (unsigned long long)filler,
                    c->kind == K_PIPE ? "FIFO" : "socket queue",
                    now_s() >= deadline ? "gave up after 20 s" : "nothing more came for a while (GALLOCY_TEST_IDLE s)");
                bad = 1;
            }
        }
    }
    int a_bad = me_A ? bad : 0;
    at("waiting for the calling rank's verdict", idx);
    bcast(&a_bad, sizeof a_bad, c->A);
    at("the other rank reads the buffer", idx);
    if (me_B && !bad && !a_bad) bad = check_areas(c, &g, idx, "afterwards, in the other rank");
    if (bad) failures++;
    /* The root of a broadcast does not wait: without this, A's next case could drain its FIFO
     * before B has read the call's bytes. */
    at("end of case barrier", idx);
    barrier();
}

static void open_fifos(void) {
    char own[512], peer[512];
    snprintf(own, sizeof own, "%s/fifo-r%d", dir, rank);
    snprintf(peer, sizeof peer, "%s/fifo-r%d", dir, 1 - rank);
    unlink(own);
    SYS(mkfifo(own, 0600));
    barrier();
    fifo_own = open(own, O_RDWR | O_CLOEXEC);
    SYS(fifo_own);
    fifo_peer = open(peer, O_RDWR | O_CLOEXEC);
    SYS(fifo_peer);
    struct sockaddr_un pb;
    socklen_t pbl = make_addr(&pb, 1 - rank, 'b');
    SYS(connect(nc, (struct sockaddr *)&pb, pbl));
    /* A stream connection each way: listen, connect to the peer's listener, accept the peer. */
    struct sockaddr_un sa;
    socklen_t sal = make_addr(&sa, rank, 's');
    unlink(sa.sun_path);
    st_listen = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SYS(st_listen);
    SYS(bind(st_listen, (struct sockaddr *)&sa, sal));
    SYS(listen(st_listen, 4));
    barrier();
    sal = make_addr(&sa, 1 - rank, 's');
    st_out = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    SYS(st_out);
    SYS(connect(st_out, (struct sockaddr *)&sa, sal));
    st_in = accept4(st_listen, NULL, NULL, SOCK_CLOEXEC);
    SYS(st_in);
    barrier();
}

/* ----------------------------------------------------------------- before joining, bad pointers */

static uint8_t *early_area, *early_block;
static void *early_addr;

/* Before any gallocy_* call: read and write with malloc'ed buffers of a still-local process. */
static void before_joining(void) {
    early_area = aligned_alloc((size_t)PG, 3 * (size_t)PG);
    early_block = malloc(XS);
    if (!early_area || !early_block) DIE("malloc before joining failed");
    int p[2];
    SYS(pipe(p));
    for (size_t j = 0; j < 3 * (size_t)PG; j++) stage[j] = pat(7, j);
    if (write_all(p[1], stage, 3 * PG) != 0) DIE("pipe write");
    ssize_t r = read(p[0], early_area, 3 * PG);
    if (r != 3 * PG || memcmp(early_area, stage, 3 * PG) != 0) {
        say("FAIL before joining: read into a malloc'ed 3-page block returned %zd (errno %d %s)", r, errno, errname(errno));
        failures++;
    }
    memset(early_block, 0x5A, XS);
    r = write(p[1], early_block, XS);
    if (r != XS || collect(p[0], back, XS) != XS || back[0] != 0x5A || back[XS - 1] != 0x5A) {
        say("FAIL before joining: write from a malloc'ed block returned %zd", r);
        failures++;
    }
    close(p[0]);
    close(p[1]);
    ncases += 2;
}

static void after_joining(void) {
    for (size_t j = 0; j < 3 * (size_t)PG; j++)
        if (early_area[j] != pat(7, j)) {
            say("FAIL: a block malloc'ed before joining lost its contents at byte %zu after joining", j);
            failures++;
            break;
        }
    if (early_block[0] != 0x5A || early_block[XS - 1] != 0x5A) {
        say("FAIL: a small block malloc'ed before joining lost its contents after joining");
        failures++;
    }
    early_addr = early_area;
    free(early_area);
    free(early_block);
}

/* A bad pointer outside the heap is still EFAULT (not a crash, not a hang). */
static void bad_pointers(void) {
    uint8_t *none = mmap(NULL, (size_t)PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (none == MAP_FAILED) DIE("mmap");
    void *bad[2] = {(void *)16, none};
    for (int b = 0; b < 2; b++) {
        ssize_t r;
        errno = 0;
        memset(stage, 1, 64);
        write_all(pipefd[1], stage, 64);
        r = read(pipefd[0], bad[b], 64);
        int e1 = errno;
        drain(pipefd[0]);
        errno = 0;
        ssize_t w = write(pipefd[1], bad[b], 64);
        int e2 = errno;
        errno = 0;
        struct iovec iv = {bad[b], 64};
        write_all(sp[1], stage, 64);
        ssize_t rv = readv(sp[0], &iv, 1);
        int e3 = errno;
        drain(sp[0]);
        errno = 0;
        ssize_t s = send(sp[0], bad[b], 64, MSG_NOSIGNAL);
        int e4 = errno;
        drain(sp[1]);
        ncases++;
        if (!(r == -1 && e1 == EFAULT && w == -1 && e2 == EFAULT && rv == -1 && e3 == EFAULT && s == -1 && e4 == EFAULT)) {
            say("FAIL bad pointer %p (%s): read %zd/%s, write %zd/%s, readv %zd/%s, send %zd/%s; expected -1/EFAULT for all",
                bad[b], b ? "PROT_NONE private mapping" : "near NULL", r, errname(e1), w, errname(e2), rv, errname(e3), s,
                errname(e4));
            failures++;
        }
    }
    munmap(none, (size_t)PG);
}

static void *watchdog(void *arg) {
    (void)arg;
    static char buf[1024];
    for (;;) {
        sleep_ms(100);
        double since = step_since;
        if (since > 0 && now_s() - since > step_timeout) {
            int k = step_case, n;
            if (k >= 0)
                n = snprintf(buf, sizeof buf, "rank %d: HANG: no progress for %.0f s in case %d: %s on %s, buffer %s, "
                             "A=rank %d (mode %s); step: %s\n", rank, step_timeout, k, call_name[cases[k].call],
                             kind_name[cases[k].kind], state_name[cases[k].state], cases[k].A, mode, step);
            else
                n = snprintf(buf, sizeof buf, "rank %d: HANG: no progress for %.0f s; step: %s\n", rank, step_timeout, step);
            if (write(1, buf, (size_t)n) < 0) {}
            _exit(3);
        }
    }
    return NULL;
}

/* -------------------------------------------------------------------------------- main */

int main(int argc, char **argv) {
    int no_init = 0;
    const char *only_calls = NULL, *only_kinds = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mode") && i + 1 < argc) mode = argv[++i];
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc) snprintf(dir, sizeof dir, "%s", argv[++i]);
        else if (!strcmp(argv[i], "--no-init")) no_init = 1;
        else if (!strcmp(argv[i], "--quiet")) quiet = 1;
        else if (!strcmp(argv[i], "--calls") && i + 1 < argc) only_calls = argv[++i];
        else if (!strcmp(argv[i], "--kinds") && i + 1 < argc) only_kinds = argv[++i];
        else DIE("usage: %s [--mode core|meta|blocking] [--dir DIR] [--no-init] [--quiet] [--calls C,..] [--kinds K,..]",
                 argv[0]);
    }
    if (strcmp(mode, "core") && strcmp(mode, "meta") && strcmp(mode, "blocking")) DIE("unknown mode %s", mode);
    signal(SIGPIPE, SIG_IGN);
    PG = sysconf(_SC_PAGESIZE);
    const char *st = getenv("GALLOCY_TEST_STEP_TIMEOUT");
    if (st && atof(st) > 0) step_timeout = atof(st);
    const char *is = getenv("GALLOCY_TEST_IDLE");
    if (is && atof(is) > 0) idle_s = atof(is);
    pthread_t wd;
    at("before joining", -1);
    if (pthread_create(&wd, NULL, watchdog, NULL) != 0) DIE("pthread_create");

    before_joining();

    int api = HAVE_API && !no_init;
    at("gallocy_init", -1);
    if (api) {
        int e = gallocy_init();
        if (e != 0) DIE("gallocy_init returned %d", e);
        rank = gallocy_rank();
        nranks = gallocy_size();
    }
    if (nranks > 2) DIE("run with 1 or 2 processes (this job has %d)", nranks);
    after_joining();
    if (nranks < 2 && strcmp(mode, "core") != 0) DIE("mode %s needs a 2-process job", mode);

    /* A directory both ranks use (named sockets, FIFOs). */
    int made_dir = 0;
    if (!dir[0]) {
        if (rank == 0) {
            char tmpl[] = "/tmp/gallocy-syscalls-XXXXXX";
            if (!mkdtemp(tmpl)) DIE("mkdtemp: %s", strerror(errno));
            snprintf(dir, sizeof dir, "%s", tmpl);
            made_dir = 1;
        }
        bcast(dir, sizeof dir, 0);
    }
    at("opening files and sockets", -1);
    open_fds();
    if (!strcmp(mode, "blocking")) open_fifos();
    at("bad pointers", -1);
    bad_pointers();
    at("gallocy_alloc_collective", -1);

    /* The cases, in the same order on every rank. */
    int nc_total = 0;
    int nroles = nranks;
    /* Blocking mode: datagram receives last (pass 1), everything else first (pass 0). */
    for (int pass = 0; pass < 2; pass++)
    for (int A = 0; A < nroles; A++) {
        for (int s = 0; s < NSTATES; s++) {
            int core = !strcmp(mode, "core"), meta = !strcmp(mode, "meta"), blk = !strcmp(mode, "blocking");
            if (core && (is_meta(s) || (nranks == 1 && s != S_RW && s != S_SLAB_RW))) continue;
            if (meta && !is_meta(s)) continue;
            if (!blk && (s == S_STAGED || pass > 0)) continue;
            if (blk && s != S_SLAB_RO_PEER && s != S_SLAB_NONE_OWN && s != S_NONE && s != S_STAGED) continue;
            for (int call = 0; call < NCALLS; call++) {
                unsigned kinds = core ? core_kinds[call] : meta ? meta_kinds[call] : blocking_kinds[call];
                if (blk && s == S_STAGED) {
                    kinds = call == C_WRITE || call == C_WRITEV ? KB(K_PIPE)
                            : call == C_RECV || call == C_RECVMSG ? KB(K_STREAM) : 0;
                }
                for (int k = 0; k < NKINDS; k++) {
                    if (!(kinds & KB(k))) continue;
                    if (!listed(only_calls, call_name[call]) || !listed(only_kinds, kind_name[k])) continue;
                    /* A multi-page read from a FIFO may legitimately return early: slab buffers only. */
                    if (blk && k == K_PIPE && is_input(call) && !is_slab(s)) continue;
                    if (blk && (is_input(call) && k == K_NAMED) != (pass == 1)) continue;
                    if (nc_total == (int)(sizeof cases / sizeof cases[0])) DIE("too many cases");
                    struct tcase *c = &cases[nc_total];
                    c->call = call;
                    c->kind = k;
                    c->state = s;
                    c->A = A;
                    c->bseed = 1000u + 3u * (uint32_t)nc_total;
                    c->dseed = c->bseed + 1;
                    c->sseed = c->bseed + 2;
                    nc_total++;
                }
            }
        }
    }

    /* One gallocy_alloc_collective block for every multi-page buffer (page-aligned slots). */
    pool_slots = (size_t)nc_total;
    size_t pool_bytes = (pool_slots * SLOT_PAGES + 1) * (size_t)PG;
    uint8_t *raw = api ? gallocy_alloc_collective(pool_bytes) : aligned_alloc((size_t)PG, pool_bytes);
    if (!raw) DIE("allocating %zu bytes for the buffers failed", pool_bytes);
    pool = (uint8_t *)(((uintptr_t)raw + PG - 1) & ~(uintptr_t)(PG - 1));
    say("buffers: pool at %p (%d cases, mode %s, %d process%s; before joining a block was at %p)", (void *)pool,
        nc_total, mode, nranks, nranks > 1 ? "es" : "", early_addr);

    double t0 = now_s();
    int last_fail = 0;
    for (int i = 0; i < nc_total; i++) {
        if (!strcmp(mode, "blocking")) run_blocking_case(&cases[i], i);
        else run_case(&cases[i], i);
        if (!quiet && failures == last_fail && rank == cases[i].A && (i % 50 == 0))
            say("progress: %s ok", case_str(&cases[i], i));
        last_fail = failures;
    }

    /* Every rank tells how many failed: the job fails as a whole. */
    at("final barrier", -1);
    barrier();
    close_fds();
    barrier();
    if (made_dir) rmdir(dir);
    if (failures) {
        say("syscalls FAILED (%s): %d of %d cases (%.1f s)", mode, failures, ncases, now_s() - t0);
    } else {
        say("syscalls ok (%s): %d cases (%.1f s)", mode, ncases, now_s() - t0);
    }
    at("gallocy_finalize", -1);
    if (api && nranks > 1) gallocy_finalize();
    step_since = 0;
    return failures ? 1 : 0;
}
