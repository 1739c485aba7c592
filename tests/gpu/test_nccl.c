/* The NCCL comm backend (comm_nccl.c, CUDA build) on the GPUs of this machine.
 *
 *   test_nccl            one rank per GPU, one thread per rank (one rank on a one-GPU machine):
 *                        allgather, allreduce, broadcast and barrier with device (cudaMalloc),
 *                        managed (cudaMallocManaged) and host (malloc: staged) buffers, and an
 *                        allgather of a host send into a device recv; results vs the host's sums
 *                        and copies; a count of 0 with NULL buffers; a host all-reduce larger
 *                        than the staging buffer the backend keeps (64 MiB). Then comm_abort: the
 *                        next collective fails with a sentence.
 *                        With ≥ 2 GPUs also: a collective rank 1 never joins is ended by
 *                        comm_abort from another thread (an error, not a hang).
 *   test_nccl procs      two processes, one GPU each (cuda:0, cuda:1), the id passed through a
 *                        file as the server's rendezvous passes it between workers; the same
 *                        checks. Skips (exit 77, saying so) with fewer than 2 GPUs.
 * A separate binary, so that a machine without libnccl fails only this test. */
#include <cuda_runtime.h>
#include <pthread.h>
#include <spawn.h>
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/gpu/gpu_check.h"
#include "worker/backend/comm/comm.h"

extern char **environ;

#define N 1000
/* Seconds a rank waits for the group to form: a bootstrap that cannot connect (NCCL picked an
 * unreachable interface) fails with a sentence well inside run.sh's limit, not as a TIMEOUT. */
#define JOIN_S 20
enum { K_DEV, K_MANAGED, K_HOST, NKIND };
static const char *KIND[NKIND] = {"device", "managed", "host"};
static unsigned char uid[COMM_NCCL_ID_BYTES];
static int ndev;

static float *kalloc(int k, size_t n)
{
    void *p = NULL;
    if (k == K_DEV && cudaMalloc(&p, n * sizeof(float)) != cudaSuccess) return NULL;
    if (k == K_MANAGED && cudaMallocManaged(&p, n * sizeof(float), cudaMemAttachGlobal) != cudaSuccess) return NULL;
    if (k == K_HOST) p = malloc(n * sizeof(float));
    return p;
}
static void kfree(int k, float *p) { k == K_HOST ? free(p) : (void)cudaFree(p); }
static void kput(int k, float *dst, const float *src, size_t n)
{
    if (k == K_DEV) cudaMemcpy(dst, src, n * sizeof(float), cudaMemcpyHostToDevice);
    else memcpy(dst, src, n * sizeof(float));
}
static void kget(int k, float *dst, const float *src, size_t n)
{
    if (k == K_DEV) cudaMemcpy(dst, src, n * sizeof(float), cudaMemcpyDeviceToHost);
    else memcpy(dst, src, n * sizeof(float));
}

/* Every collective on buffers of kind k (send of kind ks for the allgather); 1 = right results. */
static int collectives(ln_comm *c, int ks, int k, char *msg, size_t cap)
{
    int rank = comm_rank(c), size = comm_size(c);
    ln_err e = {{0}};
    float *d = kalloc(k, N), *g = kalloc(k, (size_t)N * size), *s = kalloc(ks, N);
    float *h = malloc(N * sizeof(float)), *o = malloc((size_t)N * size * sizeof(float));
    int ok = d && g && s && h && o;
    if (!ok) snprintf(msg, cap, "rank %d: could not allocate %s buffers", rank, KIND[k]);
    for (int i = 0; ok && i < N; i++) h[i] = (float)(rank + 1) * (float)i;
    if (ok) {
        kput(ks, s, h, N);
        kput(k, d, h, N);
    }
    if (ok && !(ok = comm_allgather(c, s, g, N, &e) == 0)) snprintf(msg, cap, "allgather: %.900s", e.msg);
    if (ok) {
        kget(k, o, g, (size_t)N * size);
        for (int r = 0; r < size && ok; r++)
            for (int i = 0; i < N && ok; i++)
                if (o[r * N + i] != (float)(r + 1) * (float)i) {
                    ok = 0;
                    snprintf(msg, cap, "allgather: element %d of rank %d's block is %g, not %g", i, r, o[r * N + i],
                             (float)(r + 1) * (float)i);
                }
    }
    if (ok && !(ok = comm_allreduce_sum(c, d, N, &e) == 0)) snprintf(msg, cap, "allreduce: %.900s", e.msg);
    if (ok) {
        kget(k, o, d, N);
        float tot = (float)(size * (size + 1) / 2);
        for (int i = 0; i < N && ok; i++)
            if (o[i] != tot * (float)i) {
                ok = 0;
                snprintf(msg, cap, "allreduce: element %d is %g, not %g", i, o[i], tot * (float)i);
            }
    }
    if (ok) {
        for (int i = 0; i < N; i++) h[i] = rank == 0 ? -1.0f * (float)i : 5.0f;
        kput(k, d, h, N);
        if (!(ok = comm_broadcast(c, d, N, 0, &e) == 0 && comm_barrier(c, &e) == 0))
            snprintf(msg, cap, "broadcast/barrier: %.900s", e.msg);
    }
    if (ok) {
        kget(k, o, d, N);
        for (int i = 0; i < N && ok; i++)
            if (o[i] != -1.0f * (float)i) {
                ok = 0;
                snprintf(msg, cap, "broadcast: element %d is %g, not %g", i, o[i], -1.0f * (float)i);
            }
    }
    /* a stack scalar, as the engine passes its flags (tensor_parallel.c, train.c) */
    float flag = 1.0f;
    if (ok && !(ok = comm_allreduce_sum(c, &flag, 1, &e) == 0 && flag == (float)size))
        snprintf(msg, cap, "allreduce of a stack scalar: %.900s (got %g)", e.msg, flag);
    if (d) kfree(k, d);
    if (g) kfree(k, g);
    if (s) kfree(ks, s);
    free(h);
    free(o);
    return ok;
}

