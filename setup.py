"""Builds alt_jax with its native core (csrc/, via CMake + pybind11) against the installed
jaxlib's XLA FFI headers. Use `pip install --no-build-isolation .` so the headers come from
the jaxlib you will run (see README)."""
import os
import pathlib
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).parent.resolve()
KERNEL_HEADERS = ROOT / "csrc" / "include" / "alt_jax"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import jaxlib
        import pybind11

        out_dir = pathlib.Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = pathlib.Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        include = pathlib.Path(jaxlib.__file__).parent / "include"
        subprocess.check_call([
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DJAX_FFI_INCLUDE_DIR={include}",
            "-DCMAKE_BUILD_TYPE=Release",
        ])
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)])


class BuildPyWithHeaders(build_py):
    """Ships csrc/include/alt_jax/*.h inside the package: generated kernels include them."""

    def run(self):
        super().run()
        dest = pathlib.Path(self.build_lib) / "alt_jax" / "include" / "alt_jax"
        dest.mkdir(parents=True, exist_ok=True)
        for header in KERNEL_HEADERS.glob("*.h"):
            shutil.copy2(header, dest / header.name)


setup(
    packages=find_packages(include=["alt_jax", "alt_jax.*", "tuner", "tuner.*"]),
    package_data={"alt_jax": ["codegen/*.cc"]},
    ext_modules=[CMakeExtension("alt_jax._core")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithHeaders},
    zip_safe=False,
)
