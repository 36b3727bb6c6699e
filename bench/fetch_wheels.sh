#!/usr/bin/env bash
# Download the wheels that bench/gpu_run.sh installs on the GPU machine (Python 3.12, x86_64, no network there):
# transformers 5.23.0, bitsandbytes 0.50.2 and torchao 0.18.0 (pure-Python / py3 / abi3 wheels), and regex for
# CPython 3.12, which transformers 5.23 requires at >= 2025.10.22. About 58 MiB in all (the device machine carries
# at most 64); bench/wheels/ is gitignored, never commit it.
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-pip}"
mkdir -p wheels
# bitsandbytes 0.50.2 and torchao 0.18.0 are tagged manylinux_2_24, which --platform filters miss: download them as
# for this machine (torchao's is abi3, for every CPython from 3.10).
"$PIP" download -q --no-deps transformers==5.23.0 bitsandbytes==0.50.2 torchao==0.18.0 -d wheels
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    regex==2026.11.19 -d wheels
ls -l wheels
du -sh wheels
