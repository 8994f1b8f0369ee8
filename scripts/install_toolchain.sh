#!/usr/bin/env bash
# Installs the Debian packages the project needs when they are missing:
# python3-venv (for .venv) and the Cortex-M toolchain + emulator.
# As root it installs them; otherwise it prints the exact command and goes on.
set -euo pipefail

missing=()
python3 -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
command -v arm-none-eabi-gcc >/dev/null || missing+=(gcc-arm-none-eabi)
if ! command -v arm-none-eabi-gcc >/dev/null || [ ! -f "$(arm-none-eabi-gcc -print-file-name=libc_nano.a 2>/dev/null)" ]; then
    missing+=(libnewlib-arm-none-eabi libnewlib-dev)
fi
command -v qemu-system-arm >/dev/null || missing+=(qemu-system-arm)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
cmd="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "tvm-tinytrain: missing Debian packages: ${missing[*]}" >&2
    echo "  install them with: sudo sh -c '$cmd'" >&2
fi
