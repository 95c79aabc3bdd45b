/* gallocy: distributed shared memory for C, C++ and Fortran programs.
 *
 * Link with libgallocy (`cc prog.c $(pkg-config --cflags --libs gallocy)`) or preload it
 * (`LD_PRELOAD=libgallocy.so`, or `gallocy run -n N --preload -- PROGRAM`). Either way the
 * library provides the whole malloc family: every malloc'ed block lives in one heap mapped at the
 * same virtual address in every process of the job, so a pointer made in one process is valid in
 * all of them. Pages move between processes on demand; the memory model is sequential
 * consistency (one writer or many readers per page), or, with GALLOCY_CONSISTENCY=release on
 * every rank, release consistency for data-race-free programs (many writers per page; a rank's
 * writes reach the others at its next gallocy_unlock / gallocy_barrier / gallocy_finalize, and
 * are seen after their next gallocy_lock / gallocy_barrier).
 *
 * The job is described by GALLOCY_RANK / GALLOCY_SIZE / GALLOCY_COORDINATOR (set by
 * `gallocy run`), or by mpirun (OMPI_COMM_WORLD_*), PMI (PMI_RANK/PMI_SIZE) or Slurm
 * (SLURM_PROCID/SLURM_NTASKS) plus GALLOCY_COORDINATOR. Without them a process is a one-process
 * job and libgallocy is simply a malloc. See the project README for every variable.
 */
#ifndef GALLOCY_H
#define GALLOCY_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Joins the job described by the environment: makes the heap shared and connects to the other
 * processes. Returns 0, or a negative errno value if this process cannot join (it is a forked
 * child of a member: the reason is printed on stderr). A member that fails to join prints why
 * and exits with status 1. Idempotent. Every job-wide call below (barrier, lock, unlock,
 * alloc_collective, broadcast, finalize) joins first; malloc never does: until its first
 * job-wide call a process allocates from its own arena of the heap without contacting anybody. */
int gallocy_init(void);

/* This process's rank, 0..gallocy_size()-1, known from the start (before joining). A process
 * started by a member (fork, a shell's command) is a one-process job: rank 0. */
int gallocy_rank(void);

/* Number of processes in the job, known from the start (1 in a one-process job). */
int gallocy_size(void);

/* Waits until every process of the job has called gallocy_barrier. One thread per process
 * calls it. Under release consistency it is a release and then an acquire. */
void gallocy_barrier(void);

/* Global lock `id`: at most one thread in the whole job holds it; waiters are served in arrival
 * order. Unlocking a lock this process does not hold is an error that stops the program.
 * Under release consistency, gallocy_lock is an acquire and gallocy_unlock a release. */
void gallocy_lock(unsigned id);
void gallocy_unlock(unsigned id);

/* Every rank calls it with the same size; every rank gets the same pointer to `size`
 * zero-filled bytes of the shared heap. */
void *gallocy_alloc_collective(size_t size);

/* Copies `len` bytes at `buf` of rank `root` into `buf` of every other rank. Every rank calls
 * it, in the same order, with the same `len` (e.g. to share a pointer). */
void gallocy_broadcast(void *buf, size_t len, int root);

/* Prints this process's statistics (faults, invalidations, bytes moved, fault latency
 * percentiles) on stderr now. GALLOCY_STATS=1 prints them at exit. */
void gallocy_stats_print(void);

/* Barrier, then leave the job. Returns 0, or a negative errno value. Every process of a
 * multi-process job that joined must leave before it exits; when the library is loaded, exit()
 * from any thread, main returning, _exit() and _Exit() do this automatically. After it,
 * touching a shared page this process did not hold is an error (while the process is exiting,
 * such a thread waits for the end instead). */
int gallocy_finalize(void);

#ifdef __cplusplus
}
#endif

#endif /* GALLOCY_H */
