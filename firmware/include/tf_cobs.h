/* COBS (Consistent Overhead Byte Stuffing): frames on the UART carry no 0x00 byte, so 0x00 delimits them. */
#ifndef TF_COBS_H
#define TF_COBS_H

#include <stdint.h>

/* Worst-case encoded size of n bytes (without the trailing 0x00 delimiter). */
#define TF_COBS_MAX_ENCODED(n) ((n) + (n) / 254 + 1)

/* Encode src[0..n) into dst (capacity cap); returns the encoded length or -1 if it does not fit. */
int32_t tf_cobs_encode(const uint8_t *src, int32_t n, uint8_t *dst, int32_t cap);
/* Decode src[0..n) (no delimiter) into dst (capacity cap, may equal src); returns the length, -1 when the
 * input holds a 0x00 byte or a code runs past the end, -2 when it is valid COBS but decodes to more than cap. */
int32_t tf_cobs_decode(const uint8_t *src, int32_t n, uint8_t *dst, int32_t cap);

#endif /* TF_COBS_H */
