/* libcrypto loaded on first use (see crypto.h). */
#define TD_CRYPTO_IMPL
#include "crypto.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include <openssl/opensslv.h>

#include "td.h"

td_crypto_t td_crypto;

/* The soname of the libcrypto whose headers Tide was built with. */
#define TD__STR_(x) #x
#define TD__STR(x) TD__STR_(x)
#if OPENSSL_VERSION_MAJOR >= 3
#define TD__LIBCRYPTO "libcrypto.so." TD__STR(OPENSSL_VERSION_MAJOR)
#else
#define TD__LIBCRYPTO "libcrypto.so.1.1"
#endif

static pthread_once_t td__once = PTHREAD_ONCE_INIT;
static char td__err[256];

static void td__load(void) {
  /* Tests name a library that is not there, to see the nodes without it. */
  const char *name = getenv("TIDE_TEST_LIBCRYPTO") ? getenv("TIDE_TEST_LIBCRYPTO") : TD__LIBCRYPTO;
  void *h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    snprintf(td__err, sizeof(td__err), "cannot load %s (Debian libssl3): %s", name, dlerror());
    return;
  }
  td_crypto_t c;
#define TD__CRYPTO_SYM(f)                                                            \
  *(void **)&c.f = dlsym(h, #f);                                                     \
  if (!c.f) {                                                                        \
    snprintf(td__err, sizeof(td__err), "%s has no %s (another OpenSSL?)", name, #f); \
    return;                                                                          \
  }
  TD__CRYPTO_FNS(TD__CRYPTO_SYM)
#undef TD__CRYPTO_SYM
  td_crypto = c;
}

int td_crypto_load(void) {
  pthread_once(&td__once, td__load);
  return td__err[0] ? TD_EIO : 0;
}

const char *td_crypto_error(void) { return td__err; }
