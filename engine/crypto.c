/* libcrypto and libgcrypt, loaded on first use (see crypto.h). */
#define TD_CRYPTO_IMPL
#include "crypto.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include <openssl/opensslv.h>

#include "td.h"

td_crypto_t td_crypto;
td_gcrypt_t td_gcrypt;

/* The soname of the libcrypto whose headers Tide was built with. */
#define TD__STR_(x) #x
#define TD__STR(x) TD__STR_(x)
#if OPENSSL_VERSION_MAJOR >= 3
#define TD__LIBCRYPTO "libcrypto.so." TD__STR(OPENSSL_VERSION_MAJOR)
#else
#define TD__LIBCRYPTO "libcrypto.so.1.1"
#endif

/* Opens lib and finds n symbols into out; else writes why into err. */
static int td__dlsyms(const char *lib, const char *pkg, const char *const *names, void **out, int n,
                      char *err, size_t el) {
  void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    snprintf(err, el, "cannot load %s (Debian %s): %s", lib, pkg, dlerror());
    return -1;
  }
  for (int i = 0; i < n; i++)
    if (!(out[i] = dlsym(h, names[i]))) {
      snprintf(err, el, "%s has no %s (another version?)", lib, names[i]);
      return -1;
    }
  return 0;
}

#define TD__NAME(f) #f,
static pthread_once_t td__once = PTHREAD_ONCE_INIT;
static char td__err[256];

static void td__load(void) {
  /* Tests name a library that is not there, to see the nodes without it. */
  const char *name = getenv("TIDE_TEST_LIBCRYPTO") ? getenv("TIDE_TEST_LIBCRYPTO") : TD__LIBCRYPTO;
  static const char *const names[] = {TD__CRYPTO_FNS(TD__NAME)};
  td_crypto_t c;
  _Static_assert(sizeof(c) == sizeof(names), "one pointer a name");
  if (!td__dlsyms(name, "libssl3", names, (void **)&c, sizeof(names) / sizeof(*names), td__err,
                  sizeof(td__err)))
    td_crypto = c;
}

int td_crypto_load(void) {
  pthread_once(&td__once, td__load);
  return td__err[0] ? TD_EIO : 0;
}

const char *td_crypto_error(void) { return td__err; }

static pthread_once_t td__gonce = PTHREAD_ONCE_INIT;
static char td__gerr[256];

static void td__gload(void) {
  /* Tests name a library that is not there, to run OpenSSL's OCB instead. */
  const char *name = getenv("TIDE_TEST_LIBGCRYPT") ? getenv("TIDE_TEST_LIBGCRYPT") : "libgcrypt.so.20";
  static const char *const names[] = {TD__GCRYPT_FNS(TD__NAME)};
  td_gcrypt_t g;
  _Static_assert(sizeof(g) == sizeof(names), "one pointer a name");
  if (td__dlsyms(name, "libgcrypt20", names, (void **)&g, sizeof(names) / sizeof(*names), td__gerr,
                 sizeof(td__gerr)))
    return;
  /* Initialised as a library that uses no secure memory; another user of
   * it in this process may have done so already, which is harmless. */
  if (!g.gcry_check_version(NULL)) {
    snprintf(td__gerr, sizeof(td__gerr), "%s did not initialise", name);
    return;
  }
  if (!g.gcry_control(GCRYCTL_INITIALIZATION_FINISHED_P)) {
    g.gcry_control(GCRYCTL_DISABLE_SECMEM, 0);
    g.gcry_control(GCRYCTL_INITIALIZATION_FINISHED, 0);
  }
  td_gcrypt = g;
}

int td_gcrypt_load(void) {
  pthread_once(&td__gonce, td__gload);
  return td__gerr[0] ? TD_EIO : 0;
}

const char *td_gcrypt_error(void) { return td__gerr; }
