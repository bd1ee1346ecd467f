#!/bin/sh
# mmdebstrap customize hook: everything is installed; give update-initramfs back.
set -eu
root=$1

rm "$root/usr/sbin/update-initramfs"
chroot "$root" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs
