/* A decoding step's layer call from the coordinator to the one worker holding every expert of the layer, without
   Python between the routing and the combined result.

   In Python the call costs several times the worker's hand-over itself (grouping the pairs, gathering their rows,
   writing and publishing the request, decoding the reply, combining): each tensor op, ctypes call or header codec
   runs with the caches just flushed by the worker's expert weights (docs/performance-log.md, item 11). Here:

   - `fiddler_post_layer_call` groups the (token, k) pairs by expert (stable, as the dispatcher does), copies their
     rows into the request slot, writes the ExpertRequest header as protocol/wire.py would and publishes it as
     protocol/shm.py does, ringing the worker's bell;
   - `fiddler_finish_layer_call` waits for the reply, checks that its header is the ExpertReply for this request,
     and weights and sums the outputs over top-k into the result (bf16_gemv.c's fiddler_combine).

   A reply that is anything else (an error from the worker, say) is left for Python to decode. coordinator/
   dispatch.py decides when a call takes this path and keeps every other case. */

#include "fiddler_native.h" /* layer_call; MAX_PAIRS: (token, k) pairs of one call, more take the Python path */
#include "shm_lane.h"

static uint8_t *put_int_list(uint8_t *p, const int64_t *values, int64_t n) {
    if (n < 16) *p++ = (uint8_t)(0x90 | n);
    else *p++ = 0xdc, *p++ = (uint8_t)(n >> 8), *p++ = (uint8_t)n;
    for (int64_t i = 0; i < n; i++) p = put_int(p, values[i]);
    return p;
}

/* Post the call. top_k_index [tokens, top_k] int64; hidden [tokens, width] bfloat16. Returns 1, or 0 when the call
   is not one for this path (too many pairs, an expert id out of range, rows larger than the slot): nothing was
   written then. */
int fiddler_post_layer_call(const lane_slots *s, const uint16_t *hidden, const int64_t *top_k_index, int64_t tokens,
                            int64_t top_k, int64_t width, int64_t request_id, int64_t layer, int64_t version,
                            layer_call *call) {
    int64_t pairs = tokens * top_k;
    uint64_t data_len = (uint64_t)pairs * (uint64_t)width * 2;
    if (pairs <= 0 || pairs > MAX_PAIRS || data_len > s->data_capacity) return 0;
    int64_t order[MAX_PAIRS];
    for (int64_t p = 0; p < pairs; p++) { /* insertion sort: stable, and a handful of pairs */
        if (top_k_index[p] < 0 || top_k_index[p] > INT32_MAX) return 0;
        int64_t q = p;
        while (q > 0 && top_k_index[order[q - 1]] > top_k_index[p]) order[q] = order[q - 1], q--;
        order[q] = p;
    }
    call->experts = 0;
    for (int64_t row = 0; row < pairs; row++) {
        int64_t pair = order[row], expert = top_k_index[pair];
        if (call->experts == 0 || call->expert_ids[call->experts - 1] != expert)
            call->expert_ids[call->experts] = expert, call->row_counts[call->experts++] = 0;
        call->row_counts[call->experts - 1]++;
        call->row_of[pair] = row;
        memcpy((uint16_t *)s->request_data + row * width, hidden + (pair / top_k) * width, (size_t)width * 2);
    }
    uint8_t *p0 = (uint8_t *)s->request_meta, *p = put_message_start(p0, version, "expert_request");
    *p++ = 0x84;
    p = put_str(p, "request_id"), p = put_int(p, request_id);
    p = put_str(p, "layer"), p = put_int(p, layer);
    p = put_str(p, "expert_ids"), p = put_int_list(p, call->expert_ids, call->experts);
    p = put_str(p, "row_counts"), p = put_int_list(p, call->row_counts, call->experts);
    p = put_tensors(p, "rows", pairs, width);
    call->request_id = request_id;
    call->seq = __atomic_load_n(s->request_seq, __ATOMIC_ACQUIRE) + 1;
    __atomic_store_n(s->request_meta_len, (uint32_t)(p - p0), __ATOMIC_RELEASE);
    __atomic_store_n(s->request_data_len, data_len, __ATOMIC_RELEASE);
    __atomic_store_n(s->request_seq, call->seq, __ATOMIC_RELEASE); /* last: the worker acts on this */
    __atomic_add_fetch(s->bell, 1, __ATOMIC_RELEASE);
    wake_all(s->bell);
    return 1;
}

