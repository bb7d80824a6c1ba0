/* Tide C unit test runner: each test runs in its own process with a
 * timeout; results are printed as TAP.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define TEST_DECLARE(name) int run_test_##name(void);
#include "test-list.h"
#undef TEST_DECLARE

typedef struct {
  const char *name;      /* test name as listed */
  int (*fn)(void);       /* returns 0 on success */
} test_entry_t;

#define TEST_DECLARE(name) {#name, run_test_##name},
static const test_entry_t tests[] = {
#include "test-list.h"
};
#undef TEST_DECLARE

int main(int argc, char **argv) {
  int n = (int)(sizeof(tests) / sizeof(tests[0]));
  int failed = 0;
  setvbuf(stdout, NULL, _IONBF, 0);
  for (int i = 0; i < n; i++) {
    if (argc > 1 && strcmp(argv[1], tests[i].name) != 0) continue;
    pid_t pid = fork();
    if (pid == 0) {
      alarm(60);
      _exit(tests[i].fn() == 0 ? 0 : 1);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
    if (!ok) failed++;
    printf("%sok %d - %s", ok ? "" : "not ", i + 1, tests[i].name);
    if (WIFSIGNALED(st)) printf(" # killed by signal %d%s", WTERMSIG(st),
                                WTERMSIG(st) == SIGALRM ? " (timeout)" : "");
    printf("\n");
  }
  printf("1..%d\n", n);
  return failed ? 1 : 0;
}
