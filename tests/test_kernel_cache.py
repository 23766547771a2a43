"""The kernel cache as something that can be damaged, planted in, shared and filled up:
private modes, verified loads (owner, mode, file type, SHA-256), rebuild of rejected files,
fallback to XLA when the cache is unusable, durable publishing, the LRU size bound, and a
compiler given as a command line."""
import errno
import os
import re
import pathlib
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import numpy as np
import pytest
from jax import lax

import alt_jax
from alt_jax import config, runtime
from naive_family import NAIVE_MATMUL, NaiveKnobs, NaiveSpec, child_build_script

OTHER_UID = 4242  # tests run as root here, so chown can make a file someone else's


def _src(rows=1, m=4, k=8, n=8):
    return NAIVE_MATMUL.render(NaiveSpec(m, k, n), NaiveKnobs(rows), None)


def _check_matmul(kernel, m=4, k=8, n=8):
    a = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
    c = np.zeros((m, n), np.float32)
    runtime.run_numpy(kernel, [a, b], [c])
    np.testing.assert_allclose(c, a @ b, rtol=1e-5, atol=1e-5)


def _digest(lib):
    return lib.with_name(lib.name + ".sha256")  # runtime.DIGEST_SUFFIX, spelled out


def _mode(path):
    return os.lstat(path).st_mode & 0o777


@pytest.fixture
def umask_000():
    old = os.umask(0)
    yield
    os.umask(old)


def test_cache_is_private_whatever_the_umask(tmp_path, umask_000):
    root = tmp_path / "missing" / "parents" / "kernels"
    kernel = runtime.KernelCache(root).build(_src())
    lib = pathlib.Path(kernel.lib)
    for d in (tmp_path / "missing", tmp_path / "missing" / "parents", root, lib.parent):
        assert _mode(d) == 0o700, d
    assert _mode(lib) == 0o600 and _mode(_digest(lib)) == 0o600
    _check_matmul(kernel)


def test_an_existing_cache_is_made_private(tmp_path):
    root = tmp_path / "kernels"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)  # as an older alt_jax (or makedirs under umask 022) left it
    runtime.KernelCache(root).build(_src())
    assert _mode(root) == 0o700


# ---- A damaged or planted file at the predictable path is never loaded; it is rebuilt.
# The file is placed in cache B before this process loads anything from B (a loaded path is
# served from the registry), from a good build in cache A.

def _good_build(tmp_path, src):
    return pathlib.Path(runtime.KernelCache(tmp_path / "a").build(src).lib)


def _plant(tmp_path, src, how):
    """Cache B with `how` at src's path; returns (cache, path)."""
    good = _good_build(tmp_path, src)
    cache = runtime.KernelCache(tmp_path / "b")
    lib = cache.path_for(src)
    lib.parent.mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / "b", 0o700)
    os.chmod(lib.parent, 0o700)
    if how == "symlink":
        os.symlink(good, lib)
        shutil.copy(_digest(good), _digest(lib))
        return cache, lib
    if how == "fifo":
        os.mkfifo(lib, 0o600)
        return cache, lib
    shutil.copy(good, lib)
    shutil.copy(_digest(good), _digest(lib))
    os.chmod(lib, 0o600)
    os.chmod(_digest(lib), 0o600)
    if how == "empty":
        lib.write_bytes(b"")
    elif how == "garbage":
        lib.write_bytes(os.urandom(4096))
    elif how == "no_digest":  # e.g. left by an alt_jax without digests
        _digest(lib).unlink()
    elif how == "foreign_owner":
        os.chown(lib, OTHER_UID, OTHER_UID)
        os.chown(_digest(lib), OTHER_UID, OTHER_UID)
    elif how == "group_writable":
        os.chmod(lib, 0o664)
    return cache, lib


@pytest.mark.parametrize("how", ["empty", "garbage", "no_digest", "foreign_owner",
                                 "group_writable", "symlink", "fifo"])
def test_a_rejected_cached_file_is_rebuilt_and_replaced(tmp_path, how):
    src = _src(rows=2)
    cache, lib = _plant(tmp_path, src, how)
    kernel = cache.build(src)
    assert (cache.rejected, cache.builds, cache.hits) == (1, 1, 0)
    st = os.lstat(lib)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
    assert _mode(lib) == 0o600
    _check_matmul(kernel)


def test_the_loader_says_which_file_is_rejected_and_why(tmp_path):
    src = _src(rows=2)
    _, lib = _plant(tmp_path, src, "garbage")
    from alt_jax import _core

    with pytest.raises(RuntimeError, match=r"rejected: its SHA-256 .* does not match") as e:
        _core.load(str(lib), src.symbol)
    assert str(lib) in str(e.value)


_PLANTED = textwrap.dedent("""
    #include <cstdio>
    __attribute__((constructor)) static void planted() {
      std::FILE* f = std::fopen("@MARKER@", "w");
      if (f) std::fclose(f);
    }
    extern "C" __attribute__((visibility("default"))) int @SYMBOL@() { return 0; }
""")


