/* A worker's decoding requests served from the shared-memory slot without Python.

   A decoding step sends each worker one small request per layer: a dozen rows at most, a few experts. In Python
   its handling (decode the header, look the experts up, call the kernel per expert, encode and publish the reply)
   is slow right after the expert weights have streamed through the caches and evicted the interpreter's working
   set (docs/performance-log.md, item 11). This loop does the same for the requests
   it fully understands and hands everything else back to Python untouched:

   - the request header is msgpack exactly as protocol/wire.py writes an ExpertRequest (same version, keys, types),
     naming bfloat16 rows of the experts' width, every expert one the worker registered (`fiddler_serve_requests`'
     table: gated SiLU experts without biases, the fused kernel of bf16_gemv.c, or of quant_gemv.c for a quantized
     shard), at most MAX_ROWS rows each;
   - the reply is the msgpack header of an ExpertReply, published as protocol/shm.py publishes one.

   Anything else (another message, a malformed or unexpected request, an expert outside the table) is left in the
   slot unconsumed and the function returns: Python's generic path then answers it, errors included. The slot layout
   comes from Python (`lane_slots`), so protocol/shm.py stays its only definition. */

#include "fiddler_native.h" /* lane_expert; MAX_ROWS: more rows per expert take the float32 path in Python */
#include "shm_lane.h"

typedef struct {
    int64_t request_id, layer, rows, width;
    uint32_t experts;
    int64_t expert_ids[MAX_EXPERTS], row_counts[MAX_EXPERTS];
} request;

/* body: {request_id, layer, expert_ids, row_counts}, each once */
static int read_body(reader *r, void *body) {
    request *q = body;
    uint32_t n, len, ids = 0, counts = 0, seen = 0;
    const char *key;
    if (!read_map(r, &n) || n != 4) return 0;
    for (uint32_t i = 0; i < n; i++) {
        if (!read_str(r, &key, &len)) return 0;
        int bit = is(key, len, "request_id") ? 1 : is(key, len, "layer") ? 2 : is(key, len, "expert_ids") ? 4
                  : is(key, len, "row_counts") ? 8 : 0;
        if (bit == 0 || (seen & bit)) return 0;
        seen |= bit;
        int ok = bit == 1 ? read_int(r, &q->request_id) : bit == 2 ? read_int(r, &q->layer)
                 : bit == 4 ? read_int_list(r, q->expert_ids, &ids) : read_int_list(r, q->row_counts, &counts);
        if (!ok) return 0;
    }
    q->experts = ids;
    return seen == 15 && ids == counts;
}

static int read_request(const uint8_t *meta, uint32_t meta_len, int64_t version, request *q) {
    return read_message(meta, meta_len, version, "expert_request", read_body, q, "rows", &q->rows, &q->width);
}

static size_t write_reply(uint8_t *p0, int64_t version, const request *q, double seconds) {
    uint8_t *p = put_message_start(p0, version, "expert_reply");
    *p++ = 0x83;
    p = put_str(p, "request_id"), p = put_int(p, q->request_id);
    p = put_str(p, "layer"), p = put_int(p, q->layer);
    p = put_str(p, "compute_seconds"), p = put_float64(p, seconds);
    p = put_tensors(p, "outputs", q->rows, q->width);
    return (size_t)(p - p0);
}

/* --- the loop --- */

/* Whether this worker can compute `q` here, every expert in `table` [layers, experts] and within the slots. */
static int servable(const request *q, const lane_slots *s, const lane_expert *table, int64_t layers,
                    int64_t experts, int64_t hidden, uint64_t data_len) {
    if (q->layer < 0 || q->layer >= layers || q->width != hidden || q->rows < 0) return 0;
    if ((uint64_t)q->rows * (uint64_t)hidden * 2 != data_len || data_len > s->data_capacity) return 0;
    int64_t total = 0;
    for (uint32_t i = 0; i < q->experts; i++) {
        int64_t e = q->expert_ids[i], n = q->row_counts[i];
        if (e < 0 || e >= experts || n < 0 || n > MAX_ROWS || table[q->layer * experts + e].gate_up == NULL) return 0;
        total += n;
    }
    return total == q->rows;
}

