"""Install into the zoo's virtual environment (benchmarks/zoo_results.md), not into normswap:

    SITE=$(/work/venv-zoo/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cp benchmarks/torchvision_cpu_shim.py "$SITE"/ && echo "import torchvision_cpu_shim" > "$SITE"/torchvision_cpu_shim.pth

Why (not part of torchvision): PyPI's torchvision 0.28.0 wheel is linked against the
CUDA build of torch 2.13.0, so its C++ ops (_C.so: nms, roi_align, ...) cannot load with
torch 2.13.0+cpu, and `import torchvision` then fails in _meta_registrations at
`register_fake("torchvision::nms")` ("operator torchvision::nms does not exist").  The models
(resnet, mobilenet, ...) need none of those ops.  When _C.so does not load, this shim declares the
schemas of the two ops that torchvision registers fake kernels for (nms, qnms) just before
torchvision is imported; calling them still raises (no kernel).  Loaded by torchvision_cpu_shim.pth
lazily: torch is imported only when torchvision is."""
import importlib.abc
import importlib.util
import os
import sys


class _Finder(importlib.abc.MetaPathFinder):
    done = False

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision" or _Finder.done:
            return None
        _Finder.done = True
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            return spec
        import torch

        lib = os.path.join(list(spec.submodule_search_locations)[0], "_C.so")
        try:
            torch.ops.load_library(lib)
        except OSError:
            defs = torch.library.Library("torchvision", "DEF")
            defs.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            defs.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _Finder.keep = defs
        return spec


sys.meta_path.insert(0, _Finder())