typedef struct {
    int64_t request_id, layer;
    double seconds;
} reply_body;

/* body: {request_id, layer, compute_seconds}, each once */
static int read_reply_body(reader *r, void *body) {
    reply_body *b = body;
    uint32_t n, len, seen = 0;
    const char *key;
    if (!read_map(r, &n) || n != 3) return 0;
    for (uint32_t i = 0; i < n; i++) {
        if (!read_str(r, &key, &len)) return 0;
        int bit = is(key, len, "request_id") ? 1 : is(key, len, "layer") ? 2 : is(key, len, "compute_seconds") ? 4 : 0;
        if (bit == 0 || (seen & bit)) return 0;
        seen |= bit;
        int ok = bit == 1 ? read_int(r, &b->request_id) : bit == 2 ? read_int(r, &b->layer)
                 : read_float64(r, &b->seconds);
        if (!ok) return 0;
    }
    return seen == 7;
}

/* Whether the reply in the slot is the ExpertReply for `call`: its header, request, layer and rows. */
static int read_reply(const lane_slots *s, layer_call *call, int64_t layer, int64_t pairs, int64_t width,
                      int64_t version) {
    uint32_t meta_len = __atomic_load_n(s->reply_meta_len, __ATOMIC_ACQUIRE);
    uint64_t data_len = __atomic_load_n(s->reply_data_len, __ATOMIC_ACQUIRE);
    reply_body body = {-1, -1, 0.0};
    int64_t rows = -1, cols = -1;
    if (meta_len > s->meta_capacity || !read_message(s->reply_meta, meta_len, version, "expert_reply",
                                                     read_reply_body, &body, "outputs", &rows, &cols))
        return 0;
    call->compute_seconds = body.seconds;
    return body.request_id == call->request_id && body.layer == layer && rows == pairs && cols == width
           && data_len == (uint64_t)pairs * (uint64_t)width * 2;
}

/* Wait up to timeout_ns for the call's reply (spinning spin_ns first; `park`: see parked_wait.c), then combine it:
   result [tokens, width] bfloat16, weights [tokens, top_k] float32 or bfloat16 (weights_bf16). Returns 1 when done,
   0 when the reply has not come yet (call again), -1 when the reply is not this call's ExpertReply (decode it in
   Python: an error from the worker, say). */
int fiddler_finish_layer_call(const lane_slots *s, layer_call *call, int64_t tokens, int64_t top_k, int64_t width,
                              int64_t layer, int64_t version, const void *weights, int weights_bf16,
                              int64_t timeout_ns, int64_t spin_ns, int park, uint16_t *result) {
    uint32_t seq = __atomic_load_n(s->reply_seq, __ATOMIC_ACQUIRE);
    if (seq != call->seq && spin_ns > 0) {
        double until = now_seconds() + spin_ns * 1e-9;
        while (seq != call->seq && now_seconds() < until) seq = __atomic_load_n(s->reply_seq, __ATOMIC_ACQUIRE);
    }
    if (seq != call->seq) {
        sleep_on(s->reply_seq, seq, timeout_ns, park, 0);
        if (__atomic_load_n(s->reply_seq, __ATOMIC_ACQUIRE) != call->seq) return 0;
    }
    if (!read_reply(s, call, layer, tokens * top_k, width, version)) return -1;
    fiddler_combine(s->reply_data, call->row_of, weights, weights_bf16, tokens, top_k, width, result);
    return 1;
}
