/* Tide's value encoding: the tags that start each encoded value.  The
 * encoder and decoder are the Lua binding's (lua/ser.c); the engine only
 * writes a few plain values itself (error tables, booleans) and needs the
 * tags for that, not the Lua API.
 */
#ifndef TD_VALUE_H
#define TD_VALUE_H

enum {
  TD_T_NIL,
  TD_T_FALSE,
  TD_T_TRUE,
  TD_T_NUM,
  TD_T_STR,
  TD_T_TABLE,
  TD_T_BACK,   /* back reference to an earlier table (cycles, sharing) */
  TD_T_REF,    /* an ObjectRef kept as a ref */
  TD_T_ARGREF, /* a top-level argument ref, replaced by its value */
  TD_T_FUNC,   /* a Lua function: descriptor from the dumpfn hook */
  TD_T_NUMARR, /* array of numbers packed as f64 */
  TD_T_EXT,    /* extension object: module name + blob */
  TD_T_EXTRAW, /* extension object with raw bytes: module, header, u64 n,
                  u8 pad, pad zeros, n bytes (64-byte aligned in the
                  encoding, so a store extent can be mapped in place) */
  TD_T_NULL    /* the light userdata NULL: cjson.null, JSON's null */
};

#endif
