# loranull — one Makefile for the whole tree.
#
# Sources are found by folder, so adding a .c file needs no edit here:
#   common/*.c, proto/*.c            -> build/<v>/libcommon.a, libproto.a
#   worker/engine/*.c, worker/backend/{cpu,comm}/*.c -> libengine.a
#   server/*.c (but main.c)          -> libserver.a,  server/main.c      -> bin/loranull-server
#   worker/daemon/*.c (but main.c)   -> libdaemon.a,  worker/daemon/main.c -> bin/loranull-worker
#   worker/cli/*.c (but main.c)      -> libcli.a,     worker/cli/main.c  -> bin/loranull
#   tests/unit/test_*.c              -> build/<v>/tests/test_*  (cmocka), linked with every lib
# Two variants: release (-O2, binaries in bin/) and asan (ASan+UBSan, binaries in build/asan/bin/).

V ?= release
CC ?= gcc
NVCC ?= nvcc
CUDA_HOME ?= /usr/local/cuda

WARN   := -Wall -Wextra -Werror -Wno-unused-parameter
CSTD   := -std=c11 -D_GNU_SOURCE
CFLAGS_COMMON := $(CSTD) $(WARN) -g -fopenmp -I. -MMD -MP
ifeq ($(V),asan)
  CFLAGS_V := -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
  LDFLAGS_V := -fsanitize=address,undefined
  BIN := build/asan/bin
else
  CFLAGS_V := -O2 -march=x86-64-v2 -mtune=native
  LDFLAGS_V :=
  BIN := bin
endif
CFLAGS  := $(CFLAGS_COMMON) $(CFLAGS_V) $(EXTRA_CFLAGS)
LDFLAGS := -fopenmp $(LDFLAGS_V)
LDLIBS  := -lopenblas -llapacke -llapack -lmicrohttpd -ljansson -lsqlite3 -luv -lcurl -lm -lpthread
B := build/$(V)

