// Can process W take away process R's read copy (a page of R's own memfd, mapped in R) without R's CPU:
// punch the page out of R's memfd, and R's next read faults into R (uffd MISSING + SIGBUS)?
// Build and run: gcc -O2 -o remote-punch remote-punch.c && ./remote-punch (prints the punch time and how R saw it).
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <linux/falloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char *page;
static void on_bus(int sig, siginfo_t *si, void *ctx) { _exit(si->si_addr == page ? 42 : 43); }
static double now_us(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }

int main(void) {
    int p[2]; pipe(p); int q[2]; pipe(q);
    int mfd = memfd_create("r", 0); ftruncate(mfd, 1 << 20);
    pid_t pid = fork();
    if (pid == 0) { // R: a reader holding a copy in its own memfd
        page = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
        memset(page, 7, 4096);
        int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_SIGBUS };
        if (ioctl(uffd, UFFDIO_API, &api)) { perror("UFFDIO_API"); _exit(3); }
        struct uffdio_register reg = { .range = { (unsigned long)page, 1 << 20 }, .mode = UFFDIO_REGISTER_MODE_MISSING };
        if (ioctl(uffd, UFFDIO_REGISTER, &reg)) { perror("UFFDIO_REGISTER"); _exit(4); }
        mprotect(page, 4096, PROT_READ);
        struct sigaction sa = { .sa_sigaction = on_bus, .sa_flags = SA_SIGINFO }; sigaction(SIGBUS, &sa, NULL);
        volatile char v = page[0];   // a read copy, mapped
        write(q[1], "r", 1);
        char go; read(p[0], &go, 1); // W punched our page out
        v = page[0];                 // must fault into us now (SIGBUS), not read zeros
        _exit(v == 7 ? 10 : 11);
    }
    char r; read(q[0], &r, 1);
    // W: open R's memfd through /proc (as a same-host peer would) and punch the page out.
    char path[64]; snprintf(path, sizeof path, "/proc/%d/fd/%d", pid, mfd);
    int fd = open(path, O_RDWR);
    if (fd < 0) { perror("open peer memfd"); return 1; }
    double t0 = now_us();
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)) perror("punch");
    double t1 = now_us();
    write(p[1], "g", 1);
    int st; waitpid(pid, &st, 0);
    printf("punch from W: %.2f us; R exit %d (42 = SIGBUS at its next read of the punched page)\n", t1 - t0,
           WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st));
    return 0;
}
