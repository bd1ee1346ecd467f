#!/bin/bash
# Boot configuration, in place before the initramfs and the firmware files are made.
set -euo pipefail
root=$1

install -D -m 0644 files/initramfs.conf "$root/etc/initramfs-tools/conf.d/okome.conf"
install -D -m 0644 files/initramfs-modules "$root/usr/share/initramfs-tools/modules.d/okome"

# raspi-firmware writes cmdline.txt from this file. Its defaults probe the machine it runs on
# (the build host's root device and consoles), so every value is given. CMA=0: headless nodes
# need no video memory, and the 64M default does not boot a Raspberry Pi 4.
cat > "$root/etc/default/raspi-firmware" <<CONFIG
ROOTPART=PARTUUID=$OKOME_ROOT_PARTUUID
CONSOLES="tty0 ttyS1,115200"
CMA=0
KERNEL=auto
INITRAMFS=auto
CONFIG
