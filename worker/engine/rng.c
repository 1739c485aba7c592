/* rng.c — xoshiro256** (Blackman & Vigna), seeded through splitmix64. */
#include <math.h>

#include "worker/engine/rng.h"

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void ln_rng_seed(ln_rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t ln_rng_u64(ln_rng *r)
{
    uint64_t *s = r->s;
    uint64_t out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

float ln_rng_uniform(ln_rng *r) { return (float)(ln_rng_u64(r) >> 40) * (1.0f / 16777216.0f); }

float ln_rng_normal(ln_rng *r)
{
    /* 1 − u keeps the log argument in (0, 1]. */
    double u1 = 1.0 - (double)(ln_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
    double u2 = (double)(ln_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}
