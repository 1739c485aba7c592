"""The device kit (tests/gpu/kit.sh): the CUDA build's programs and the libraries they load, made
here and carried to a bare GPU machine, where tests/gpu/run.sh uses them instead of building.
Checked without a GPU: the kit's libraries are all a program needs beyond glibc and the CUDA
toolkit, its programs start with only those (a GPU test skips, saying so), run.sh takes the kit
when its stamp matches the tree and declines a stale one, building instead."""
import os
import pathlib
import shutil
import subprocess
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GLIBC = ("libc.so", "libm.so", "libdl.so", "libpthread.so", "librt.so", "ld-linux", "libresolv.so", "libutil.so",
         "linux-vdso")


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("device kit: no CUDA toolkit (nvcc) here, so there is no CUDA build to pack")
    d = tmp_path_factory.mktemp("kit")
    p = subprocess.run(["bash", "tests/gpu/kit.sh"], cwd=ROOT, env={**os.environ, "GPUKIT": str(d / "gpukit")},
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    unpacked = d / "unpacked"
    with tarfile.open(d / "gpukit" / "kit.tar.gz") as t:
        t.extractall(unpacked, filter="tar")
    return d / "gpukit", unpacked


def cuda_dir():
    return os.path.realpath(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


def programs(unpacked):
    progs = sorted((unpacked / "tests").iterdir()) + sorted((unpacked / "bin").iterdir())
    assert {p.name for p in progs} >= {"test_model", "test_kernels", "bench_gpu", "loranull", "loranull-worker"}
    return progs


def test_stamp_is_the_trees(kit):
    gpukit, _ = kit
    stamp = subprocess.run(["bash", "tests/gpu/kit_stamp.sh"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert (gpukit / "stamp").read_text().strip() == stamp.stdout.strip()
    assert len(stamp.stdout.strip()) == 16


def test_kit_libraries_are_all_a_program_needs(kit):
    """With the kit's lib/ first on the path, every library a program loads is the kit's, glibc's or
    the CUDA toolkit's: nothing else of this machine's system is needed on the device."""
    _, unpacked = kit
    lib = unpacked / "lib"
    assert (lib / "libopenblas.so.0").exists() and (lib / "libjansson.so.4").exists()
    env = {**os.environ, "LD_LIBRARY_PATH": str(lib)}
    for prog in programs(unpacked):
        out = subprocess.run(["ldd", str(prog)], env=env, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if "not found" in line:
                pytest.fail(f"{prog.name}: {line.strip()}")
            if len(parts) < 3 or parts[1] != "=>":
                continue
            name, path = parts[0], os.path.realpath(parts[2])
            if name.startswith(GLIBC) or path.startswith(cuda_dir()) or path.startswith("/usr/local/cuda"):
                continue
            assert path.startswith(str(lib.resolve())), f"{prog.name} loads {name} from {path}, not from the kit"


def test_kit_programs_start_on_the_kits_libraries(kit):
    _, unpacked = kit
    env = {**os.environ, "LD_LIBRARY_PATH": str(unpacked / "lib")}
    p = subprocess.run([str(unpacked / "tests" / "test_kernels")], env=env, capture_output=True, text=True,
                       timeout=300)
    out = p.stdout + p.stderr
    if p.returncode == 77:
        assert "SKIP" in out  # no GPU here: the program loaded and said why it skips
    else:
        assert p.returncode == 0 and "PASS test_kernels" in out, out[-3000:]
    p = subprocess.run([str(unpacked / "bin" / "loranull"), "--help"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "train" in p.stdout + p.stderr, p.stdout + p.stderr


def run_sh_dry(gpukit, out):
    env = {**os.environ, "GPUKIT": str(gpukit), "OUT": str(out)}
    return subprocess.run(["bash", "tests/gpu/run.sh", "--dry-run", "build", "tests"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)


def test_run_sh_takes_a_matching_kit(kit, tmp_path):
    gpukit, _ = kit
    p = run_sh_dry(gpukit, tmp_path / "out")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    build = [line for line in summary.splitlines() if line.split()[1:2] == ["build"]]
    assert len(build) == 1 and build[0].startswith("PASS") and "from the kit" in build[0], summary
    assert "stamp" in (tmp_path / "out" / "kit.log").read_text()
    assert "SKIP     test_model" in summary


def test_run_sh_declines_a_stale_kit_and_builds(kit, tmp_path):
    gpukit, _ = kit
    stale = tmp_path / "stale"
    shutil.copytree(gpukit, stale)
    (stale / "stamp").write_text("0000000000000000\n")
    p = run_sh_dry(stale, tmp_path / "out")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    log = (tmp_path / "out" / "kit.log").read_text()
    assert "kit not used" in log and "built from other sources" in log and "0000000000000000" in log, log
    summary = (tmp_path / "out" / "summary.txt").read_text()
    build = [line for line in summary.splitlines() if line.split()[1:2] == ["build"]]
    assert len(build) == 1 and build[0].startswith("PASS") and "from the kit" not in build[0], summary
