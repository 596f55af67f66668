/* y = x · Wᵀ (+ bias) for a handful of rows of x, fp32, on one CPU core: the decode-step GEMM.
 *
 * Why not MKL: on this kind of CPU a decode step multiplies 1-8 rows by every weight matrix, and MKL's
 * small-M path runs at ~20 GFLOP/s, so verifying 4 speculative tokens costs twice a 1-token step.
 * Here every weight row is read from memory once and used for all rows of x while it is in registers,
 * so up to 8 rows cost about what one does (the step is bound by reading the weights).
 *
 * Batch invariance, on purpose: y[m][n] is always computed the same way — 8-lane fused multiply-adds
 * over k in ascending order, then the same horizontal sum, then the scalar tail, then the bias — whatever
 * M is and whichever block the row falls in. So a token's logits are bit-identical whether it is decoded
 * alone or verified with drafts, which is what makes greedy speculative decoding exact.
 *
 * Layout: x [M, K] row-major (row stride ldx), W [N, K] row-major (torch's Linear weight), y [M, ldy].
 */
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* Software prefetch distance in blocks of weight rows: the hardware prefetcher alone left a 4-row step
 * markedly slower. Prefetching past the end is harmless. */
#define PREFETCH_BLOCKS 2

ALWAYS_INLINE float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_add_ps(lo, hi);              /* lanes (0+4, 1+5, 2+6, 3+7) */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));     /* (0+4)+(2+6), (1+5)+(3+7) */
    s = _mm_add_ss(s, _mm_movehdup_ps(s));      /* + the odd half */
    return _mm_cvtss_f32(s);
}

/* MB rows of x against NB rows of W: MB*NB independent accumulators, one per output. */
ALWAYS_INLINE void block(const float *x, ptrdiff_t ldx, int MB, const float *W, ptrdiff_t K, int NB,
                         const float *bias, float *y, ptrdiff_t ldy) {
    /* Fully unrolled (MB and NB are constants at every call) so the accumulators live in registers. */
    __m256 acc[8][8];
#pragma GCC unroll 8
    for (int m = 0; m < MB; m++)
#pragma GCC unroll 8
        for (int j = 0; j < NB; j++) acc[m][j] = _mm256_setzero_ps();
    ptrdiff_t k = 0;
    for (; k + 8 <= K; k += 8) {
        if ((k & 15) == 0) {  /* one prefetch per 64-byte line of the block two blocks ahead */
#pragma GCC unroll 8
            for (int j = 0; j < NB; j++)
                _mm_prefetch((const char *)(W + (j + PREFETCH_BLOCKS * NB) * K + k), _MM_HINT_T0);
        }
        __m256 w[8];
#pragma GCC unroll 8
        for (int j = 0; j < NB; j++) w[j] = _mm256_loadu_ps(W + j * K + k);
#pragma GCC unroll 8
        for (int m = 0; m < MB; m++) {
            __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 8
            for (int j = 0; j < NB; j++) acc[m][j] = _mm256_fmadd_ps(w[j], xv, acc[m][j]);
        }
    }
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < NB; j++) {
            float sum = hsum(acc[m][j]);
            for (ptrdiff_t t = k; t < K; t++) sum += W[j * K + t] * x[m * ldx + t];
            if (bias) sum += bias[j];
            y[m * ldy + j] = sum;
        }
}

/* Rows n0..n1 of W for MB rows of x; NB weight rows at a time so that MB*NB = 8 accumulators hide the
 * FMA latency; the last few rows go one at a time (same arithmetic per output). */
#define SWEEP(MB, NB)                                                                          \
    static void sweep_##MB(const float *x, ptrdiff_t ldx, const float *W, ptrdiff_t K,          \
                           ptrdiff_t n0, ptrdiff_t n1, const float *bias, float *y,             \
                           ptrdiff_t ldy) {                                                     \
        ptrdiff_t n = n0;                                                                      \
        for (; n + NB <= n1; n += NB)                                                          \
            block(x, ldx, MB, W + n * K, K, NB, bias ? bias + n : NULL, y + n, ldy);           \
        for (; n < n1; n++) block(x, ldx, MB, W + n * K, K, 1, bias ? bias + n : NULL, y + n, ldy); \
    }
SWEEP(1, 8)
SWEEP(2, 4)
SWEEP(3, 2)
SWEEP(4, 2)
/* 5-8 rows: every row of x against one weight row at a time, so the weights stream from memory once
 * while the FMAs run (two 4-row passes over an L2-resident panel left the memory idle during the
 * second, and a 7-row step cost much more than a 1-row step that way). */
SWEEP(5, 1)
SWEEP(6, 1)
SWEEP(7, 1)
SWEEP(8, 1)

/* Column panels of W (kept for the helper thread's split, which is in whole panels). */
#define PANEL_ROWS 128

