/* Global AVGPOOL: one requantized channel sum per channel (docs/engine.md "AVGPOOL"). */
#include "tf_dsp.h"
#include "tf_kernels.h"
#include "tf_qmath.h"

tf_status tf_avgpool_s8(const tf_avgpool_params *p, const tf_dims *x_dims, const int8_t *x, int8_t *y) {
    if (!p || !x_dims || !x || !y || p->shift < 1 || p->shift > 62) {
        return TF_ERR_ARG;
    }
    const int32_t plane = x_dims->h * x_dims->w;
    if (plane > (1 << 23)) { /* |sum (x - zx)| < 2^31 */
        return TF_ERR_OVERFLOW;
    }
    for (int32_t c = 0; c < x_dims->c; c++) {
        int32_t s = tf_sum_s8(x + c * plane, plane) + p->input_offset * plane;
        int64_t v = tf_requantize(s, p->mult, p->shift) + p->output_offset;
        y[c] = (int8_t)tf_clamp_i32(v, -128, 127);
    }
    return TF_OK;
}
