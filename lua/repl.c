/* Line editing for `tide repl`: libedit's readline interface with a
 * history file and tab completion over a word list the REPL supplies.
 * Exposed to Lua as the `tide.readline` module. Uses libedit.
 */
#include <editline/readline.h>
#include <lauxlib.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "td.h"

static char **td__words;   /* completion candidates, owned */
static int td__nwords;

static char *td__complete_gen(const char *text, int state) {
  static int i;
  static size_t len;
  if (!state) { i = 0; len = strlen(text); }
  while (i < td__nwords) {
    const char *w = td__words[i++];
    if (!strncmp(w, text, len)) return strdup(w);
  }
  return NULL;
}

static char **td__complete(const char *text, int start, int end) {
  (void)start; (void)end;
  rl_attempted_completion_over = 1;
  return rl_completion_matches(text, td__complete_gen);
}

/* Ctrl-C at the prompt: the signal handler (cmd/run.c) sees td_repl_reading
 * and only sets td_repl_sigint; libedit's read is interrupted (its handler
 * has no SA_RESTART) and readline returns. */
volatile sig_atomic_t td_repl_reading, td_repl_sigint;

/* readline.readline(prompt) -> line | nil at end of input | false on Ctrl-C */
static int r_readline(lua_State *L) {
  const char *prompt = luaL_optstring(L, 1, "> ");
  td_repl_sigint = 0;
  td_repl_reading = 1;
  char *line = readline(prompt);
  td_repl_reading = 0;
  if (td_repl_sigint) {
    free(line);
    td_repl_sigint = 0;
    lua_pushboolean(L, 0);
    return 1;
  }
  if (!line) return 0;
  lua_pushstring(L, line);
  free(line);
  return 1;
}

static int r_add_history(lua_State *L) {
  const char *s = luaL_checkstring(L, 1);
  if (*s) add_history(s);
  return 0;
}

static int r_load_history(lua_State *L) {
  read_history(luaL_checkstring(L, 1));
  return 0;
}

static int r_save_history(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  write_history(path);
  history_truncate_file(path, (int)luaL_optinteger(L, 2, 1000));
  return 0;
}

/* readline.set_words({"tide.get", ...}): what Tab completes. */
static int r_set_words(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  for (int i = 0; i < td__nwords; i++) free(td__words[i]);
  free(td__words);
  td__nwords = (int)lua_objlen(L, 1);
  td__words = td_xcalloc((size_t)td__nwords + 1, sizeof(char *));
  for (int i = 0; i < td__nwords; i++) {
    lua_rawgeti(L, 1, i + 1);
    td__words[i] = td_xstrdup(luaL_checkstring(L, -1));
    lua_pop(L, 1);
  }
  /* Words include '.' and ':' so "tide.ge<Tab>" completes as one. */
  rl_basic_word_break_characters = " \t\n\"\\'`@$><=;|&{(,+-*/%^~#[";
  rl_attempted_completion_function = td__complete;
  return 0;
}

int luaopen_tide_readline(lua_State *L) {
  static const luaL_Reg fns[] = {{"readline", r_readline}, {"add_history", r_add_history},
    {"load_history", r_load_history}, {"save_history", r_save_history},
    {"set_words", r_set_words}, {NULL, NULL}};
  using_history();
  lua_newtable(L);
  luaL_register(L, NULL, fns);
  return 1;
}
