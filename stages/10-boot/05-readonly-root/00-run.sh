#!/bin/bash
# The read-only root option (docs/hardening.md). Every image's initramfs holds the scripts; they
# act only when the kernel command line says okome.readonly=1, which images with read_only_root
# get in cmdline.txt. Runs before the initramfs and cmdline.txt are made (10-boot/90-initramfs).
set -euo pipefail
root=$1
initramfs=$root/etc/initramfs-tools

install -D -m 0755 files/initramfs-hook "$initramfs/hooks/okome-readonly-root"
install -D -m 0755 files/local-top "$initramfs/scripts/local-top/okome-readonly-root"
install -D -m 0755 files/local-bottom "$initramfs/scripts/local-bottom/okome-readonly-root"

# raspi-firmware appends this file to the command line it writes into cmdline.txt.
if [[ ${OKOME_READ_ONLY_ROOT:-no} == yes ]]; then
    install -d "$root/etc/default"
    echo "okome.readonly=1" > "$root/etc/default/raspi-extra-cmdline"
fi