def test_a_planted_library_is_not_loaded_and_its_constructor_never_runs(tmp_path):
    src = _src(rows=3)
    cache = runtime.KernelCache(tmp_path / "cache")
    lib = cache.path_for(src)
    lib.parent.mkdir(parents=True)
    marker = tmp_path / "constructor-ran"
    code = _PLANTED.replace("@MARKER@", str(marker)).replace("@SYMBOL@", src.symbol)
    (tmp_path / "planted.cc").write_text(code)
    subprocess.run([runtime.find_compiler(), "-shared", "-fPIC", str(tmp_path / "planted.cc"),
                    "-o", str(lib)], check=True)
    kernel = cache.build(src)
    assert not marker.exists()
    assert cache.rejected == 1 and cache.builds == 1
    _check_matmul(kernel)


def test_a_truncated_library_does_not_kill_later_processes(tmp_path):
    # Built by a child process: had this process loaded it, truncating the file would
    # damage this process's own mapping (SIGBUS at its next touch, e.g. at exit).
    code = child_build_script(tmp_path / "a", rows=(4,),
                              then="print(cache.rejected, cache.builds)")
    built = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
    assert built.returncode == 0 and built.stdout.split() == ["0", "1"], built.stderr[-2000:]
    lib = runtime.KernelCache(tmp_path / "a").path_for(_src(rows=4))
    with open(lib, "r+b") as f:  # damage as a full disk or a crash mid-write would
        f.truncate(os.path.getsize(lib) // 2)
    for expected in ("1 1", "0 0"):  # the first process rebuilds, the next one just loads
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
        assert out.stdout.split() == expected.split()


# ---- Loading through /proc/self/fd/N: glibc's dlopen hands back an already-loaded library
# whose name equals the one asked for, so a descriptor name must never serve two libraries.

def _status_kernel(status):
    return runtime.KernelSource("status_kernel", textwrap.dedent(f"""
        #include "alt_jax/kernel_abi.h"
        extern "C" __attribute__((visibility("default")))
        int32_t status_kernel(const alt_runtime*, const void* const*, void* const*) {{
          return {status};
        }}
    """))


def _status_of(kernel):
    with pytest.raises(RuntimeError, match=r"returned status \d+") as e:
        runtime.run_numpy(kernel, [], [])
    return int(re.search(r"returned status (\d+)", str(e.value)).group(1))


def test_libraries_with_the_same_symbol_loaded_one_after_another_stay_apart(tmp_path):
    kernels = [runtime.KernelCache(tmp_path / str(s)).build(_status_kernel(s))
               for s in (11, 12, 13)]
    assert [_status_of(k) for k in kernels] == [11, 12, 13]


_FEW_FDS_CHILD = textwrap.dedent("""
    import os, resource, shutil, sys
    from alt_jax import _core
    libs = {libs!r}
    copies = []
    for i in range(12):  # distinct files (inodes), alternating between the two kernels
        lib = libs[i % 2]
        copy = lib[:-3] + "-copy%d.so" % i
        shutil.copy(lib, copy)
        shutil.copy(lib + ".sha256", copy + ".sha256")
        copies.append(copy)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 6, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]))  # descriptor names run out after a few loads
    got = []
    for copy in copies:
        _core.load(copy, "status_kernel")
        try:
            _core.run(copy, "status_kernel", [], [], 0, 1)
        except RuntimeError as e:
            got.append(str(e))
    print("\\n".join(got))
""")


def test_loads_past_the_descriptor_limit_still_get_their_own_library(tmp_path):
    libs = [runtime.KernelCache(tmp_path / str(s)).build(_status_kernel(s)).lib
            for s in (21, 22)]
    out = subprocess.run([sys.executable, "-c", _FEW_FDS_CHILD.format(libs=libs)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 12
    for i, line in enumerate(lines):
        assert line.endswith(f"returned status {21 + i % 2}"), (i, line)


# ---- An unusable cache: the op runs in XLA, with one FallbackWarning, and the right answer.

def _conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _unusable(tmp_path, monkeypatch, how):
    root = tmp_path / "kernels"
    if how == "under_a_regular_file":
        (tmp_path / "file").write_text("not a directory")
        return tmp_path / "file" / "kernels"
    root.mkdir()
    if how == "read_only":
        os.chmod(root, 0o500)  # root ignores the bit; alt_jax honours it anyway
    elif how == "mode_000":
        os.chmod(root, 0o000)
    elif how == "owned_by_someone_else":
        os.chown(root, OTHER_UID, OTHER_UID)
    elif how == "parent_writable_by_all":
        os.chmod(tmp_path, 0o777)
    elif how == "read_only_filesystem":
        def mkdir(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))
        monkeypatch.setattr(os, "mkdir", mkdir)
    elif how == "disk_full":
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", fsync)
    return root


@pytest.mark.parametrize("how", ["under_a_regular_file", "read_only", "mode_000",
                                 "owned_by_someone_else", "parent_writable_by_all",
                                 "read_only_filesystem", "disk_full"])
def test_an_unusable_cache_falls_back_to_xla_with_one_warning(tmp_path, monkeypatch, how):
    cache = runtime.KernelCache(_unusable(tmp_path, monkeypatch, how))
    optimized = alt_jax.optimize(_conv, cache=cache, min_flops=0)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 8)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = optimized(x, w)
    monkeypatch.undo()
    fallbacks = [c for c in caught if issubclass(c.category, alt_jax.FallbackWarning)]
    assert len(fallbacks) == 1, [str(c.message) for c in caught]
    message = str(fallbacks[0].message)
    assert "conv_general_dilated" in message and "kernel cache" in message, message
    np.testing.assert_allclose(got, jax.jit(_conv)(x, w), rtol=1e-5, atol=1e-5)
    assert not optimized.plan_for(x, w).rewritten


def test_ops_that_fall_back_for_one_reason_share_one_warning(tmp_path, monkeypatch):
    cache = runtime.KernelCache(_unusable(tmp_path, monkeypatch, "under_a_regular_file"))
    two_convs = lambda x, w, v: _conv(jax.nn.relu(_conv(x, w)), v)
    optimized = alt_jax.optimize(two_convs, cache=cache, min_flops=0)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 8)).astype(np.float32)
    v = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = optimized(x, w, v)
    monkeypatch.undo()
    fallbacks = [str(c.message) for c in caught
                 if issubclass(c.category, alt_jax.FallbackWarning)]
    assert len(fallbacks) == 1 and "2 ops run in XLA" in fallbacks[0], fallbacks
    assert "kernel cache" in fallbacks[0]
    np.testing.assert_allclose(got, jax.jit(two_convs)(x, w, v), rtol=1e-5, atol=1e-5)


