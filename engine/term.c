/* Terminal status area (term.h). One mutex orders the writes of the thread
 * that draws bars and of the pump that forwards prints. */
#include "term.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pthread_mutex_t td__term_mu = PTHREAD_MUTEX_INITIALIZER;
static char *td__area; /* the area's text, owned */
static size_t td__area_len;
static int td__area_lines; /* lines the drawn area takes (0: none drawn) */

/* Clears the drawn area: the cursor is at the end of its last line. */
static void td__erase(void) {
  if (!td__area_lines) return;
  fputs("\r\33[2K", stderr);
  for (int i = 1; i < td__area_lines; i++) fputs("\33[1A\33[2K", stderr);
  td__area_lines = 0;
}

static void td__draw(void) {
  if (!td__area_len) {
    fflush(stderr);
    return;
  }
  fwrite(td__area, 1, td__area_len, stderr);
  fflush(stderr);
  td__area_lines = 1;
  for (size_t i = 0; i < td__area_len; i++) td__area_lines += td__area[i] == '\n';
}

void td_term_write(int fd, const void *s, size_t l) {
  FILE *f = fd == 2 ? stderr : stdout;
  pthread_mutex_lock(&td__term_mu);
  if (!td__area_lines) {
    fwrite(s, 1, l, f);
    fflush(f);
  } else {
    td__erase();
    fflush(stderr);
    fwrite(s, 1, l, f);
    if (l && ((const char *)s)[l - 1] != '\n') fputc('\n', f);
    fflush(f);
    td__draw();
  }
  pthread_mutex_unlock(&td__term_mu);
}

void td_term_print(const void *s, size_t l) { td_term_write(1, s, l); }

void td_term_area(const char *text, size_t l) {
  pthread_mutex_lock(&td__term_mu);
  td__erase();
  free(td__area);
  td__area = NULL;
  td__area_len = 0;
  if (l) {
    td__area = malloc(l);
    if (td__area) {
      memcpy(td__area, text, l);
      td__area_len = l;
    }
  }
  td__draw();
  pthread_mutex_unlock(&td__term_mu);
}

void td_term_commit(const char *text, size_t l) {
  pthread_mutex_lock(&td__term_mu);
  td__erase();
  fwrite(text, 1, l, stderr);
  td__draw();
  pthread_mutex_unlock(&td__term_mu);
}
