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

#include <gcrypt.h>

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

/* libgcrypt (GnuPG's), loaded on first use the same way, for one thing:
 * AES-128-OCB, which it runs with the CPU's 256-bit vector AES (VAES,
 * AVX2) at about twice the speed of OpenSSL 3.0's 128-bit AES-NI OCB.
 * The records are RFC 7253's either way, so a process without it seals
 * and opens with OpenSSL and the two interoperate. */
/* clang-format off */
#define TD__GCRYPT_FNS(_) \
  _(gcry_check_version) _(gcry_control) _(gcry_cipher_open) _(gcry_cipher_close) _(gcry_cipher_setkey) \
  _(gcry_cipher_setiv) _(gcry_cipher_authenticate) _(gcry_cipher_encrypt) _(gcry_cipher_decrypt) \
  _(gcry_cipher_gettag) _(gcry_cipher_checktag) _(gcry_cipher_ctl)
/* clang-format on */

typedef struct td_gcrypt {
#define TD__GCRYPT_FIELD(f) __typeof__(f) *f;
  TD__GCRYPT_FNS(TD__GCRYPT_FIELD)
#undef TD__GCRYPT_FIELD
} td_gcrypt_t;

extern td_gcrypt_t td_gcrypt;

/* Loads and initialises libgcrypt, once per process. 0, or TD_EIO with
 * td_gcrypt_error() saying why (callers fall back to libcrypto). */
int td_gcrypt_load(void);
const char *td_gcrypt_error(void);

#ifndef TD_CRYPTO_IMPL
#define gcry_check_version td_gcrypt.gcry_check_version
#define gcry_control td_gcrypt.gcry_control
#define gcry_cipher_open td_gcrypt.gcry_cipher_open
#define gcry_cipher_close td_gcrypt.gcry_cipher_close
#define gcry_cipher_setkey td_gcrypt.gcry_cipher_setkey
#define gcry_cipher_setiv td_gcrypt.gcry_cipher_setiv
#define gcry_cipher_authenticate td_gcrypt.gcry_cipher_authenticate
#define gcry_cipher_encrypt td_gcrypt.gcry_cipher_encrypt
#define gcry_cipher_decrypt td_gcrypt.gcry_cipher_decrypt
#define gcry_cipher_gettag td_gcrypt.gcry_cipher_gettag
#define gcry_cipher_checktag td_gcrypt.gcry_cipher_checktag
#define gcry_cipher_ctl td_gcrypt.gcry_cipher_ctl
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