# ---- Durability: data on disk before the name, the name on disk after the rename.

def test_library_and_digest_are_fsynced_before_rename_and_directory_after(tmp_path,
                                                                          monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", str(src)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    lib = pathlib.Path(runtime.KernelCache(tmp_path).build(_src(rows=5)).lib)
    monkeypatch.undo()
    replaced = [i for i, (op, _) in enumerate(events) if op == "replace"]
    assert len(replaced) == 2, events
    for i in replaced:  # the very file renamed was fsynced before
        assert ("fsync", events[i][1]) in events[:i], events
    assert events[-1] == ("fsync", str(lib.parent)), events


# ---- The size bound.

def _size(lib):
    return os.path.getsize(lib) + os.path.getsize(_digest(lib))


def test_the_cache_is_bounded_and_evicts_least_recently_used_never_loaded(tmp_path):
    # Built by another process, so that this one has loaded none of them yet.
    code = child_build_script(tmp_path, rows=(1, 2, 3), then="print(*libs)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    old, loaded, recent = (pathlib.Path(p) for p in out.stdout.split())
    now = time.time()
    for lib, age in ((old, 300), (loaded, 200), (recent, 100)):
        os.utime(lib, (now - age, now - age))

    stale, busy = old.parent / ".build-dead", old.parent / ".build-running"
    stale.mkdir()
    busy.mkdir()
    os.utime(stale, (now - 7200, now - 7200))  # left by a process that died mid-build
    bound = sum(map(_size, (old, loaded, recent))) + _size(old) // 2
    cache = runtime.KernelCache(tmp_path, max_bytes=bound)
    cache.build(_src(rows=2))  # a hit: marks it used ...
    assert os.path.getmtime(loaded) > now - 10
    os.utime(loaded, (now - 400, now - 400))  # ... but being loaded here is what protects it
    newest = cache.build(_src(rows=6))  # goes over the bound by about one library

    assert (cache.hits, cache.builds, cache.evicted) == (1, 1, 1)
    assert not old.exists() and not _digest(old).exists()
    assert loaded.exists() and recent.exists() and os.path.exists(newest.lib)
    assert not stale.exists() and busy.exists()
    assert sum(map(_size, (loaded, recent, pathlib.Path(newest.lib)))) \
        <= cache.max_bytes


def test_cache_max_mb_option_sets_the_bound(monkeypatch):
    monkeypatch.delenv("ALT_JAX_CACHE_MAX_MB", raising=False)
    assert runtime.KernelCache("/nonexistent").max_bytes == config.get("cache_max_mb") << 20
    monkeypatch.setenv("ALT_JAX_CACHE_MAX_MB", "7")
    assert runtime.KernelCache("/nonexistent").max_bytes == 7 << 20
    monkeypatch.setenv("ALT_JAX_CACHE_MAX_MB", "0")
    with pytest.raises(ValueError, match="positive"):
        config.get("cache_max_mb")


# ---- The compiler as a command line.

def test_a_compiler_command_line_is_split_like_a_shell_would(tmp_path):
    src = _src(rows=7)
    kernel = runtime.KernelCache(tmp_path / "a", compiler="env g++").build(src)  # ccache-like
    _check_matmul(kernel)
    spaced = tmp_path / "my tools" / "g++"
    spaced.parent.mkdir()
    spaced.symlink_to(shutil.which("g++"))
    kernel = runtime.KernelCache(tmp_path / "b", compiler=str(spaced)).build(src)
    _check_matmul(kernel)
