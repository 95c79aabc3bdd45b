// Can process B write-protect a page of process A's shared-memfd mapping through A's userfaultfd?
// Build and run: gcc -O2 -o uffd-remote-wp uffd-remote-wp.c && ./uffd-remote-wp (prints the cost and how A saw it).
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
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

static void send_fd(int sock, int fd) {
    char buf[CMSG_SPACE(sizeof(int))]; memset(buf, 0, sizeof buf);
    struct iovec io = { .iov_base = "x", .iov_len = 1 };
    struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof buf };
    struct cmsghdr *c = CMSG_FIRSTHDR(&m); c->cmsg_level = SOL_SOCKET; c->cmsg_type = SCM_RIGHTS; c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    if (sendmsg(sock, &m, 0) != 1) { perror("sendmsg"); exit(1); }
}
static int recv_fd(int sock) {
    char buf[CMSG_SPACE(sizeof(int))]; char x;
    struct iovec io = { .iov_base = &x, .iov_len = 1 };
    struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof buf };
    if (recvmsg(sock, &m, 0) != 1) { perror("recvmsg"); exit(1); }
    int fd; memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof(int)); return fd;
}
static double now_us(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }

int main(void) {
    int sv[2]; socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    int mfd = memfd_create("h", 0); ftruncate(mfd, 1 << 20);
    pid_t pid = fork();
    if (pid == 0) { // A: the owner
        close(sv[0]);
        page = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
        page[0] = 1;
        int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        if (uffd < 0) { perror("userfaultfd"); _exit(2); }
        struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_SIGBUS | UFFD_FEATURE_WP_HUGETLBFS_SHMEM };
        if (ioctl(uffd, UFFDIO_API, &api)) { perror("UFFDIO_API"); _exit(3); }
        struct uffdio_register reg = { .range = { (unsigned long)page, 1 << 20 }, .mode = UFFDIO_REGISTER_MODE_WP };
        if (ioctl(uffd, UFFDIO_REGISTER, &reg)) { perror("UFFDIO_REGISTER"); _exit(4); }
        struct sigaction sa = { .sa_sigaction = on_bus, .sa_flags = SA_SIGINFO }; sigaction(SIGBUS, &sa, NULL);
        send_fd(sv[1], uffd);
        char go; read(sv[1], &go, 1);   // B write-protected pages
        page[0] = 2;                    // must SIGBUS now
        _exit(0);
    }
    close(sv[1]);
    int uffd = recv_fd(sv[0]);
    // B: write-protect and unprotect A's first page many times, timing it.
    struct uffdio_writeprotect wp = { .range = { 0, 4096 }, .mode = UFFDIO_WRITEPROTECT_MODE_WP };
    // B does not know A's address directly; A maps the memfd at the address A chose. Read it from /proc/A/maps.
    char path[64]; snprintf(path, sizeof path, "/proc/%d/maps", pid);
    unsigned long a = 0; char line[512];
    for (int tries = 0; tries < 100 && !a; tries++) {
        FILE *f = fopen(path, "r");
        while (f && fgets(line, sizeof line, f)) if (strstr(line, "/memfd:h")) { sscanf(line, "%lx", &a); break; }
        if (f) fclose(f);
        if (!a) usleep(1000);
    }
    wp.range.start = a;
    double t0 = now_us(); int n = 2000, bad = 0;
    for (int i = 0; i < n; i++) {
        wp.mode = UFFDIO_WRITEPROTECT_MODE_WP; if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp)) bad++;
        wp.mode = 0; if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp)) bad++;
    }
    double t1 = now_us();
    wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp)) { perror("UFFDIO_WRITEPROTECT from B"); }
    write(sv[0], "g", 1);
    int st; waitpid(pid, &st, 0);
    printf("A at %#lx; %d protect+unprotect pairs from B: %.2f us per pair, %d errors; A exit %d (42 = SIGBUS on its write to the page B protected)\n",
           a, n, (t1 - t0) / n, bad, WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st));
    return 0;
}
