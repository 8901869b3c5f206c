"""The C++ core under AddressSanitizer and UndefinedBehaviorSanitizer, once per test run.

The module builds the core with `-DMINIVLLM_SANITIZE=ON` (CMakeLists.txt: -fsanitize=address,
undefined, every report fatal) into a temporary folder: the stress driver csrc/tests/fuzz_core.cc
and a sanitized minivllm._core. The driver then runs for FUZZ_SECONDS while, beside it,
tests/test_core_*.py (all but this module) run in a subprocess against the sanitized _core. Any
sanitizer report, crash or test failure fails a test here.

The subprocess must import the sanitized _core, not the installed one: the package is copied
into a temporary folder with the sanitized _core in it, and Python runs with -S (no site
initialization, so no editable-install finder or .pth path) and a PYTHONPATH of that folder
followed by the site-packages folders. CPython is not built with ASan, so the ASan runtime (and
libstdc++, whose exception machinery ASan intercepts) is preloaded, and leak detection is off
for it.

Skips, saying why, without a C++ compiler, cmake, pybind11 or the compiler's ASan runtime.
"""

from __future__ import annotations

import glob
import os
import shutil
import site
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

FUZZ_SECONDS = 60  # how long the stress driver runs
BUILD_TIMEOUT_S = 900
TESTS_TIMEOUT_S = 900

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


@dataclass(frozen=True)
class SanitizedBuild:
    root: Path  # the temporary folder
    fuzz_core: Path  # the stress driver
    package: Path  # holds the minivllm package with the sanitized _core
    preload: str  # LD_PRELOAD for CPython


def _compiler_file(cxx: str, name: str) -> str | None:
    """The absolute path of a runtime library the compiler links, or None."""
    out = subprocess.run(
        [cxx, f"-print-file-name={name}"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


def _asan_runtime(cxx: str) -> str | None:
    for name in ("libasan.so", "libclang_rt.asan-x86_64.so", "libclang_rt.asan.so"):
        path = _compiler_file(cxx, name)
        if path is not None:
            return path
    return None


# What starts a sanitizer report; reports go to the process's stderr (log_path is not honoured
# by every runtime combination, so the output is searched instead).
REPORT_MARKERS = ("runtime error:", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "SUMMARY: ")


def _sanitizer_env(leaks: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = f"detect_leaks={int(leaks)}"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    return env


def _first_report(output: str) -> str | None:
    """The start of the first sanitizer report in `output`, or None."""
    starts = [i for i in (output.find(m) for m in REPORT_MARKERS) if i >= 0]
    if not starts:
        return None
    start = output.rfind("\n", 0, min(starts)) + 1
    return output[start : start + 4000]


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    result = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            f"{what} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )


def _copy_package(dest: Path, core: Path) -> None:
    """The installed minivllm package (editable or not) under `dest`, with `core` as _core."""
    import minivllm
    import minivllm.kernels

    skip = shutil.ignore_patterns("__pycache__", "_core*.so", "_core*.pyd")
    package = Path(minivllm.__file__).parent
    shutil.copytree(package, dest / "minivllm", ignore=skip)
    kernels = Path(minivllm.kernels.__file__).parent
    if not (dest / "minivllm" / "kernels").exists():  # an editable install maps it from kernels/
        shutil.copytree(kernels, dest / "minivllm" / "kernels", ignore=skip)
    shutil.copy2(core, dest / "minivllm" / core.name)


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> SanitizedBuild:
    cmake = shutil.which("cmake")
    cxx = os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None
    )
    if cmake is None or cxx is None:
        pytest.skip(f"needs cmake and a C++ compiler (cmake: {cmake}, compiler: {cxx})")
    try:
        import pybind11
    except ImportError:
        pytest.skip("needs pybind11 in the test environment (pip install pybind11)")
    asan = _asan_runtime(cxx)
    if asan is None:
        pytest.skip(f"{cxx} has no AddressSanitizer runtime")
    root = tmp_path_factory.mktemp("sanitized-core")
    build_dir = root / "build"
    configure = [
        cmake,
        "-S",
        str(REPO),
        "-B",
        str(build_dir),
        f"-DCMAKE_CXX_COMPILER={cxx}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        "-DMINIVLLM_SANITIZE=ON",
        "-DMINIVLLM_BUILD_FUZZ=ON",
    ]
    if "clang" in Path(asan).name:  # clang links the runtime statically unless told otherwise
        configure.append("-DCMAKE_MODULE_LINKER_FLAGS=-shared-libasan")
    _run(configure, root, "cmake configure")
    jobs = str(max(2, os.cpu_count() or 2))
    _run([cmake, "--build", str(build_dir), "--parallel", jobs], root, "cmake build")
    (core,) = [Path(p) for p in glob.glob(str(build_dir / "_core*.so"))]
    package = root / "site"
    _copy_package(package, core)
    stdcxx = _compiler_file(cxx, "libstdc++.so")
    return SanitizedBuild(
        root=root,
        fuzz_core=build_dir / "fuzz_core",
        package=package,
        preload=" ".join(p for p in (asan, stdcxx) if p),
    )


@pytest.fixture(scope="module")
def fuzzer(build: SanitizedBuild) -> Iterator[subprocess.Popen]:
    """The stress driver, started in the background so the Python tests run beside it."""
    out = open(build.root / "fuzz.out", "w+")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(build.fuzz_core), "0", str(FUZZ_SECONDS)],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=_sanitizer_env(leaks=True),
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    out.close()


def _python_env(build: SanitizedBuild) -> dict[str, str]:
    env = _sanitizer_env(leaks=False)  # CPython's own allocations are not ours to judge
    paths = [str(build.package), *site.getsitepackages()]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        paths.append(site.getusersitepackages())
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["LD_PRELOAD"] = build.preload
    return env


@pytest.mark.timeout(1200)  # the sanitized build (module fixture) and the core tests under ASan
def test_core_tests_pass_against_the_sanitized_core(
    build: SanitizedBuild, fuzzer: subprocess.Popen
) -> None:
    env = _python_env(build)
    where = subprocess.run(
        [sys.executable, "-S", "-c", "import minivllm._core as c; print(c.__file__)"],
        cwd=build.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).parent == build.package / "minivllm", where.stdout

    tests = sorted(str(p) for p in TESTS.glob("test_core_*.py") if p.name != Path(__file__).name)
    assert len(tests) >= 4, tests
    result = subprocess.run(
        [sys.executable, "-S", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
        + ["--capture=sys", "--rootdir", str(REPO), *tests],
        cwd=build.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=TESTS_TIMEOUT_S,
        check=False,
    )
    report = _first_report(result.stderr) or _first_report(result.stdout)
    assert result.returncode == 0 and report is None, (
        f"exit {result.returncode}\n{result.stdout[-4000:]}\n{report or result.stderr[-4000:]}"
    )


@pytest.mark.timeout(900)
def test_fuzzer_finds_nothing(build: SanitizedBuild, fuzzer: subprocess.Popen) -> None:
    try:
        returncode = fuzzer.wait(timeout=FUZZ_SECONDS + 300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fuzz_core did not stop after {FUZZ_SECONDS} s")
    output = (build.root / "fuzz.out").read_text(errors="replace")
    report = _first_report(output)
    assert returncode == 0 and report is None, f"exit {returncode}\n{report or output[-4000:]}"
    assert output.startswith("ok: ") and int(output.split()[1]) > 0, output
