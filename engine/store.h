/* Tide shared-memory object store: one memfd region per node, mapped by
 * the node and every worker on it. This unit only allocates extents; the
 * node decides what lives where and spills to disk when it is full.
 * Freed extents are reused first, so their pages are already faulted in.
 */
#ifndef TD_STORE_H
#define TD_STORE_H

#include "td.h"

typedef struct td_store td_store_t;

/* Creates a store of `capacity` bytes. Caller owns the result. */
td_store_t *td_store_new(size_t capacity);
void td_store_destroy(td_store_t **s); /* idempotent, NULLs *s */
int td_store_fd(const td_store_t *s);
uint8_t *td_store_base(const td_store_t *s);
size_t td_store_capacity(const td_store_t *s);
size_t td_store_used(const td_store_t *s);
/* Allocates n bytes; *off receives the offset. Returns 0 or TD_ESTOREFULL. */
int td_store_alloc(td_store_t *s, size_t n, size_t *off);
void td_store_free(td_store_t *s, size_t off, size_t n);

/* Maps an existing store fd (in a worker). Returns the base or NULL. */
uint8_t *td_store_map(int fd, size_t *capacity);

#endif
