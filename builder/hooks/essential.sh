#!/bin/sh
# mmdebstrap essential hook: runs once the essential packages are in, before the rest.
# Holds update-initramfs back while packages install: the kernel, initramfs-tools and
# raspi-firmware would each build an initramfs under emulation, and before the image's boot
# configuration is in place. Stage 10-boot builds the one initramfs the image ships.
set -eu
root=$1

chroot "$root" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs
printf '#!/bin/sh\n# held back while okome-image installs packages\nexit 0\n' \
    > "$root/usr/sbin/update-initramfs"
chmod 755 "$root/usr/sbin/update-initramfs"
