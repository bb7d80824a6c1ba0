/* Sealed records (see aead.h).
 *
 * Why OCB, and libgcrypt's: every byte that crosses a stream is sealed
 * once and opened once, and with AES-128-GCM that was half of a
 * collective rank's time and of a data-plane transfer's CPU. In 64 KiB
 * records, sealing and opening a core here: OpenSSL 3.0's GCM 4.4-4.6
 * GB/s, its OCB 7-9.5 (128-bit AES-NI), libgcrypt 1.10's OCB 15-19.5
 * (256-bit VAES with AVX2). Where libgcrypt is missing or refuses OCB
 * (FIPS mode), OpenSSL's OCB seals the same records. Plain streams
 * authenticate with GCM's GMAC, which reads the payload once without the
 * AES. OCB is as strict about nonces as GCM; they are never reused (a
 * fresh key per stream and direction, the record's number as nonce). */
#include "aead.h"

#include <string.h>

int td_aead_init(td_aead_t *a, int plain, int enc, const uint8_t *key) {
  memset(a, 0, sizeof(*a));
  a->plain = plain ? 1 : 0;
  a->enc = enc ? 1 : 0;
  if (td_crypto_load()) return -1;
  if (!plain && td_gcrypt_load() == 0 &&
      gcry_cipher_open(&a->gh, GCRY_CIPHER_AES128, GCRY_CIPHER_MODE_OCB, 0) == 0) {
    if (gcry_cipher_setkey(a->gh, key, 16) == 0) return 0;
    gcry_cipher_close(a->gh);
    a->gh = NULL;
  }
  a->cx = EVP_CIPHER_CTX_new();
  int ok =
      a->cx &&
      EVP_CipherInit_ex(a->cx, plain ? EVP_aes_128_gcm() : EVP_aes_128_ocb(), NULL, NULL, NULL, a->enc) &&
      EVP_CIPHER_CTX_ctrl(a->cx, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) &&
      (plain || EVP_CIPHER_CTX_ctrl(a->cx, EVP_CTRL_AEAD_SET_TAG, TD_AEAD_TAG, NULL)) &&
      EVP_CipherInit_ex(a->cx, NULL, NULL, key, NULL, a->enc);
  return ok ? 0 : -1;
}

void td_aead_hmac(const uint8_t *key, const char *label, const uint8_t *p, size_t len, uint8_t out[32]) {
  uint8_t buf[256];
  size_t ll = strlen(label);
  memcpy(buf, label, ll);
  memcpy(buf + ll, p, len);
  unsigned int ol = 32;
  HMAC(EVP_sha256(), key, 32, buf, ll + len, out, &ol);
}

int td_aead_keyed(td_aead_t *a, int plain, int enc, const uint8_t *secret, const char *label,
                  const uint8_t *hs, size_t hl) {
  uint8_t k[32];
  if (td_crypto_load()) return -1;
  td_aead_hmac(secret, label, hs, hl, k);
  int rc = td_aead_init(a, plain, enc, k);
  OPENSSL_cleanse(k, sizeof(k));
  return rc;
}

void td_aead_free(td_aead_t *a) {
  if (a->gh) gcry_cipher_close(a->gh);
  if (a->cx) EVP_CIPHER_CTX_free(a->cx);
  a->gh = NULL;
  a->cx = NULL;
}

const char *td_aead_name(const td_aead_t *a) {
  return a->plain ? "gmac (openssl)" : a->gh ? "aes-128-ocb (libgcrypt)" : "aes-128-ocb (openssl)";
}

void td_aead_begin(td_aead_t *a, const uint8_t *aad, size_t alen) {
  uint8_t iv[12] = {0};
  memcpy(iv + 4, &a->seq, 8);
  a->seq++;
  a->last = 0;
  if (a->gh) {
    gcry_cipher_setiv(a->gh, iv, sizeof(iv));
    gcry_cipher_authenticate(a->gh, aad, alen);
    return;
  }
  EVP_CipherInit_ex(a->cx, NULL, NULL, NULL, iv, a->enc);
  int l;
  EVP_CipherUpdate(a->cx, NULL, &l, aad, (int)alen);
}

size_t td_aead_update(td_aead_t *a, uint8_t *out, const uint8_t *in, size_t len, int last) {
  a->last |= last;
  if (a->gh) {
    /* libgcrypt's OCB is told before the last piece; in place, `in` is
     * passed as none. */
    if (last) gcry_cipher_final(a->gh);
    const uint8_t *src = in == out ? NULL : in;
    size_t sl = in == out ? 0 : len;
    if (a->enc) gcry_cipher_encrypt(a->gh, out, len, src, sl);
    else gcry_cipher_decrypt(a->gh, out, len, src, sl);
    return len;
  }
  size_t done = 0;
  for (size_t off = 0; off < len;) {
    int k = len - off > (1u << 30) ? 1 << 30 : (int)(len - off), l = 0;
    if (a->plain) {
      EVP_CipherUpdate(a->cx, NULL, &l, in + off, k);
      if (out != in) memcpy(out + off, in + off, (size_t)k);
      l = k;
    } else {
      EVP_CipherUpdate(a->cx, out + done, &l, in + off, k);
    }
    off += (size_t)k;
    done += (size_t)l;
  }
  return done;
}

int td_aead_end(td_aead_t *a, uint8_t *rest, uint8_t tag[TD_AEAD_TAG]) {
  uint8_t none[16] = {0};
  if (a->gh && !a->last) td_aead_update(a, none, none, 0, 1); /* a record without payload */
  if (a->gh)
    return (a->enc ? gcry_cipher_gettag(a->gh, tag, TD_AEAD_TAG)
                   : gcry_cipher_checktag(a->gh, tag, TD_AEAD_TAG))
               ? -1
               : 0;
  int l;
  if (!a->enc) EVP_CIPHER_CTX_ctrl(a->cx, EVP_CTRL_AEAD_SET_TAG, TD_AEAD_TAG, tag);
  if (EVP_CipherFinal_ex(a->cx, rest && !a->plain ? rest : none, &l) != 1) return -1;
  return a->enc ? (EVP_CIPHER_CTX_ctrl(a->cx, EVP_CTRL_AEAD_GET_TAG, TD_AEAD_TAG, tag) == 1 ? 0 : -1) : 0;
}
