"""Just-in-time build and load of the C++ (CPU) and CUDA extensions in csrc/.

Why just in time: an extension must be compiled against the exact torch it runs with, and
pip's build isolation would fetch a second multi-GB torch to build it ahead of time. So
setup.py stays pure Python, and the first use compiles with ninja through
torch.utils.cpp_extension.load into a cache keyed by torch version, CPU capability or CUDA
archs, flags and a hash of the sources: later processes load the cached library in
milliseconds. Environment:

    KDKERNELS_NO_BUILD=1       never compile; load what the cache holds, else report why not
    KDKERNELS_SKIP_CUDA=1      do not build the CUDA extension
    KDKERNELS_CUDA_ARCH        CUDA archs, ';'-separated (default "9.0a;8.0")
    KDKERNELS_CACHE_DIR        cache root (default $TORCH_EXTENSIONS_DIR/kdkernels, else
                               ~/.cache/kdkernels)
    MAX_JOBS                   parallel compile jobs (read by torch's ninja build)
    CUDA_HOME                  toolkit root; found from nvcc on PATH when unset or wrong
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

_PKG = Path(__file__).resolve().parent
# Sources ship inside the package when installed from a wheel, at the repo root in a checkout.
SRC_DIR = next((d for d in (_PKG / "csrc", _PKG.parent / "csrc") if d.is_dir()), _PKG / "csrc")
CPU_SOURCES = ("register.cpp", "rows_cpu.cpp")
CUDA_SOURCES = ("register.cpp", "rows_cuda.cu")
HEADERS = ("row_math.h", "rows_cpu.h", "rows_cuda.h")
DEFAULT_CUDA_ARCH = "9.0a;8.0"

# torch's own per-capability compiler flags for at::vec (cmake/Codegen.cmake).
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}


class ExtensionUnavailable(ImportError):
    """The extension cannot be built or loaded here; the message says why."""


_state: dict[str, object] = {}  # "cpu"/"cuda" -> library path, or the ExtensionUnavailable


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "false", "False")


def cache_root() -> Path:
    if os.environ.get("KDKERNELS_CACHE_DIR"):
        return Path(os.environ["KDKERNELS_CACHE_DIR"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "kdkernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kdkernels"


def cpu_capability() -> str:
    """torch's CPU capability (AVX512 / AVX2 / DEFAULT ...), honouring ATEN_CPU_CAPABILITY."""
    return torch.backends.cpu.get_cpu_capability()


def cuda_archs() -> list[str]:
    raw = os.environ.get("KDKERNELS_CUDA_ARCH", DEFAULT_CUDA_ARCH)
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    for a in archs:
        if not re.fullmatch(r"\d+\.\d+a?", a):
            raise ExtensionUnavailable(f"KDKERNELS_CUDA_ARCH entries look like 9.0a or 8.0, "
                                       f"got {a!r} in {raw!r}")
    return archs


def _gencode(arch: str) -> str:
    num = arch.replace(".", "")
    return f"-gencode=arch=compute_{num},code=sm_{num}"


def _cpu_flags() -> list[str]:
    return ["-O3", "-fopenmp", *_CAPABILITY_FLAGS.get(cpu_capability(), [])]


def find_cuda_home() -> str | None:
    """The toolkit root whose lib64 holds libcudart; nvcc on PATH may be a wrapper script
    (then the root it execs is taken, not the wrapper's own prefix)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        try:
            text = real.read_text(errors="ignore")[:4096] if real.stat().st_size < 65536 else ""
        except OSError:
            text = ""
        candidates += [m.group(1) for m in re.finditer(r"(/[^\s\"']+)/bin/nvcc", text)]
        candidates.append(str(real.parent.parent))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and any(
                next((Path(c) / lib).glob("libcudart.so*"), None) for lib in ("lib64", "lib")):
            return str(Path(c))
    return None


def _pip_cuda_includes() -> list[str]:
    """Headers of the nvidia-* wheels (cublas_v2.h, cusparse.h, ... that ATen's CUDA headers
    include), searched after the toolkit's own (-idirafter: their cuda_runtime.h is partial)."""
    out = []
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        if base.is_dir():
            out += [f"-idirafter{p}" for p in sorted(base.glob("*/include")) if p.is_dir()]
    return out


