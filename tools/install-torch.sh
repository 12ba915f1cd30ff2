#!/bin/sh
# Install torch and torchvision into the environment of the pip given ($1), before the project
# (which then keeps them): `make setup` runs it.
#
#   TORCH=auto  (default) torch's CPU build on Linux where no NVIDIA GPU is seen, else PyPI's
#   TORCH=cpu   torch's CPU build, from $TORCH_CPU_INDEX
#   TORCH=cuda  PyPI's build: on Linux it brings the CUDA libraries (gigabytes)
#
# PyPI's Linux wheels of torch depend on CUDA's, which a machine without an NVIDIA GPU never
# uses. The CPU build lives on torch's own package index; where that index cannot be reached
# (a machine that reaches only PyPI or a mirror of it), this says so in one line and leaves
# torch to the project's install, from the default index: setup never fails for it.
set -u
pip=$1
choice=${TORCH:-auto}
index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
constraints=${TORCH_CONSTRAINTS:-constraints.txt}

has_nvidia_gpu() {
    [ -e /proc/driver/nvidia/version ] || command -v nvidia-smi >/dev/null 2>&1
}

case $choice in
    auto)
        if [ "$(uname -s)" = Linux ] && ! has_nvidia_gpu; then choice=cpu; else choice=cuda; fi ;;
    cpu | cuda) ;;
    *)
        echo "setup: TORCH=$choice is no choice: auto, cpu or cuda" >&2
        exit 2 ;;
esac
if [ "$choice" = cuda ]; then
    exit 0  # the project's install takes PyPI's torch
fi
python=$(dirname "$pip")/python
# One quick look first: pip would retry an unreachable index for minutes.
if "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=20)' "$index" 2>/dev/null \
    && "$pip" install -q -c "$constraints" --index-url "$index" torch torchvision; then
    echo "setup: torch's CPU build, from $index (TORCH=cuda for PyPI's, with CUDA)"
else
    echo "setup: torch's CPU index $index cannot be reached (or has no torch for these constraints): PyPI's torch instead, with its CUDA libraries (about 6 GB of environment, not 1.6; TORCH=cuda skips this try)"
fi
exit 0