COMMON_SRC := $(wildcard common/*.c)
PROTO_SRC  := $(wildcard proto/*.c)
ENGINE_SRC := $(wildcard worker/engine/*.c worker/backend/cpu/*.c worker/backend/comm/*.c)
SERVER_SRC := $(filter-out server/main.c,$(wildcard server/*.c))
DAEMON_SRC := $(filter-out worker/daemon/main.c,$(wildcard worker/daemon/*.c))
CLI_SRC    := $(filter-out worker/cli/main.c,$(wildcard worker/cli/*.c))
UNIT_SRC   := $(wildcard tests/unit/test_*.c)
UNIT_HELPERS := $(filter-out tests/unit/test_%.c,$(wildcard tests/unit/*.c))

obj = $(patsubst %.c,$(B)/obj/%.o,$(1))

LIB_COMMON := $(B)/libcommon.a
LIB_PROTO  := $(B)/libproto.a
LIB_ENGINE := $(B)/libengine.a
LIB_SERVER := $(B)/libserver.a
LIB_DAEMON := $(B)/libdaemon.a
LIB_CLI    := $(B)/libcli.a
# Link order: dependents first.
LIBS := $(LIB_CLI) $(LIB_DAEMON) $(LIB_SERVER) $(LIB_ENGINE) $(LIB_PROTO) $(LIB_COMMON)

# A program is built once its main.c exists.
PROGS := $(if $(wildcard worker/cli/main.c),$(BIN)/loranull) \
         $(if $(wildcard server/main.c),$(BIN)/loranull-server) \
         $(if $(wildcard worker/daemon/main.c),$(BIN)/loranull-worker)
UNIT_BINS := $(patsubst tests/unit/%.c,$(B)/tests/%,$(UNIT_SRC))

.PHONY: all deps test unit bench demo cuda cuda-bin clean asan check-tools
all: $(PROGS) $(if $(shell command -v $(NVCC) 2>/dev/null),cuda cuda-bin)

$(B)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

define mklib
$(1): $(call obj,$(2))
	@mkdir -p $$(dir $$@)
	@rm -f $$@
	$$(AR) rcs $$@ $$^
endef
$(eval $(call mklib,$(LIB_COMMON),$(COMMON_SRC)))
$(eval $(call mklib,$(LIB_PROTO),$(PROTO_SRC)))
$(eval $(call mklib,$(LIB_ENGINE),$(ENGINE_SRC)))
$(eval $(call mklib,$(LIB_SERVER),$(SERVER_SRC)))
$(eval $(call mklib,$(LIB_DAEMON),$(DAEMON_SRC)))
$(eval $(call mklib,$(LIB_CLI),$(CLI_SRC)))

$(BIN)/loranull: $(call obj,worker/cli/main.c) $(LIBS)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $< $(LIBS) $(LDLIBS)
$(BIN)/loranull-server: $(call obj,server/main.c) $(LIBS)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $< $(LIBS) $(LDLIBS)
$(BIN)/loranull-worker: $(call obj,worker/daemon/main.c) $(LIBS)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $< $(LIBS) $(LDLIBS)

$(B)/tests/%: tests/unit/%.c $(call obj,$(UNIT_HELPERS)) $(LIBS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(call obj,$(UNIT_HELPERS)) $(LIBS) $(LDLIBS) -lcmocka

unit: $(PROGS) $(UNIT_BINS)
asan:
	$(MAKE) V=asan unit

-include $(shell find build/$(V)/obj -name '*.d' 2>/dev/null)

# ---- CUDA backend (compiles and links without a GPU) ----
# make cuda: build/cuda/libloranull_cuda.a (worker/backend/cuda/*.cu + the NCCL comm backend),
# the GPU tests and benchmark (tests/gpu/*.c -> build/cuda/tests/), linked with the release libs
# and the CUDA libraries. The default CPU build never links CUDA. GPU tests skip (exit 77) where
# no GPU is present; tests/gpu/run.sh runs them all.
CUDA_SRC := $(wildcard worker/backend/cuda/*.cu)
CUDA_HDR := $(wildcard worker/backend/cuda/*.h)
NVCCFLAGS ?= -O2 -std=c++17 -arch=sm_90 -Xcompiler -Wall,-Wextra,-Werror -I. -I$(CUDA_HOME)/include
CUDA_LIBDIR := $(firstword $(wildcard $(CUDA_HOME)/lib64 $(CUDA_HOME)/lib))
# --as-needed: only a binary that calls NCCL needs libnccl at run time (test_nccl).
CUDA_LDLIBS := -L$(CUDA_LIBDIR) -L$(CUDA_HOME)/lib -Wl,-rpath,$(CUDA_LIBDIR) -Wl,-rpath,$(CUDA_HOME)/lib \
               -Wl,--as-needed -lcudart -lcublas -lcublasLt -lcusolver -lnccl -lstdc++ -Wl,--no-as-needed
CUDA_OBJ := $(patsubst %.cu,build/cuda/obj/%.o,$(CUDA_SRC)) build/cuda/obj/worker/backend/comm/comm_nccl.o
GPU_TEST_SRC := $(wildcard tests/gpu/*.c)
GPU_TEST_HELPERS := $(filter-out tests/gpu/test_%.c tests/gpu/bench_%.c,$(GPU_TEST_SRC))
GPU_TEST_BINS := $(patsubst tests/gpu/%.c,build/cuda/tests/%,$(filter tests/gpu/test_%.c tests/gpu/bench_%.c,$(GPU_TEST_SRC)))
# GPU tests need only the engine and common/ (so a GPU machine needs no server libraries).
CUDA_RELEASE_LIBS := build/release/libengine.a build/release/libcommon.a
GPU_LDLIBS := -lopenblas -llapacke -llapack -ljansson -lm -lpthread

cuda: build/cuda/libloranull_cuda.a $(GPU_TEST_BINS)
build/cuda/obj/%.o: %.cu $(CUDA_HDR) worker/backend/backend.h
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@
build/cuda/obj/worker/backend/comm/comm_nccl.o: worker/backend/comm/comm_nccl.c worker/backend/comm/comm.h
	@mkdir -p $(dir $@)
	$(CC) $(CSTD) $(WARN) -O2 -g -I. -I$(CUDA_HOME)/include -DLN_WITH_NCCL -c $< -o $@
build/cuda/libloranull_cuda.a: $(CUDA_OBJ)
	@mkdir -p $(dir $@)
	@rm -f $@
	$(AR) rcs $@ $^
build/cuda/tests/%: tests/gpu/%.c $(GPU_TEST_HELPERS) tests/gpu/gpu_check.h build/cuda/libloranull_cuda.a $(CUDA_RELEASE_LIBS)
	@mkdir -p $(dir $@)
	$(CC) $(CSTD) $(WARN) -O2 -g -fopenmp -I. -I$(CUDA_HOME)/include -o $@ $< $(GPU_TEST_HELPERS) \
	    build/cuda/libloranull_cuda.a $(CUDA_RELEASE_LIBS) $(GPU_LDLIBS) $(CUDA_LDLIBS)
# make cuda-bin: the programs with the CUDA backend linked in (lnb_select("cuda"), e.g.
# `build/cuda/bin/loranull train --device cuda`). -u pulls the backend out of the archive so the
# programs' weak references to it resolve (every entry point select.h references: an object no
# -u names stays out, and its weak references stay NULL: the host path, silently). Needs every
# library the CPU programs need.
CUDA_PROG_LIBS := $(patsubst build/$(V)/%,build/release/%,$(LIBS))
CUDA_PULL := -Wl,-u,lnb_cuda_open -Wl,-u,lnb_cuda -Wl,-u,lnb_cuda_plan_check -Wl,-u,lnb_cuda_nullspace_basis \
             -Wl,-u,lnb_cuda_cov_init -Wl,-u,comm_nccl_join
cuda-bin: build/cuda/bin/loranull build/cuda/bin/loranull-worker
build/cuda/bin/loranull: build/release/obj/worker/cli/main.o build/cuda/libloranull_cuda.a $(CUDA_PROG_LIBS)
	@mkdir -p $(dir $@)
	$(CC) -fopenmp -o $@ $< $(CUDA_PULL) build/cuda/libloranull_cuda.a $(CUDA_PROG_LIBS) $(LDLIBS) $(CUDA_LDLIBS)
build/cuda/bin/loranull-worker: build/release/obj/worker/daemon/main.o build/cuda/libloranull_cuda.a $(CUDA_PROG_LIBS)
	@mkdir -p $(dir $@)
	$(CC) -fopenmp -o $@ $< $(CUDA_PULL) build/cuda/libloranull_cuda.a $(CUDA_PROG_LIBS) $(LDLIBS) $(CUDA_LDLIBS)

ifneq ($(V),release)
$(CUDA_RELEASE_LIBS) $(filter-out $(CUDA_RELEASE_LIBS),$(CUDA_PROG_LIBS)) build/release/obj/worker/cli/main.o build/release/obj/worker/daemon/main.o:
	$(MAKE) V=release $@
endif

# ---- dependencies, tests, demo, bench ----
deps:
	@bash .ci/deps.sh

PY := .venv/bin/python
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# make test: installs what is missing, builds release + ASan/UBSan, then runs every test
# through pytest (the C unit tests are run by tests/test_unit.py, in both variants).
test: deps
	$(MAKE) -j$(JOBS) all unit
	$(MAKE) -j$(JOBS) V=asan unit
	$(PY) -m pytest -q -ra tests $(PYTEST_ARGS)

bench: deps all
	bash tests/bench/run.sh

demo: all
	bash tests/e2e/demo.sh

clean:
	rm -rf build bin