def _source_hash(names: tuple[str, ...], flags: list[str]) -> str:
    h = hashlib.sha256()
    for name in (*names, *HEADERS):
        path = SRC_DIR / name
        h.update(name.encode())
        h.update(path.read_bytes() if path.exists() else b"missing")
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:12]


def _library_path(build_dir: Path, name: str) -> Path:
    return build_dir / f"{name}.so"


def _compile(kind: str, name: str, build_dir: Path, sources: list[str], **kwargs) -> Path:
    lib = _library_path(build_dir, name)
    if lib.exists():
        return lib
    if "CUDA_HOME" not in os.environ and torch.version.cuda is not None:
        home = find_cuda_home()  # read by cpp_extension at import; avoids its bogus guess
        if home:
            os.environ["CUDA_HOME"] = home
    cpp_extension = _cpp_extension()
    if _env_flag("KDKERNELS_NO_BUILD"):
        raise ExtensionUnavailable(f"the {kind} extension is not built in {build_dir} and "
                                   "KDKERNELS_NO_BUILD=1 forbids compiling it")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise ExtensionUnavailable(f"no C++ compiler ({cxx!r} not on PATH) to build the {kind} "
                                   "extension; install g++ or set CXX")
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise ExtensionUnavailable(f"ninja is needed to build the {kind} extension "
                                   "(pip install ninja)") from None
    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"kdkernels: compiling the {kind} extension into {build_dir} (once per torch "
          "version and source change; about a minute per file on 2 cores)...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        cpp_extension.load(name=name, sources=sources, build_directory=str(build_dir),
                           is_python_module=False, verbose=_env_flag("KDKERNELS_VERBOSE"),
                           **kwargs)
    except Exception as err:  # the compiler's output is in the message
        tail = str(err)[-3000:]
        raise ExtensionUnavailable(f"building the {kind} extension failed ({type(err).__name__})"
                                   f"; set KDKERNELS_VERBOSE=1 for the full log:\n{tail}") from err
    print(f"kdkernels: {kind} extension built in {time.perf_counter() - start:.0f} s",
          file=sys.stderr, flush=True)
    return lib


def _cpu_build() -> tuple[str, Path, list[str], dict]:
    flags = _cpu_flags()
    tag = f"cpu_{cpu_capability().lower()}_{_source_hash(CPU_SOURCES, flags)}"
    name = f"kdkernels_{tag}"
    build_dir = cache_root() / f"torch{torch.__version__}" / tag
    kwargs = dict(extra_cflags=flags, extra_ldflags=["-fopenmp"], with_cuda=False)
    return name, build_dir, [str(SRC_DIR / s) for s in CPU_SOURCES], kwargs


