/* Sealed records for the streams between nodes: the data plane's
 * (dplane.c) and the collectives' (lua/coll_net.c).
 *
 * One td_aead_t is one direction of a stream. Each record is sealed
 * with AES-128-OCB (RFC 7253, 16-byte tag, 12-byte nonce: the record's
 * number on the stream, so a key never sees a nonce twice) over its
 * header as associated data and its payload; or, plain, authenticated
 * only with AES-128-GCM's GMAC over header and payload, sent in the
 * clear. The OCB is libgcrypt's where it loads (256-bit vector AES,
 * twice OpenSSL 3.0's speed here), else OpenSSL's: the records are the
 * same either way, so the two talk to each other.
 *
 * A record: td_aead_begin, then its payload in one or more
 * td_aead_update calls (each a multiple of 16 bytes but the last), then
 * td_aead_end. */
#ifndef TD_AEAD_H
#define TD_AEAD_H

#include <stddef.h>
#include <stdint.h>

#include "crypto.h"

#define TD_AEAD_TAG 16

typedef struct td_aead {
  EVP_CIPHER_CTX *cx;  /* OpenSSL: plain's GMAC, or OCB without libgcrypt */
  gcry_cipher_hd_t gh; /* libgcrypt's OCB */
  uint64_t seq;        /* the next record's number */
  int plain, enc;
  int last; /* the record's last piece was passed */
} td_aead_t;

/* Keys a direction: enc 1 seals, 0 opens; the first 16 bytes of key.
 * Loads the libraries on first use. 0, or -1 (libcrypto is missing). */
int td_aead_init(td_aead_t *a, int plain, int enc, const uint8_t *key);
void td_aead_free(td_aead_t *a);

/* HMAC-SHA256(key, label || p) into out (which may be key): the streams'
 * handshake proofs and keys. label and p: 256 bytes at most together.
 * libcrypto must be loaded (td_crypto_load). */
void td_aead_hmac(const uint8_t *key, const char *label, const uint8_t *p, size_t len, uint8_t out[32]);

/* td_aead_init keyed with HMAC(secret, label || hs), a stream direction's
 * key from its handshake; the key is wiped once used. 0, or -1. */
int td_aead_keyed(td_aead_t *a, int plain, int enc, const uint8_t *secret, const char *label,
                  const uint8_t *hs, size_t hl);

/* What seals the records: "aes-128-ocb (libgcrypt)", "aes-128-ocb
 * (openssl)" or "gmac (openssl)". */
const char *td_aead_name(const td_aead_t *a);

/* Starts the next record, with aad (its header) authenticated. */
void td_aead_begin(td_aead_t *a, const uint8_t *aad, size_t alen);

/* The record's payload bytes in, to out (the same buffer, or apart):
 * sealed or opened, or, plain, authenticated and copied. Every call but
 * the record's last (last = 1) must pass a multiple of 16 bytes. Returns
 * the bytes written to out: on the last call, OpenSSL's OCB holds back a
 * partial block for td_aead_end. */
size_t td_aead_update(td_aead_t *a, uint8_t *out, const uint8_t *in, size_t len, int last);

/* Ends the record: bytes held back go to rest (out + what the last
 * update wrote), and the tag is made into tag (sealing) or checked
 * against it (opening). 0, or -1: the record is not authentic, and
 * nothing it carried may be used. */
int td_aead_end(td_aead_t *a, uint8_t *rest, uint8_t tag[TD_AEAD_TAG]);

#endif
