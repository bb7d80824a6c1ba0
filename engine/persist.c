/* Tide head persistence (see persist.h). */
#include "persist.h"

#include <sqlite3.h>
#include <stdio.h>
#include <sys/stat.h>

/* head.db lives in the session directory: never opened through a link. */
#ifndef SQLITE_OPEN_NOFOLLOW
#define SQLITE_OPEN_NOFOLLOW 0
#endif

static sqlite3 *td__db;
static sqlite3_stmt *td__put, *td__del, *td__each;

int td_persist_on(void) { return td__db != NULL; }

int td_persist_open(const char *path) {
  if (td__db) return 0;
  if (sqlite3_open_v2(path, &td__db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_NOFOLLOW,
                      NULL)) {
    fprintf(stderr, "tide: cannot open %s: %s\n", path, td__db ? sqlite3_errmsg(td__db) : "out of memory");
    td_persist_close();
    return -1;
  }
  chmod(path, 0600);
  char *err = NULL;
  if (sqlite3_exec(td__db,
                   "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                   "CREATE TABLE IF NOT EXISTS head(kind TEXT NOT NULL, key TEXT NOT NULL, val BLOB,"
                   " PRIMARY KEY(kind, key));",
                   NULL, NULL, &err) ||
      sqlite3_prepare_v2(td__db, "INSERT OR REPLACE INTO head(kind, key, val) VALUES(?, ?, ?)", -1, &td__put, NULL) ||
      sqlite3_prepare_v2(td__db, "DELETE FROM head WHERE kind = ? AND key = ?", -1, &td__del, NULL) ||
      sqlite3_prepare_v2(td__db, "SELECT key, val FROM head WHERE kind = ? ORDER BY key", -1, &td__each, NULL)) {
    fprintf(stderr, "tide: cannot use %s: %s\n", path, err ? err : sqlite3_errmsg(td__db));
    sqlite3_free(err);
    td_persist_close();
    return -1;
  }
  return 0;
}

void td_persist_close(void) {
  sqlite3_finalize(td__put);
  sqlite3_finalize(td__del);
  sqlite3_finalize(td__each);
  td__put = td__del = td__each = NULL;
  if (td__db) sqlite3_close(td__db);
  td__db = NULL;
}

void td_persist_put(const char *kind, const char *key, const void *val, size_t len) {
  if (!td__db) return;
  sqlite3_stmt *st = val ? td__put : td__del;
  sqlite3_bind_text(st, 1, kind, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, key, -1, SQLITE_STATIC);
  if (val) sqlite3_bind_blob64(st, 3, val, len, SQLITE_STATIC);
  if (sqlite3_step(st) != SQLITE_DONE)
    fprintf(stderr, "tide: cannot persist %s %s: %s\n", kind, key, sqlite3_errmsg(td__db));
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
}

void td_persist_each(const char *kind, td_persist_cb cb, void *ud) {
  if (!td__db) return;
  sqlite3_bind_text(td__each, 1, kind, -1, SQLITE_STATIC);
  while (sqlite3_step(td__each) == SQLITE_ROW) {
    const char *key = (const char *)sqlite3_column_text(td__each, 0);
    const void *val = sqlite3_column_blob(td__each, 1);
    size_t len = (size_t)sqlite3_column_bytes(td__each, 1);
    cb(ud, key ? key : "", val, len);
  }
  sqlite3_reset(td__each);
  sqlite3_clear_bindings(td__each);
}
