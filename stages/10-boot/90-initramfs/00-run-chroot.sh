#!/bin/bash
# The one initramfs of the image, built after every substage that adds to it (05-readonly-root).
# raspi-firmware's hook then copies the kernel, the initramfs and the device trees to
# /boot/firmware and writes config.txt and cmdline.txt.
set -euo pipefail

update-initramfs -c -k all
