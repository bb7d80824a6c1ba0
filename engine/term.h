/* Terminal status area: lines (progress bars, stdlib/tide/progress.lua)
 * kept at the bottom of the terminal on stderr and redrawn in place, with
 * what is printed meanwhile -- workers' prints forwarded to the driver (by
 * the node's pump, maybe on its own thread), the driver's own prints --
 * written above them whole, never torn. Uses stdio only.
 */
#ifndef TD_TERM_H
#define TD_TERM_H
#include <stddef.h>

/* Writes s (l bytes) to stdout, above the status area if one is drawn;
 * a line that does not end in a newline gets one while the area shows. */
void td_term_print(const void *s, size_t l);
/* The same on stdout (fd 1) or stderr (fd 2): a task's own writes to
 * either, forwarded as they were made. */
void td_term_write(int fd, const void *s, size_t l);
/* Replaces the status area by text (lines separated by '\n', no newline
 * at the end; l 0: no area) and draws it on stderr. */
void td_term_area(const char *text, size_t l);
/* Writes text (whole lines, each ending in '\n') on stderr above the
 * area: a bar's last state, kept on the screen once it is done. */
void td_term_commit(const char *text, size_t l);

#endif
