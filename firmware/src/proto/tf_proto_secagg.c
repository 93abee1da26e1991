/* The secagg command family (TF_CMD_SECAGG_FIRST .. _LAST in tf_frame.h): no command served yet. */
#include "tf_frame.h"
#include "tf_proto_ext.h"

uint8_t tf_proto_secagg(struct tf_device_s *dev, uint8_t cmd, const uint8_t *in, int32_t in_len, uint8_t *out,
                    int32_t *out_len) {
    (void)dev, (void)cmd, (void)in, (void)in_len, (void)out;
    *out_len = 0;
    return TF_ST_ERR_UNKNOWN_COMMAND;
}
