/* libcrypto (OpenSSL), loaded on first use.  Only the processes that
 * encrypt map it: a node whose data plane is on, a collective group's ranks
 * across nodes.  A worker that never does (most of them) does not pay its
 * load: 1.4 MB of RSS, 0.4 MB of it private, in every idle worker when it
 * was linked (tide bench idle_worker_rss).
 *
 * Include this instead of the OpenSSL headers: the functions Tide calls
 * are named as usual and go through td_crypto's pointers, which
 * td_crypto_load fills.  Call it before the first of them. */
#ifndef TD_CRYPTO_H
#define TD_CRYPTO_H

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

/* Every libcrypto function Tide calls. */
/* clang-format off */
#define TD__CRYPTO_FNS(_) \
  _(CRYPTO_memcmp) _(EVP_CIPHER_CTX_ctrl) _(EVP_CIPHER_CTX_free) _(EVP_CIPHER_CTX_new) \
  _(EVP_CipherFinal_ex) _(EVP_CipherInit_ex) _(EVP_CipherUpdate) _(EVP_aes_128_gcm) _(EVP_aes_128_ocb) \
  _(EVP_sha256) _(HMAC) _(OPENSSL_cleanse) _(RAND_bytes) _(SHA256)
/* clang-format on */

typedef struct td_crypto {
#define TD__CRYPTO_FIELD(f) __typeof__(f) *f;
  TD__CRYPTO_FNS(TD__CRYPTO_FIELD)
#undef TD__CRYPTO_FIELD
} td_crypto_t;

extern td_crypto_t td_crypto;

/* Loads libcrypto and finds its functions, once per process (any thread).
 * Returns 0, or TD_EIO with td_crypto_error() saying what is missing. */
int td_crypto_load(void);
const char *td_crypto_error(void);

#ifndef TD_CRYPTO_IMPL
#define CRYPTO_memcmp td_crypto.CRYPTO_memcmp
#define EVP_CIPHER_CTX_ctrl td_crypto.EVP_CIPHER_CTX_ctrl
#define EVP_CIPHER_CTX_free td_crypto.EVP_CIPHER_CTX_free
#define EVP_CIPHER_CTX_new td_crypto.EVP_CIPHER_CTX_new
#define EVP_CipherFinal_ex td_crypto.EVP_CipherFinal_ex
#define EVP_CipherInit_ex td_crypto.EVP_CipherInit_ex
#define EVP_CipherUpdate td_crypto.EVP_CipherUpdate
#define EVP_aes_128_gcm td_crypto.EVP_aes_128_gcm
#define EVP_aes_128_ocb td_crypto.EVP_aes_128_ocb
#define EVP_sha256 td_crypto.EVP_sha256
#define HMAC td_crypto.HMAC
#define OPENSSL_cleanse td_crypto.OPENSSL_cleanse
#define RAND_bytes td_crypto.RAND_bytes
#define SHA256 td_crypto.SHA256
#endif

#endif
