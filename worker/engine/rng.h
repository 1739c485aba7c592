/* rng.h — a small seeded PRNG (xoshiro256**, seeded by splitmix64) whose whole state is
 * four words, so checkpoints can save it and a resume continues the same stream. */
#ifndef LN_RNG_H
#define LN_RNG_H

#include <stdint.h>

typedef struct ln_rng {
    uint64_t s[4];
} ln_rng;

void ln_rng_seed(ln_rng *r, uint64_t seed);
uint64_t ln_rng_u64(ln_rng *r);
/* Uniform in [0, 1) with 24 random bits (exactly representable in fp32). */
float ln_rng_uniform(ln_rng *r);
/* Standard normal (Box–Muller; consumes two uniforms). */
float ln_rng_normal(ln_rng *r);

#endif
