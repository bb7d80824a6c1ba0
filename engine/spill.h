/* The spill file: objects the shared-memory store has no room for are
 * written to one unnamed temporary file (O_TMPFILE in TIDE_SPILL_DIR or
 * /tmp: nothing is left on disk however the process ends).  Space freed
 * there is reused first-fit and punched out (fallocate PUNCH_HOLE), and the
 * file is cut back when its tail is free, so it holds about what is spilled
 * now, not everything ever spilled.  Uses td.h only.
 */
#ifndef TD_SPILL_H
#define TD_SPILL_H
#include <stddef.h>

typedef struct td_spill td_spill_t;

/* A spill file in dir (NULL: TIDE_SPILL_DIR or /tmp), opened at the first
 * write.  Caller owns; td_spill_destroy closes and frees it, NULLing *sp. */
td_spill_t *td_spill_new(const char *dir);
void td_spill_destroy(td_spill_t **sp);

/* Writes len bytes from src; *off is where they went.  Returns 0,
 * TD_ENOSPACE when the disk is full (nothing is kept), or TD_EIO. */
int td_spill_write(td_spill_t *sp, const void *src, size_t len, size_t *off);
/* Reads back what td_spill_write put at off.  Returns 0 or TD_EIO. */
int td_spill_read(td_spill_t *sp, size_t off, void *dst, size_t len);
/* Gives back what td_spill_write put at off: reused, its disk space freed. */
void td_spill_free(td_spill_t *sp, size_t off, size_t len);

size_t td_spill_used(const td_spill_t *sp);  /* bytes spilled now */
size_t td_spill_end(const td_spill_t *sp);   /* the file's length */
/* The directory the file lives in, for messages. */
const char *td_spill_dir(const td_spill_t *sp);
#endif
