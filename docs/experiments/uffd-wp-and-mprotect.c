// Does a userfaultfd write-protect registration coexist with mprotect on the same pages?
// Build and run: gcc -O2 -o uffd-wp-and-mprotect uffd-wp-and-mprotect.c && ./uffd-wp-and-mprotect (prints the signal each access raised).
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
static sigjmp_buf jb; static volatile int last;
static void on(int sig, siginfo_t *si, void *c) { last = sig; siglongjmp(jb, 1); }
static int try_write(char *p) { last = 0; if (!sigsetjmp(jb, 1)) { *(volatile char *)p = 1; return 0; } return last; }
static int try_read(char *p) { last = 0; if (!sigsetjmp(jb, 1)) { (void)*(volatile char *)p; return 0; } return last; }
int main(void) {
    int mfd = memfd_create("m", 0); ftruncate(mfd, 1 << 16);
    char *p = mmap(NULL, 1 << 16, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0); p[0] = 1;
    int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_SIGBUS | UFFD_FEATURE_WP_HUGETLBFS_SHMEM };
    if (ioctl(uffd, UFFDIO_API, &api)) { perror("api"); return 1; }
    struct uffdio_register reg = { .range = { (unsigned long)p, 1 << 16 }, .mode = UFFDIO_REGISTER_MODE_WP };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg)) { perror("register"); return 1; }
    struct sigaction sa = { .sa_sigaction = on, .sa_flags = SA_SIGINFO }; sigaction(SIGSEGV, &sa, 0); sigaction(SIGBUS, &sa, 0);
    struct uffdio_writeprotect wp = { .range = { (unsigned long)p, 4096 }, .mode = UFFDIO_WRITEPROTECT_MODE_WP };
    printf("registered, RW:                 write -> %d\n", try_write(p));
    ioctl(uffd, UFFDIO_WRITEPROTECT, &wp);
    printf("uffd WP:                        write -> %d (SIGBUS=%d), read -> %d\n", try_write(p), SIGBUS, try_read(p));
    mprotect(p, 4096, PROT_NONE);
    printf("uffd WP + PROT_NONE:            read -> %d (SIGSEGV=%d)\n", try_read(p), SIGSEGV);
    mprotect(p, 4096, PROT_READ | PROT_WRITE);
    printf("uffd WP, PROT_READ|WRITE again: write -> %d (WP kept across mprotect?)\n", try_write(p));
    wp.mode = 0; ioctl(uffd, UFFDIO_WRITEPROTECT, &wp);
    printf("WP lifted:                      write -> %d\n", try_write(p));
    return 0;
}
