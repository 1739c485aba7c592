"""ctypes access to loranull's LoRA-Null math (worker/engine/{nullspace,lora_init,drift}.c) for the
reference tests: the C sources are compiled once per session into a shared object, exactly as
they are, with the project's own common/ helpers."""
import ctypes
import pathlib
import subprocess

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
SOURCES = ["worker/engine/nullspace.c", "worker/engine/lora_init.c", "worker/engine/drift.c",
           "common/err.c", "common/util.c"]

f32p = ctypes.POINTER(ctypes.c_float)
f64p = ctypes.POINTER(ctypes.c_double)


class LnErr(ctypes.Structure):
    _fields_ = [("msg", ctypes.c_char * 1024)]


class LnCov(ctypes.Structure):
    _fields_ = [("d", ctypes.c_int), ("samples", ctypes.c_int64), ("tokens", ctypes.c_int64),
                ("sum", f64p)]


class LnLayerInit(ctypes.Structure):
    _fields_ = [("d_out", ctypes.c_int), ("d_in", ctypes.c_int), ("r", ctypes.c_int),
                ("scale", ctypes.c_double), ("C", f64p), ("U_null", f64p), ("seed", ctypes.c_uint64)]


def _p(a, t):
    return a.ctypes.data_as(t)


class Math:
    def __init__(self, so_path):
        self.lib = ctypes.CDLL(str(so_path))
        L = self.lib
        L.ln_drift_quad_dense.argtypes = [f32p, ctypes.c_int, ctypes.c_int, f64p, f64p, ctypes.c_void_p]
        L.ln_drift_quad_lowrank.argtypes = [f32p, f32p, ctypes.c_int, f32p, f32p, ctypes.c_int,
                                            ctypes.c_int, ctypes.c_int, ctypes.c_double, f64p, f64p,
                                            ctypes.c_void_p]

    def _check(self, rc, err):
        if rc != 0:
            raise RuntimeError(err.msg.decode())

    def method(self, name):
        m, err = ctypes.c_int(), LnErr()
        self._check(self.lib.ln_method_parse(name.encode(), ctypes.byref(m), ctypes.byref(err)), err)
        return m.value

    def covariance(self, samples):
        """samples: list of (tokens × d) float32 arrays → C (d × d, float64)."""
        d = samples[0].shape[1]
        cov, err = LnCov(), LnErr()
        self._check(self.lib.ln_cov_init(ctypes.byref(cov), d, ctypes.byref(err)), err)
        try:
            for x in samples:
                x = np.ascontiguousarray(x, dtype=np.float32)
                self._check(self.lib.ln_cov_add_sample(ctypes.byref(cov), _p(x, f32p), x.shape[0],
                                                       ctypes.byref(err)), err)
            C = np.empty((d, d), dtype=np.float64)
            self._check(self.lib.ln_cov_finish(ctypes.byref(cov), _p(C, f64p), ctypes.byref(err)), err)
        finally:
            self.lib.ln_cov_free(ctypes.byref(cov))
        return C

    def basis(self, C, r):
        C = np.ascontiguousarray(C, dtype=np.float64)
        U = np.empty((C.shape[0], r), dtype=np.float64)
        ev = np.empty(r, dtype=np.float64)
        err = LnErr()
        self._check(self.lib.ln_nullspace_basis(_p(C, f64p), C.shape[0], r, _p(U, f64p), _p(ev, f64p),
                                                ctypes.byref(err)), err)
        return U, ev

    def init(self, method, W0, r, scale=1.0, C=None, seed=0):
        """Returns (residual W, A, B) for a method on one d_out × d_in weight."""
        W = np.array(W0, dtype=np.float32, order="C", copy=True)
        d_out, d_in = W.shape
        A = np.zeros((r, d_in), dtype=np.float32)
        B = np.zeros((d_out, r), dtype=np.float32)
        Cc = None if C is None else np.ascontiguousarray(C, dtype=np.float64)
        li = LnLayerInit(d_out, d_in, r, scale, _p(Cc, f64p) if Cc is not None else None, None, seed)
        err = LnErr()
        self._check(self.lib.ln_init_layer(self.method(method), ctypes.byref(li), _p(W, f32p), _p(A, f32p),
                                           _p(B, f32p), ctypes.byref(err)), err)
        return W, A, B

    def drift_lowrank(self, B1, A1, B0, A0, scale, C):
        B1, A1 = (np.ascontiguousarray(a, dtype=np.float32) for a in (B1, A1))
        r0 = 0 if B0 is None else B0.shape[1]
        if B0 is not None:
            B0, A0 = (np.ascontiguousarray(a, dtype=np.float32) for a in (B0, A0))
        C = np.ascontiguousarray(C, dtype=np.float64)
        out, err = ctypes.c_double(), LnErr()
        self._check(self.lib.ln_drift_quad_lowrank(_p(B1, f32p), _p(A1, f32p), B1.shape[1],
                                                   _p(B0, f32p) if B0 is not None else None,
                                                   _p(A0, f32p) if A0 is not None else None, r0,
                                                   B1.shape[0], A1.shape[1], scale, _p(C, f64p),
                                                   ctypes.byref(out), ctypes.byref(err)), err)
        return out.value

    def drift_dense(self, W, C):
        W = np.ascontiguousarray(W, dtype=np.float32)
        C = np.ascontiguousarray(C, dtype=np.float64)
        out, err = ctypes.c_double(), LnErr()
        self._check(self.lib.ln_drift_quad_dense(_p(W, f32p), W.shape[0], W.shape[1], _p(C, f64p),
                                                 ctypes.byref(out), ctypes.byref(err)), err)
        return out.value


def build(outdir):
    so = pathlib.Path(outdir) / "libloranull_math.so"
    cmd = ["gcc", "-std=c11", "-D_GNU_SOURCE", "-O2", "-fPIC", "-shared", "-fopenmp", f"-I{ROOT}", "-o", str(so)]
    cmd += [str(ROOT / s) for s in SOURCES] + ["-lopenblas", "-llapacke", "-llapack", "-lm"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return Math(so)
