#!/bin/bash
# The unprivileged user keepalived runs its check and notify scripts as (script_user in
# /etc/keepalived/keepalived.conf). It must exist in the image, not only from a boot-time
# sysusers run, because the build's config test (`keepalived --config-test`) looks it up.
set -euo pipefail

if ! id keepalived_script >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        --comment "keepalived check and notify scripts" keepalived_script
fi
