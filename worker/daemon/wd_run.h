/* wd_run.h — one leased job, run by the engine in its own thread.
 *
 * Stages, each announced as an event: validate data → calibrate → initialise (or restore a
 * checkpoint) → evaluate before → train (metrics every step, validation loss and knowledge drift
 * at eval points, checkpoints) → evaluate after → export. The daemon's loop downloaded the files
 * before and uploads the results after; this thread never touches the network. It talks to the
 * loop only through:
 *   - the outbox (events and metric points, wd_outbox.h),
 *   - wd_run_take_checkpoint (the newest checkpoint written and not yet uploaded),
 *   - `stop`, an atomic the loop sets (cancel, pause, SIGTERM, lease lost) and the training loop
 *     polls before every step (train.h should_stop), so a stop takes effect within one step;
 *   - `done` and the result fields, written before done is set and the loop is woken.
 *
 * Determinism: the same spec (seed) and the same checkpoint give the same adapter bytes whether a
 * run was interrupted or not (train.h) — resume on another worker relies on it.
 * Ownership: the daemon owns the wd_run (and its spec); the thread owns every engine object. */
#ifndef WD_RUN_H
#define WD_RUN_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include <uv.h>

#include "proto/jobspec.h"
#include "worker/daemon/wd_outbox.h"

#define WD_PATH_MAX 1024

typedef enum { WD_STOP_NONE = 0, WD_STOP_CANCEL, WD_STOP_PAUSE, WD_STOP_SHUTDOWN, WD_STOP_LEASE_LOST } wd_stop;
typedef enum { WD_RUN_OK = 0, WD_RUN_FAILED, WD_RUN_STOPPED } wd_run_status;

typedef struct wd_run {
    /* ---- inputs, fixed before the thread starts */
    char job_id[64];
    ln_jobspec spec;
    char model_name[257];
    char model_dir[WD_PATH_MAX];
    char dir[WD_PATH_MAX];             /* the job's work dir: files/, out/, export/ */
    char files_dir[WD_PATH_MAX];       /* local copies are named by file id; stripped from messages */
    char train_path[WD_PATH_MAX], val_path[WD_PATH_MAX], calib_path[WD_PATH_MAX]; /* "" = none */
    char resume[WD_PATH_MAX];          /* checkpoint to continue from, "" = fresh */
    char cache_dir[WD_PATH_MAX];       /* calibration cache shared by jobs */
    int world;                         /* tensor-parallel ranks of the job; 1 = plain */
    /* A gang spread over workers: the daemon sets comm to this process's rank of the group
     * (comm_rank(comm) = rank, comm_size(comm) = world), made through the server's rendezvous,
     * and the run holds only that rank. NULL: every rank of the job runs here, each on a thread,
     * and this process reports as for one rank.
     * An adapter job on ranks never holds the whole model (wd_run.c's tp_rank_main, engine calls
     * in tensor_parallel.h): each rank reads only its blocks of the safetensors
     * (ln_tp_load_shard), calibrates on its shard (collective; rank 0 accumulates the covariances),
     * initialises on its shard (ln_tp_adapter_init; lora_null's eigensolves spread over thread
     * ranks, all on rank 0 across processes) or restores resume, which every rank must hold
     * (ln_tp_load_checkpoint), and evaluates with collective forwards on the shards (validation,
     * task and knowledge losses). Rank 0 also holds the whole model's shape (no weights) and the
     * whole adapter gathered from the shards, for checkpoints, the drift tracker (its denominators
     * from W0 gathered one layer at a time) and the PEFT export. pissa, milora and corda (an SVD
     * of each whole weight) initialise one weight at a time: rank 0 gathers it, runs the 1-rank
     * init, and every rank keeps its blocks (bitwise the 1-rank init). Full fine-tuning runs on
     * the shards too: every rank trains its blocks of every weight; rank 0 writes the checkpoints
     * and the merged export one gathered tensor at a time (the 1-rank files, byte for byte), a
     * resume reads only each rank's blocks, and the drift's ΔW is gathered one weight at a time.
     * Then:
     *  - rank 0 reports for the job: every event and metric point, the before/after evaluation,
     *    drift and validation at eval points, the checkpoints (wd_run_take_checkpoint), the
     *    export and the summary — exactly what a one-rank job reports;
     *  - a rank ≠ 0 trains its shard and takes part in every collective (checkpoints, eval
     *    points, stops), but posts nothing to `out`, writes no checkpoint and no export
     *    (export_dir stays ""), and ends with WD_RUN_OK when training finished, WD_RUN_STOPPED
     *    when the gang stopped (no checkpoint of its own to upload), or WD_RUN_FAILED with the
     *    error (a failed rank aborts the comm, so the others fail too instead of waiting).
     * `stop` is honoured on every rank: a stop on any rank stops the whole gang after the same
     * step (rank 0 then writes the stop checkpoint). */
    struct ln_comm *comm;
    int rank;
    const struct lnb_backend *be;      /* the device's backend (lnb_select) */
    wd_outbox *out;
    uv_async_t *wake;                  /* woken when done (may be NULL) */

    /* ---- shared with the loop */
    atomic_int stop;                   /* wd_stop */
    atomic_int done;
    pthread_mutex_t mu;                /* guards ckpt_* */
    int64_t ckpt_step;
    double ckpt_loss;                  /* training loss of the checkpoint's step */
    char ckpt_dir[WD_PATH_MAX];
    int ckpt_new;

    /* ---- result: valid once done is 1 */
    wd_run_status status;
    char err_code[64];
    char err_msg[2048];
    int retryable;
    char export_dir[WD_PATH_MAX];      /* files to upload as results */
    int64_t steps, trained_tokens;

    /* ---- thread-private */
    uv_thread_t thread;
    int64_t total_steps, last_row_step, noted_step, drift_every, progress_every;
    double last_row_loss;
    int save_every;
    void *priv;                        /* engine objects during the run */
} wd_run;

/* Initialises the shared fields (call once the inputs are filled). */
void wd_run_init(wd_run *r);
/* Starts the thread. */
int wd_run_start(wd_run *r);
/* Joins the thread (after done) and frees the spec. */
void wd_run_finish(wd_run *r);
/* 1 and the step, its training loss and the checkpoint directory when a checkpoint was written
 * since the last call. */
int wd_run_take_checkpoint(wd_run *r, int64_t *step, double *loss, char dir[WD_PATH_MAX]);

/* 1 when the run failed with device_error (a kernel failed on the GPU): the daemon then exits with
 * WD_EXIT_DEVICE_LOST after reporting, since a CUDA context may stay unusable after an error. */
#define WD_EXIT_DEVICE_LOST 3
int wd_run_device_lost(const wd_run *r);

/* The highest step-NNNNNN checkpoint under dir/out/checkpoints (a state.safetensors in it),
 * or −1. Lets a worker continue a paused job from the checkpoint it wrote itself. */
int64_t wd_run_local_checkpoint(const char *job_dir, char out[WD_PATH_MAX]);

#endif
