/* CRC-32 (IEEE 802.3 / zlib: reflected 0xEDB88320, init and final xor 0xFFFFFFFF), as Python's zlib.crc32. */
#ifndef TF_CRC_H
#define TF_CRC_H

#include <stdint.h>

/* Raw update without the initial / final inversion: crc = tf_crc32_update(0xFFFFFFFF, ...) ^ 0xFFFFFFFF. */
uint32_t tf_crc32_update(uint32_t crc, const void *data, uint32_t n);
uint32_t tf_crc32(const void *data, uint32_t n);

#endif /* TF_CRC_H */
