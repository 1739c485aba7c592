/* comm.c — the backend-independent front of comm.h: argument checks and dispatch. */
#include "worker/backend/comm/comm.h"

int comm_rank(const ln_comm *c) { return c->rank; }
int comm_size(const ln_comm *c) { return c->size; }
const char *comm_backend_name(const ln_comm *c) { return c->ops->name; }

int comm_allreduce_sum(ln_comm *c, float *buf, int64_t n, ln_err *e)
{
    if (n < 0) return ln_errf(e, "comm allreduce (rank %d): negative element count %lld", c->rank, (long long)n);
    if (n > 0 && !buf) return ln_errf(e, "comm allreduce (rank %d): NULL buffer for %lld elements", c->rank, (long long)n);
    return c->ops->allreduce_sum(c, buf, n, e);
}

int comm_allgather(ln_comm *c, const float *send, float *recv, int64_t n, ln_err *e)
{
    if (n < 0) return ln_errf(e, "comm allgather (rank %d): negative element count %lld", c->rank, (long long)n);
    if (n > 0 && (!send || !recv))
        return ln_errf(e, "comm allgather (rank %d): NULL buffer for %lld elements", c->rank, (long long)n);
    return c->ops->allgather(c, send, recv, n, e);
}

int comm_broadcast(ln_comm *c, float *buf, int64_t n, int root, ln_err *e)
{
    if (root < 0 || root >= c->size)
        return ln_errf(e, "comm broadcast (rank %d): root %d is not a rank of a group of %d", c->rank, root, c->size);
    if (n < 0) return ln_errf(e, "comm broadcast (rank %d): negative element count %lld", c->rank, (long long)n);
    if (n > 0 && !buf) return ln_errf(e, "comm broadcast (rank %d): NULL buffer for %lld elements", c->rank, (long long)n);
    return c->ops->broadcast(c, buf, n, root, e);
}

int comm_barrier(ln_comm *c, ln_err *e) { return c->ops->barrier(c, e); }

void comm_abort(ln_comm *c)
{
    if (c) c->ops->abort(c);
}

void comm_free(ln_comm *c)
{
    if (c) c->ops->free(c);
}