/* Counts of 0 (NULL buffers, as comm.h allows), then a host all-reduce of more floats than the
 * staging buffer the backend keeps between collectives (STAGE_KEEP_FLOATS: it is freed after). */
static int edges(ln_comm *c, char *msg, size_t cap)
{
    int rank = comm_rank(c), size = comm_size(c);
    ln_err e = {{0}};
    if (comm_allreduce_sum(c, NULL, 0, &e) || comm_allgather(c, NULL, NULL, 0, &e) ||
        comm_broadcast(c, NULL, 0, 0, &e)) {
        snprintf(msg, cap, "a count of 0: %.900s", e.msg);
        return 0;
    }
    const size_t n = ((size_t)16 << 20) + 3;
    float *h = malloc(n * sizeof(float));
    if (!h) {
        snprintf(msg, cap, "rank %d: no host memory for %zu floats", rank, n);
        return 0;
    }
    for (size_t i = 0; i < n; i++) h[i] = (float)(rank + 1) * (float)(i % 1024);
    int ok = comm_allreduce_sum(c, h, (int64_t)n, &e) == 0;
    if (!ok) snprintf(msg, cap, "a host all-reduce of %zu floats: %.900s", n, e.msg);
    float tot = (float)(size * (size + 1) / 2);
    for (size_t i = 0; ok && i < n; i++)
        if (h[i] != tot * (float)(i % 1024)) {
            ok = 0;
            snprintf(msg, cap, "a host all-reduce of %zu floats: element %zu is %g, not %g", n, i, h[i],
                     tot * (float)(i % 1024));
        }
    free(h);
    return ok;
}

#define NCHECK (NKIND + 2)
static const char *CHECK_NAME[NCHECK] = {
    "every collective, device buffers", "every collective, managed buffers", "every collective, host buffers",
    "every collective, host send into device recv (allgather)",
    "counts of 0 (NULL buffers), and a host all-reduce above the kept staging size"};
typedef struct { int rank, size, device; ln_comm *c; int ok[NCHECK]; char msg[NCHECK][LN_ERR_MSG_MAX]; } rank_res;

/* The checks of one rank: every kind, a host send into a device recv, the edge cases. */
static void rank_checks(rank_res *r)
{
    for (int k = 0; k < NKIND; k++) r->ok[k] = collectives(r->c, k, k, r->msg[k], sizeof r->msg[k]);
    r->ok[NKIND] = collectives(r->c, K_HOST, K_DEV, r->msg[NKIND], sizeof r->msg[NKIND]);
    r->ok[NKIND + 1] = edges(r->c, r->msg[NKIND + 1], sizeof r->msg[NKIND + 1]);
}

static void report(rank_res *r)
{
    for (int k = 0; k < NCHECK; k++) {
        char name[160];
        snprintf(name, sizeof name, "NCCL %d rank(s), rank %d: %s", r->size, r->rank, CHECK_NAME[k]);
        check_true(name, r->ok[k]);
        if (!r->ok[k]) printf("#   %s\n", r->msg[k]);
    }
}

static void *rank_main(void *p)
{
    rank_res *r = p;
    ln_err e = {{0}};
    if (comm_nccl_join(r->rank, r->size, uid, r->device, JOIN_S, NULL, &r->c, &e)) {
        for (int k = 0; k < NCHECK; k++) snprintf(r->msg[k], sizeof r->msg[k], "join: %.900s", e.msg);
        return NULL;
    }
    rank_checks(r);
    return NULL;
}

/* Rank 0 waits in an allreduce that rank 1 never joins; another thread aborts rank 0. */
static void *abort_later(void *p)
{
    usleep(500 * 1000);
    comm_abort(p);
    return NULL;
}