/* Serve requests until one is not for this loop (left in the slot), the bell rings for something else (a ZeroMQ
   control message), timeout_ns passes with nothing to do, or a signal arrives. *last_seq is the sequence number of
   the last request answered (ShmChannel.last_request_seq), updated for each one served here. spin_ns: how long to
   watch the request sequence before sleeping (ShmChannel.spin); park: sleep with the OpenMP threads parked, and
   then, right after serving a request (every one this loop takes is a decoding step's), watch the bell for
   turn_spin_ns first with them parked.
   format: 0 for bfloat16 weights, else the quantized format of every expert in the table (QUANT_INT8, QUANT_INT4);
   bf16_isa: the path of the bfloat16 kernel (BF16_ISA_*, 0 for the best).
   Returns the number of requests served. */
int64_t fiddler_serve_requests(const lane_slots *s, uint32_t *last_seq, const lane_expert *table, int64_t layers,
                               int64_t experts, int64_t hidden, int64_t inter, int format, int bf16_isa,
                               int64_t version, int64_t timeout_ns, int64_t spin_ns, int64_t turn_spin_ns,
                               int park) {
    int64_t served = 0;
    static request q; /* one request at a time per process; its lists are too large for the stack of every call */
    static int answered = 0; /* whether the last request was served here: then the next is a decoding step's too */
    for (;;) {
        uint32_t seq = __atomic_load_n(s->request_seq, __ATOMIC_ACQUIRE);
        if (seq == *last_seq) {
            double until = now_seconds() + spin_ns * 1e-9;
            while (seq == *last_seq && spin_ns > 0 && now_seconds() < until)
                seq = __atomic_load_n(s->request_seq, __ATOMIC_ACQUIRE);
        }
        if (seq == *last_seq) { /* asleep on the bell, as ShmChannel.wait_request: a request or a message rings */
            uint32_t rung = __atomic_load_n(s->bell, __ATOMIC_ACQUIRE);
            seq = __atomic_load_n(s->request_seq, __ATOMIC_ACQUIRE);
            if (seq == *last_seq) {
                /* between two layers of a decoding step, parked: this thread watches the bell a while first */
                sleep_on(s->bell, rung, timeout_ns, park, answered ? turn_spin_ns : 0);
                seq = __atomic_load_n(s->request_seq, __ATOMIC_ACQUIRE);
                if (seq == *last_seq) { /* idle, or a control message: the decoding step is over */
                    answered = 0;
                    return served;
                }
            }
        }
        double started = now_seconds();
        uint32_t meta_len = __atomic_load_n(s->request_meta_len, __ATOMIC_ACQUIRE);
        uint64_t data_len = __atomic_load_n(s->request_data_len, __ATOMIC_ACQUIRE);
        answered = 0; /* until this one is: one left for Python is a prompt's, or something else */
        if (meta_len > s->meta_capacity || !read_request(s->request_meta, meta_len, version, &q)
            || !servable(&q, s, table, layers, experts, hidden, data_len))
            return served;
        int64_t offset = 0;
        for (uint32_t i = 0; i < q.experts; i++) {
            const lane_expert *e = &table[q.layer * experts + q.expert_ids[i]];
            int64_t n = q.row_counts[i];
            const uint16_t *x = s->request_data + offset * hidden;
            uint16_t *out = s->reply_data + offset * hidden;
            int status = n == 0       ? 0
                         : format == 0 ? fiddler_bf16_silu_expert(e->gate_up, e->down, hidden, inter, x, n, out,
                                                                  bf16_isa)
                                       : fiddler_quant_silu_expert(format, e->gate_up, e->gate_up_scale, e->down,
                                                                   e->down_scale, hidden, inter, x, 1, n, out, 0);
            if (status != 0) return served; /* no scratch memory (or path): Python answers it (with the error) */
            offset += n;
        }
        size_t reply_len = write_reply(s->reply_meta, version, &q, now_seconds() - started);
        __atomic_store_n(s->reply_meta_len, (uint32_t)reply_len, __ATOMIC_RELEASE);
        __atomic_store_n(s->reply_data_len, data_len, __ATOMIC_RELEASE);
        __atomic_store_n(s->reply_seq, seq, __ATOMIC_RELEASE); /* last: the coordinator acts on this */
        wake_all(s->reply_seq);
        *last_seq = seq;
        answered = 1;
        served++;
    }
}
