/* The kernel library as Python sees it: the limits it is built with, the structs Python fills or reads through
   ctypes, and every function it exports.

   Each .c file includes this header, so the compiler holds every definition to its prototype here, and
   -Werror=missing-prototypes (native/build.py) refuses a function exported without one. native/build.py reads
   the prototypes below to set each function's ctypes argtypes and restype, so no signature is written twice:
   keep to int64_t, int, uint32_t, double, void and pointers (anything else stops the load with a message), one
   prototype per statement, and no other declarations beside the structs. */

#ifndef FIDDLER_NATIVE_H
#define FIDDLER_NATIVE_H

#include <stdint.h>

/* The limits come from native/limits.py, as -D flags. */
#ifndef MAX_ROWS
#error "MAX_ROWS (activation rows per expert) comes from native/limits.py: build the library with native/build.py"
#endif
#ifndef MAX_PAIRS
#error "MAX_PAIRS (pairs of one layer call) comes from native/limits.py: build the library with native/build.py"
#endif
#ifndef MAX_EXPERTS
#error "MAX_EXPERTS (experts of one request) comes from native/limits.py: build the library with native/build.py"
#endif
#if !defined(BF16_ISA_AVX2) || !defined(BF16_ISA_AVX512) || !defined(BF16_ISA_AMX)
#error "BF16_ISA_* (the bfloat16 kernels' paths) come from native/limits.py: build the library with native/build.py"
#endif
#if !defined(QUANT_BLOCK) || !defined(QUANT_INT8) || !defined(QUANT_INT4) || !defined(QUANT_ISA_AVX512)
#error "QUANT_BLOCK and the quantized formats' ids come from native/limits.py: build the library with native/build.py"
#endif

/* Addresses in one worker's shared-memory file: protocol/shm.py's SlotAddresses (slot_addresses). */
typedef struct lane_slots {
    uint32_t *request_seq, *reply_seq, *request_meta_len, *reply_meta_len, *bell;
    uint64_t *request_data_len, *reply_data_len;
    const uint8_t *request_meta;
    uint8_t *reply_meta;
    const uint16_t *request_data;
    uint16_t *reply_data;
    uint64_t meta_capacity, data_capacity;
} lane_slots;

/* One expert the worker's C loop may compute (native/shm_serve.py's _Expert); NULL where the worker does not hold
   it or cannot serve it there. bfloat16 weights, or a quantized expert's codes and float16 scales. */
typedef struct lane_expert {
    const void *gate_up, *down;
    const uint16_t *gate_up_scale, *down_scale;
} lane_expert;

/* One layer call through shm_call.c, between posting and finishing (native/shm_call.py's LayerCall); the
   dispatcher reads it for its statistics. */
typedef struct layer_call {
    uint32_t seq; /* the request's sequence number in the slot */
    int64_t request_id;
    int64_t experts; /* experts routed to, in expert order: */
    int64_t expert_ids[MAX_PAIRS], row_counts[MAX_PAIRS];
    int64_t row_of[MAX_PAIRS]; /* the request row of each (token, k) pair */
    double compute_seconds;    /* the worker's, from its reply */
} layer_call;

/* bf16_gemv.c: the decoding kernels, and the gather and combine of a decoding step */
int fiddler_bf16_linear(const uint16_t *weight, int64_t rows, int64_t cols, const uint16_t *x, int64_t n,
                        const uint16_t *bias, uint16_t *out, int isa);
int fiddler_bf16_silu_expert(const uint16_t *gate_up, const uint16_t *down, int64_t hidden, int64_t inter,
                             const uint16_t *x, int64_t n, uint16_t *out, int isa);
int fiddler_bf16_isa(void);
void fiddler_gather_rows(const char *src, int64_t row_bytes, const int64_t *index, int64_t n, char *dst);
void fiddler_combine(const uint16_t *outputs, const int64_t *row_of, const void *weights, int weights_bf16,
                     int64_t tokens, int64_t top_k, int64_t hidden, uint16_t *result);

/* rms_norm.c: transformers' (Llama's) RMS norm of bfloat16 rows */
void fiddler_rms_norm(const uint16_t *x, const uint16_t *weight, int64_t rows, int64_t cols, double eps,
                      uint16_t *out);

/* quant_gemv.c: products with quantized weights (formats: experts/quant.py) */
int fiddler_quant_linear(int format, const uint8_t *q, const uint16_t *scale, int64_t rows, int64_t cols,
                         const void *x, int x_bf16, int64_t n, void *out, int isa);
int fiddler_quant_silu_expert(int format, const uint8_t *gate_up, const uint16_t *gate_up_scale,
                              const uint8_t *down, const uint16_t *down_scale, int64_t hidden, int64_t inter,
                              const void *x, int x_bf16, int64_t n, void *out, int isa);
int fiddler_quant_activations(const void *x, int x_bf16, int64_t n, int64_t cols, int8_t *q, float *d, int isa);
int fiddler_quant_isa(void);
int fiddler_silu_product(const float *h, int64_t n, int64_t inter, int bf16, float *ps, int isa);
/* quantize.c: weights into the formats */
int fiddler_quantize(int format, const void *w, int w_bf16, int64_t rows, int64_t cols, uint8_t *q, uint16_t *scale);

/* parked_wait.c */
int fiddler_parked_watch(uint32_t *word, uint32_t value, int64_t spin_ns, int64_t timeout_ns);

/* shm_serve.c: the worker's serving loop */
int64_t fiddler_serve_requests(const lane_slots *s, uint32_t *last_seq, const lane_expert *table, int64_t layers,
                               int64_t experts, int64_t hidden, int64_t inter, int format, int bf16_isa,
                               int64_t version, int64_t timeout_ns, int64_t spin_ns, int64_t turn_spin_ns,
                               int park);

/* shm_call.c: the coordinator's layer call */
int fiddler_post_layer_call(const lane_slots *s, const uint16_t *hidden, const int64_t *top_k_index, int64_t tokens,
                            int64_t top_k, int64_t width, int64_t request_id, int64_t layer, int64_t version,
                            layer_call *call);
int fiddler_finish_layer_call(const lane_slots *s, layer_call *call, int64_t tokens, int64_t top_k, int64_t width,
                              int64_t layer, int64_t version, const void *weights, int weights_bf16,
                              int64_t timeout_ns, int64_t spin_ns, int park, uint16_t *result);

/* limits.c: a limit or struct size this library was built with, by name ("MAX_ROWS", "sizeof layer_call"), or -1
   for a name it does not know */
int64_t fiddler_constant(const char *name);

#endif
