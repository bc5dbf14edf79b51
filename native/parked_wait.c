/* Waiting for the other process with this process's OpenMP threads asleep.

   Where the coordinator and its workers take turns on the same cores (a CPU-only machine, every expert cold), each
   side's OpenMP helper threads spin for a while (GOMP_SPINCOUNT) after every parallel region, so that the next
   product of the same layer finds them awake. When a side hands the layer over and waits, that spin takes a core
   the other side is computing on, and the start of every expert call and of every attention block ran slowly
   (docs/performance-log.md, item 11). OpenMP has no call that sends idle threads to sleep, so the wait itself runs
   inside a parallel region: the calling thread sleeps on the shared-memory futex, the helpers on a private one,
   and when the reply comes the calling thread wakes them on its way out, ready for the next product.

   Built into the same library as bf16_gemv.c (native/build.py), against the OpenMP runtime PyTorch has
   loaded, so the threads parked are PyTorch's own. */

#include <limits.h>
#include <linux/futex.h>
#include <omp.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "fiddler_native.h"
#include "shm_lane.h" /* now_seconds */

static long futex(uint32_t *address, int op, uint32_t value, const struct timespec *timeout) {
    return syscall(SYS_futex, address, op, value, timeout, NULL, 0);
}

static inline void spin_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Sleep until *word differs from `value`, timeout_ns passes or a signal arrives (one FUTEX_WAIT on a word shared
   with another process; the caller loops). Returns 1 when *word changed, else 0. Call from one thread at a time.
   With spin_ns > 0 the calling thread watches *word that long before it sleeps, its helpers asleep all along: a
   worker's wait between two layers of a decoding step, which keeps its own core awake without taking another
   (native/shm_serve.c). */
int fiddler_parked_watch(uint32_t *word, uint32_t value, int64_t spin_ns, int64_t timeout_ns) {
    static uint32_t released; /* bumped once per wait: the helpers sleep while it holds the value they read */
    uint32_t round = __atomic_load_n(&released, __ATOMIC_ACQUIRE);
    int changed = 0;
#pragma omp parallel
    {
        if (omp_get_thread_num() == 0) {
            struct timespec timeout = {timeout_ns / 1000000000, timeout_ns % 1000000000};
            double until = spin_ns > 0 ? now_seconds() + spin_ns * 1e-9 : 0.0;
            while (spin_ns > 0 && __atomic_load_n(word, __ATOMIC_ACQUIRE) == value && now_seconds() < until)
                spin_pause();
            if (__atomic_load_n(word, __ATOMIC_ACQUIRE) == value) futex(word, FUTEX_WAIT, value, &timeout);
            changed = __atomic_load_n(word, __ATOMIC_ACQUIRE) != value;
            __atomic_store_n(&released, round + 1, __ATOMIC_RELEASE);
            futex(&released, FUTEX_WAKE_PRIVATE, INT_MAX, NULL);
        } else {
            while (__atomic_load_n(&released, __ATOMIC_ACQUIRE) == round)
                futex(&released, FUTEX_WAIT_PRIVATE, round, NULL);
        }
    }
    return changed;
}
