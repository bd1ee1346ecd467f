#!/bin/bash
# The administrators' account: key-only login (keys arrive with the node's identity), sudo.
set -euo pipefail

if ! id "$OKOME_ADMIN_USER" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash --groups sudo "$OKOME_ADMIN_USER"
fi
# No password at all: SSH keys are the only way in.
passwd --lock "$OKOME_ADMIN_USER" >/dev/null
