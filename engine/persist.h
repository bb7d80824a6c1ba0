/* Tide head persistence: the tables a head must not forget (named and
 * detached actors, the KV, jobs, node indices) in an SQLite file in its
 * session directory, so that a head restarted after a crash resumes them
 * — what Ray needs an external Redis for. One store per process, opened
 * only by `tide start --head`; every call is a no-op when it is closed.
 * Uses libsqlite3.
 */
#ifndef TD_PERSIST_H
#define TD_PERSIST_H

#include <stddef.h>

/* Opens (creating) the store at path, mode 0600. Returns 0 or -1 (printed). */
int td_persist_open(const char *path);
void td_persist_close(void);
int td_persist_on(void);
/* Sets kind/key to val (len bytes); val NULL deletes it. Written through
 * (WAL, synchronous=NORMAL): it survives a kill -9 of the head. */
void td_persist_put(const char *kind, const char *key, const void *val, size_t len);
/* Calls cb for every row of a kind, in key order. */
typedef void (*td_persist_cb)(void *ud, const char *key, const void *val, size_t len);
void td_persist_each(const char *kind, td_persist_cb cb, void *ud);

#endif