def _cuda_build() -> tuple[str, Path, list[str], dict]:
    archs = cuda_archs()
    home = find_cuda_home()
    if torch.version.cuda is None:
        raise ExtensionUnavailable(f"torch {torch.__version__} is a CPU-only build; the CUDA "
                                   "extension needs a CUDA build of torch")
    if home is None:
        raise ExtensionUnavailable("no CUDA toolkit found (nvcc with a lib64/libcudart next to "
                                   "it); set CUDA_HOME")
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", *map(_gencode, archs)]
    cflags = ["-O3", "-DKDKERNELS_CUDA_BUILD", *_pip_cuda_includes()]
    tag = f"cuda_{'_'.join(a.replace('.', '') for a in archs)}_" \
          f"{_source_hash(CUDA_SOURCES, nvcc_flags + cflags + [home])}"
    name = f"kdkernels_{tag}"
    build_dir = cache_root() / f"torch{torch.__version__}" / tag
    kwargs = dict(extra_cflags=cflags, extra_cuda_cflags=nvcc_flags,
                  extra_include_paths=[str(SRC_DIR)], with_cuda=True)
    return name, build_dir, [str(SRC_DIR / s) for s in CUDA_SOURCES], kwargs


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found" warning on
    machines without a GPU: a CPU user builds the C++ extension and needs no word on CUDA
    (the CUDA extension's own availability is reported by ``kdkernels.info``)."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    quiet = not torch.cuda.is_available() and log.level < logging.ERROR
    old = log.level
    if quiet:
        log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(old)
    return cpp_extension


def _set_cuda_home(home: str) -> None:
    # cpp_extension reads CUDA_HOME once at import; point it at the real toolkit root.
    cpp_extension = _cpp_extension()
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home


def _load(kind: str) -> Path:
    if kind in _state:
        value = _state[kind]
        if isinstance(value, ExtensionUnavailable):
            raise value
        return value  # type: ignore[return-value]
    try:
        if kind == "cuda":
            if _env_flag("KDKERNELS_SKIP_CUDA"):
                raise ExtensionUnavailable("the CUDA extension is skipped (KDKERNELS_SKIP_CUDA=1)")
            _load("cpu")  # it holds the op schemas the CUDA library registers against
            name, build_dir, sources, kwargs = _cuda_build()
            _set_cuda_home(find_cuda_home())  # type: ignore[arg-type]
        else:
            name, build_dir, sources, kwargs = _cpu_build()
        lib = _compile(kind, name, build_dir, sources, **kwargs)
        torch.ops.load_library(str(lib))
    except ExtensionUnavailable as err:
        _state[kind] = err
        raise
    except OSError as err:  # a cached library that does not load (e.g. another machine's)
        # torch.ops.load_library hides the dynamic loader's reason (a missing symbol...) in
        # the exception's cause: say it.
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        _state[kind] = ExtensionUnavailable(f"loading the {kind} extension failed: "
                                            f"{err}{cause}")
        raise _state[kind] from err  # type: ignore[misc]
    _state[kind] = lib
    return lib


def load_cpu() -> Path:
    """Build (first time) and load the CPU extension; raise ExtensionUnavailable with why not."""
    lib = _load("cpu")
    from . import op_fakes  # noqa: F401  (fake impls of the ops, for torch.compile)

    return lib


def load_cuda() -> Path:
    """Build (first time) and load the CUDA extension (and the CPU one it depends on)."""
    lib = _load("cuda")
    from . import op_fakes  # noqa: F401

    return lib


def load_cpu_library(label: str, source: str) -> Path:
    """Build (first use) and load a small CPU library of its own from ``csrc/<source>``, with
    the CPU extension's flags, cache and rules (KDKERNELS_NO_BUILD...), keyed by its own
    source hash: an op that lives there neither rebuilds nor waits for the row-op extension
    (kdkernels/uld/_cpp.py). Raises ExtensionUnavailable saying why not."""
    key = f"lib:{source}"
    if key in _state:
        value = _state[key]
        if isinstance(value, ExtensionUnavailable):
            raise value
        return value  # type: ignore[return-value]
    try:
        path = SRC_DIR / source
        if not path.exists():
            raise ExtensionUnavailable(f"{path} is missing")
        flags = _cpu_flags()
        h = hashlib.sha256(path.read_bytes())
        h.update(" ".join(flags).encode())
        h.update(torch.__version__.encode())
        stem = Path(source).stem
        tag = f"{stem}_{cpu_capability().lower()}_{h.hexdigest()[:12]}"
        build_dir = cache_root() / f"torch{torch.__version__}" / tag
        lib = _compile(label, f"kdkernels_{tag}", build_dir, [str(path)], extra_cflags=flags,
                       extra_ldflags=["-fopenmp"], with_cuda=False)
        torch.ops.load_library(str(lib))
    except ExtensionUnavailable as err:
        _state[key] = err
        raise
    except OSError as err:
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        _state[key] = ExtensionUnavailable(f"loading the {label} library failed: {err}{cause}")
        raise _state[key] from err  # type: ignore[misc]
    _state[key] = lib
    return lib


def describe() -> dict[str, str]:
    """What each extension would be built for (for kdkernels.info)."""
    info = {"cpu": f"capability {cpu_capability()}, flags {' '.join(_cpu_flags())}",
            "cache": str(cache_root()), "sources": str(SRC_DIR)}
    try:
        info["cuda"] = f"archs {';'.join(cuda_archs())}, CUDA_HOME {find_cuda_home()}, " \
                       f"torch CUDA {torch.version.cuda}"
    except ExtensionUnavailable as err:
        info["cuda"] = str(err)
    return info
