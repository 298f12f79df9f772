"""Build of llmcache and its compiled extension llmcache._C.

Switches (environment variables):
  LLMCACHE_SKIP_EXT=1     pure-Python install: ops fall back to Triton / PyTorch.
  LLMCACHE_FORCE_CUDA=1   compile the CUDA kernels even where no CUDA torch or toolkit is detected
                          (=0: never compile them).
  LLMCACHE_CUDA_ARCHS     CUDA targets, default "8.0;9.0+PTX" (A100, H100/H200 machine code, and
                          sm_90 PTX that the driver compiles for any newer card).
  MAX_JOBS                parallel compile jobs (torch's ninja build honours it).
  CUDA_HOME               toolkit root; found from `nvcc` on PATH when unset (wrappers included).
The CPU kernels never use -march: AVX-512 / AVX2 paths are chosen at run time.
"""

import os
import re
import shutil
import subprocess
import tempfile
from glob import glob

from setuptools import setup


def find_cuda_home():
    """The toolkit root behind `nvcc` on PATH, even when nvcc is a wrapper script."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # A dry run of a compile prints the driver's own location ("#$ TOP=<root>/bin/..").
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        with open(source, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            dry = subprocess.run([nvcc, "--dryrun", "-c", source], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ TOP=(\S+)", dry.stdout + dry.stderr, re.M)
    if match:
        return os.path.realpath(match.group(1))
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def extensions():
    if os.environ.get("LLMCACHE_SKIP_EXT") == "1":
        print("llmcache: LLMCACHE_SKIP_EXT=1, building no extension (Python fallbacks only)")
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("LLMCACHE_FORCE_CUDA")
    with_cuda = force == "1" or (force != "0" and torch.version.cuda is not None and cuda_home is not None)
    archs = os.environ.get("LLMCACHE_CUDA_ARCHS", "8.0;9.0+PTX")
    sources = ["csrc/module.cpp", "csrc/torch_cpu.cpp", "csrc/watch.cpp", "csrc/host_ops.cpp",
               "csrc/exact_index.cpp", "csrc/route_rows.cpp", "csrc/route_pages.cpp",
               "csrc/plan_arrays.cpp", "csrc/suffix_arrays.cpp"] + sorted(glob("csrc/cpu/*.cpp"))
    macros = [
        ("LLMCACHE_TORCH_VERSION", f'"{torch.__version__}"'),
        ("LLMCACHE_CUDA_ARCHS", f'"{archs if with_cuda else ""}"'),
    ]
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    args = {"cxx": cxx}
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += ["csrc/torch_cuda.cpp"] + sorted(glob("kernels/*.cu"))
        macros.append(("LLMCACHE_WITH_CUDA", None))
        args["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    print(f"llmcache: building llmcache._C with CUDA={with_cuda} archs={archs if with_cuda else '-'} CUDA_HOME={cuda_home}")
    ext = ext_cls(
        "llmcache._C",
        sources,
        include_dirs=[os.path.abspath("csrc"), os.path.abspath("kernels")],
        define_macros=macros,
        extra_compile_args=args,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