static int threads_main(void)
{
    gpu_require("test_nccl", LNB_CUDA_MATH_FP32);
    ndev = lnb_cuda_device_count();
    if (ndev > 8) ndev = 8;
    ln_err e = {{0}};
    if (comm_nccl_unique_id(uid, &e)) {
        printf("FAIL %s\n", e.msg);
        return 1;
    }
    pthread_t th[8];
    rank_res res[8];
    for (int r = 0; r < ndev; r++) {
        res[r] = (rank_res){.rank = r, .size = ndev, .device = r};
        pthread_create(&th[r], NULL, rank_main, &res[r]);
    }
    for (int r = 0; r < ndev; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < ndev; r++) report(&res[r]);
    if (ndev >= 2 && res[0].c && res[1].c) {
        pthread_t t;
        pthread_create(&t, NULL, abort_later, res[0].c);
        float one = 1;
        int rc = comm_allreduce_sum(res[0].c, &one, 1, &e);
        pthread_join(t, NULL);
        check_true("a collective another rank never joins ends with an error once comm_abort comes", rc != 0);
        if (rc) printf("#   %s\n", e.msg);
        comm_abort(res[1].c);
    }
    /* an aborted comm: the next collective fails with a sentence, at once */
    if (res[0].c) {
        float x = 1;
        comm_abort(res[0].c);
        int rc = comm_allreduce_sum(res[0].c, &x, 1, &e);
        check_true("after comm_abort a collective fails naming the abort", rc != 0 && strstr(e.msg, "aborted"));
        printf("#   %s\n", e.msg);
    }
    for (int r = 0; r < ndev; r++)
        if (res[r].c) comm_free(res[r].c);
    return gpu_done();
}

/* ---- two processes ---- */

static int child_main(int rank, const char *idfile)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    ln_err e = {{0}};
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", idfile);
    if (rank == 0) {
        FILE *f = comm_nccl_unique_id(uid, &e) == 0 ? fopen(tmp, "wb") : NULL;
        if (!f || fwrite(uid, 1, sizeof uid, f) != sizeof uid || fclose(f) != 0 || rename(tmp, idfile) != 0) {
            printf("FAIL rank 0 could not publish the id: %s\n", e.msg);
            return 1;
        }
    } else {
        FILE *f = NULL;
        for (int i = 0; i < 600 && !(f = fopen(idfile, "rb")); i++) usleep(100 * 1000);
        if (!f || fread(uid, 1, sizeof uid, f) != sizeof uid) {
            printf("FAIL rank 1 found no id from rank 0 in 60 s\n");
            return 1;
        }
        fclose(f);
    }
    rank_res r = {.rank = rank, .size = 2, .device = rank};
    if (comm_nccl_join(rank, 2, uid, rank, JOIN_S, NULL, &r.c, &e)) {
        printf("FAIL rank %d: %s\n", rank, e.msg);
        return 1;
    }
    rank_checks(&r);
    report(&r);
    comm_free(r.c);
    return gpu_failures ? 1 : 0;
}

static int procs_main(const char *self)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int n = lnb_cuda_device_count();
    if (n < 2) {
        printf("SKIP: test_nccl procs: %d GPU(s) here; the two-process NCCL test needs 2 (one per process)\n", n);
        return 77;
    }
    char dir[] = "/tmp/test_nccl_XXXXXX", idfile[64];
    if (!mkdtemp(dir)) {
        printf("FAIL mkdtemp\n");
        return 1;
    }
    snprintf(idfile, sizeof idfile, "%s/id", dir);
    pid_t pid[2];
    for (int r = 0; r < 2; r++) {
        char rs[8];
        snprintf(rs, sizeof rs, "%d", r);
        char *argv[] = {(char *)self, "child", rs, idfile, NULL};
        if (posix_spawn(&pid[r], "/proc/self/exe", NULL, NULL, argv, environ) != 0) {
            printf("FAIL could not start rank %d's process\n", r);
            return 1;
        }
    }
    int bad = 0;
    for (int r = 0; r < 2; r++) {
        int st = 0;
        waitpid(pid[r], &st, 0);
        int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
        printf("%s NCCL 2 processes: rank %d's process (cuda:%d) %s\n", ok ? "ok  " : "FAIL", r, r,
               ok ? "passed every check" : "failed");
        bad += !ok;
    }
    unlink(idfile);
    rmdir(dir);
    printf("%s test_nccl procs\n", bad ? "FAIL" : "PASS");
    return bad ? 1 : 0;
}

int main(int argc, char **argv)
{
    setenv("NCCL_DEBUG", "WARN", 0); /* NCCL's own reason in the log, should a call fail (children inherit it) */
    if (argc >= 4 && strcmp(argv[1], "child") == 0) return child_main(atoi(argv[2]), argv[3]);
    if (argc >= 2 && strcmp(argv[1], "procs") == 0) return procs_main(argv[0]);
    return threads_main();
}
