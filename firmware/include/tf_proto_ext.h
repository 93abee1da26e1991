/* Command families served outside tf_proto.c, each in its own file: tf_proto.c checks the frame, then hands a
 * command in the family's range (tf_frame.h) to its handler and sends what it returns. */
#ifndef TF_PROTO_EXT_H
#define TF_PROTO_EXT_H

#include <stdint.h>

struct tf_device_s;

/* A family handler: `in` (in_len bytes) is the request payload, `out` the response payload (at most
 * TF_FRAME_MAX_PAYLOAD bytes; *out_len its length, also for an error status). NOTE: `in` and `out` are the same
 * buffer (the frame being answered): read the request fully before writing the response. `dev` is NULL on a
 * board that runs no device. Returns a TF_ST_* status; TF_ST_ERR_UNKNOWN_COMMAND for a code it does not serve. */
typedef uint8_t tf_cmd_handler(struct tf_device_s *dev, uint8_t cmd, const uint8_t *in, int32_t in_len, uint8_t *out,
                               int32_t *out_len);

tf_cmd_handler tf_proto_personal; /* TF_CMD_PERSONAL_FIRST .. _LAST, src/proto/tf_proto_personal.c */
tf_cmd_handler tf_proto_secagg;   /* TF_CMD_SECAGG_FIRST .. _LAST, src/proto/tf_proto_secagg.c */

#endif /* TF_PROTO_EXT_H */