static void gemm_rows(const float *x, ptrdiff_t M, ptrdiff_t ldx, const float *W, ptrdiff_t K,
                      ptrdiff_t first, ptrdiff_t last, const float *bias, float *y, ptrdiff_t ldy) {
    if (M > 4) {
        switch (M) {
            case 5: sweep_5(x, ldx, W, K, first, last, bias, y, ldy); return;
            case 6: sweep_6(x, ldx, W, K, first, last, bias, y, ldy); return;
            case 7: sweep_7(x, ldx, W, K, first, last, bias, y, ldy); return;
            default: sweep_8(x, ldx, W, K, first, last, bias, y, ldy); return;
        }
    }
    for (ptrdiff_t n0 = first; n0 < last; n0 += PANEL_ROWS) {
        ptrdiff_t n1 = n0 + PANEL_ROWS < last ? n0 + PANEL_ROWS : last;
        for (ptrdiff_t m = 0; m < M; m += 4) {
            ptrdiff_t rows = M - m < 4 ? M - m : 4;
            const float *xm = x + m * ldx;
            float *ym = y + m * ldy;
            switch (rows) {
                case 1: sweep_1(xm, ldx, W, K, n0, n1, bias, ym, ldy); break;
                case 2: sweep_2(xm, ldx, W, K, n0, n1, bias, ym, ldy); break;
                case 3: sweep_3(xm, ldx, W, K, n0, n1, bias, ym, ldy); break;
                default: sweep_4(xm, ldx, W, K, n0, n1, bias, ym, ldy); break;
            }
        }
    }
}

/* A second core: one persistent helper thread takes the upper half of W's rows while the caller
 * computes the lower half. Which thread computes a row never changes its arithmetic, so results stay
 * bit-identical. One call at a time (the call lock).
 *
 * Hand-off: a condition-variable wake-up costs tens of microseconds on a VM, and a decode step makes
 * ~4 GEMM calls per layer (120 for smollm2), so waking the helper for each call cost more than it
 * saved. The helper therefore spins for a short while after each job (the next GEMM of the step comes
 * within microseconds) and only then sleeps on the condition variable, so between steps, and during
 * large steps that do not use this kernel, it leaves the core to torch's own threads.
 *
 * On a busy machine the helper may not be running when a job is posted; waiting for it would stall
 * the step for a scheduler time slice per GEMM (a several-fold slowdown while other processes used
 * both cores). So the helper must claim a posted job, and a job still unclaimed when
 * the caller has finished its own half is taken back and computed by the caller. */
typedef struct {
    const float *x, *W, *bias;
    float *y;
    ptrdiff_t M, ldx, K, first, last, ldy;
} job_t;

/* Well under a millisecond of _mm_pause() on current cores: longer than the gaps between one step's GEMMs. */
#define SPIN_LIMIT 20000
/* The caller, waiting for a claimed half, yields its core after this many pauses (the helper may
 * have been preempted on the same core). */
#define WAIT_SPINS 2000

enum { IDLE = 0, POSTED = 1, CLAIMED = 2 };

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t job_ready = PTHREAD_COND_INITIALIZER;
static job_t job;
static atomic_int state = IDLE;
static atomic_int sleeping = 0; /* the helper is (about to be) waiting on job_ready */
static int started = 0;

static void *helper_main(void *unused) {
    (void)unused;
    for (;;) {
        int spins = 0;
        while (atomic_load(&state) != POSTED) {
            if (++spins < SPIN_LIMIT) {
                _mm_pause();
                continue;
            }
            /* Sleep. sleeping is set before state is read again, and the caller sets state before
             * reading sleeping (both sequentially consistent), so a posted job is never missed. */
            pthread_mutex_lock(&lock);
            atomic_store(&sleeping, 1);
            while (atomic_load(&state) != POSTED) pthread_cond_wait(&job_ready, &lock);
            atomic_store(&sleeping, 0);
            pthread_mutex_unlock(&lock);
        }
        int posted = POSTED;
        if (!atomic_compare_exchange_strong(&state, &posted, CLAIMED)) continue; /* taken back */
        job_t mine = job;
        gemm_rows(mine.x, mine.M, mine.ldx, mine.W, mine.K, mine.first, mine.last, mine.bias, mine.y,
                  mine.ldy);
        atomic_store(&state, IDLE);
    }
    return NULL;
}

/* Below this many multiply-adds a second thread's wake-up costs more than it saves. */
#define PARALLEL_MIN_WORK (1 << 18)

int tf_small_gemm(const float *x, ptrdiff_t M, ptrdiff_t ldx, const float *W, ptrdiff_t N, ptrdiff_t K,
                  const float *bias, float *y, ptrdiff_t ldy, int threads) {
    if (M < 1 || M > 8) return -1;
    if (threads < 2 || N < 2 * PANEL_ROWS || N * K < PARALLEL_MIN_WORK) {
        gemm_rows(x, M, ldx, W, K, 0, N, bias, y, ldy);
        return 0;
    }
    pthread_mutex_lock(&call_lock);
    if (!started) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, helper_main, NULL) != 0) {
            pthread_mutex_unlock(&call_lock);
            gemm_rows(x, M, ldx, W, K, 0, N, bias, y, ldy);
            return 0;
        }
        pthread_detach(thread);
        started = 1;
    }
    ptrdiff_t half = (N / 2 + PANEL_ROWS - 1) / PANEL_ROWS * PANEL_ROWS;
    job = (job_t){x, W, bias, y, M, ldx, K, half, N, ldy};
    atomic_store(&state, POSTED);
    if (atomic_load(&sleeping)) {
        pthread_mutex_lock(&lock);
        pthread_cond_signal(&job_ready);
        pthread_mutex_unlock(&lock);
    }
    gemm_rows(x, M, ldx, W, K, 0, half, bias, y, ldy);
    int posted = POSTED;
    if (atomic_compare_exchange_strong(&state, &posted, IDLE)) {
        gemm_rows(x, M, ldx, W, K, half, N, bias, y, ldy); /* the helper never started: ours too */
    } else {
        for (int spins = 0; atomic_load(&state) != IDLE; spins++) {
            if (spins < WAIT_SPINS) _mm_pause();
            else sched_yield();
        }
    }
    pthread_mutex_unlock(&call_lock);
    return 0;
}
