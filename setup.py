"""Builds the optional C extension ``dlrm_mtl._cpu_kernels`` (dlrm_mtl/csrc/cpu_kernels.c):
fused float32 host kernels, no Torch headers, OpenMP where the compiler has it (the kernels
then share PyTorch's libgomp threads; without it they run on one thread). The package metadata lives in pyproject.toml.
Where no C compiler exists the build still succeeds without it and dlrm_mtl uses its ATen
paths (dlrm_mtl/native.py)."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """A failed compile leaves the extension out instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 -- no compiler, headers, ...: install without it
            print(f"[dlrm_mtl] building the C kernels failed ({e}); the ATen paths will be used")

    def build_extension(self, ext: Extension) -> None:
        try:  # with OpenMP: the lookup kernels on PyTorch's own libgomp threads
            super().build_extension(ext)
            return
        except Exception as e:  # noqa: BLE001
            print(f"[dlrm_mtl] building {ext.name} with OpenMP failed ({e}); trying without")
        ext.extra_compile_args = [a for a in ext.extra_compile_args if a != "-fopenmp"]
        ext.extra_link_args = [a for a in ext.extra_link_args if a != "-fopenmp"]
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"[dlrm_mtl] building {ext.name} failed ({e}); the ATen paths will be used")


setup(
    ext_modules=[Extension("dlrm_mtl._cpu_kernels", ["dlrm_mtl/csrc/cpu_kernels.c"],
                           extra_compile_args=["-O3", "-std=c99", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                                               "-fopenmp"],
                           extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": OptionalBuildExt},
)
