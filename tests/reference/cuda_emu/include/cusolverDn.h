/* cusolverDn.h: the host emulation (tests/reference/cuda_emu/cuda_emu.h) */
#include "../cuda_emu.h"
