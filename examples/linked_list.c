/*
 * linked_list: one rank builds a linked list with plain malloc, every rank walks it.
 *
 * Rank 0 builds a list of N nodes (values 1..N) with ordinary malloc. Run with the preloaded
 * allocator, those nodes live in gallocy's shared heap, which every process maps at the same
 * addresses, so after a barrier rank 0 only has to broadcast the head pointer: every rank then
 * follows the very same pointers, sums the values and checks the sum against N(N+1)/2. Finally
 * rank 0 frees the list (after a barrier, so nobody is still reading it).
 *
 * Build:  PKG_CONFIG_PATH=target/release/pkgconfig cc -O2 -o linked_list examples/linked_list.c \
 *             $(pkg-config --cflags --libs gallocy)
 * Run:    target/release/gallocy run -n 4 --preload -- ./linked_list [N]     (default N = 100000)
 *
 * Prints "rank R: sum S ok" on success; exits 1 with a message on any mismatch.
 */
#include <gallocy.h>

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct node {
    struct node *next;
    uint64_t value;
    uint64_t check; /* value * 3 + 1: catches a node whose contents are half right */
};

int main(int argc, char **argv) {
    uint64_t n = argc > 1 ? strtoull(argv[1], NULL, 10) : 100000;
    int rc = gallocy_init();
    if (rc != 0) {
        fprintf(stderr, "linked_list: gallocy_init failed: %s\n", strerror(-rc));
        return 1;
    }
    int rank = gallocy_rank();
    int size = gallocy_size();

    struct node *head = NULL;
    if (rank == 0) {
        /* Build back to front so the list reads 1, 2, ..., n. */
        for (uint64_t v = n; v >= 1; v--) {
            struct node *nd = malloc(sizeof *nd);
            if (nd == NULL) {
                fprintf(stderr, "linked_list: rank 0: malloc failed at node %" PRIu64 "\n", v);
                return 1;
            }
            nd->value = v;
            nd->check = v * 3 + 1;
            nd->next = head;
            head = nd;
        }
    }
    gallocy_barrier();
    gallocy_broadcast(&head, sizeof head, 0);

    uint64_t sum = 0, count = 0, expect_value = 1;
    for (const struct node *nd = head; nd != NULL; nd = nd->next) {
        if (nd->value != expect_value || nd->check != nd->value * 3 + 1) {
            fprintf(stderr, "linked_list: rank %d: node %" PRIu64 " at %p holds value %" PRIu64 " check %" PRIu64
                    ", expected value %" PRIu64 "\n", rank, count, (const void *)nd, nd->value, nd->check,
                    expect_value);
            return 1;
        }
        sum += nd->value;
        count++;
        expect_value++;
        if (count > n) {
            fprintf(stderr, "linked_list: rank %d: more than %" PRIu64 " nodes (a cycle?)\n", rank, n);
            return 1;
        }
    }
    uint64_t expected = n * (n + 1) / 2;
    if (count != n || sum != expected) {
        fprintf(stderr, "linked_list: rank %d of %d: %" PRIu64 " nodes with sum %" PRIu64 ", expected %" PRIu64
                " nodes with sum %" PRIu64 "\n", rank, size, count, sum, n, expected);
        return 1;
    }
    printf("rank %d: sum %" PRIu64 " ok\n", rank, sum);
    fflush(stdout);

    /* Everyone has finished reading: the builder frees its nodes. */
    gallocy_barrier();
    if (rank == 0) {
        while (head != NULL) {
            struct node *next = head->next;
            free(head);
            head = next;
        }
    }
    rc = gallocy_finalize();
    if (rc != 0) {
        fprintf(stderr, "linked_list: rank %d: gallocy_finalize failed: %s\n", rank, strerror(-rc));
        return 1;
    }
    return 0;
}
