#!/bin/sh
# First boot creates the admin user from ADMIN_EMAIL/ADMIN_PASSWORD and keeps
# only a hash of the password under /app/db; later boots ignore both, as the
# real image does, so a restarted or recreated container keeps its admin.
set -eu
: "${SECRET_KEY:?SECRET_KEY is required}"
: "${ALLOWED_HOSTS:?ALLOWED_HOSTS is required}"
mkdir -p /app/db /app/media /app/logs /www/health /tmp
if [ ! -s /app/db/admin ]; then
    : "${ADMIN_EMAIL:?first boot needs ADMIN_EMAIL}"
    : "${ADMIN_PASSWORD:?first boot needs ADMIN_PASSWORD}"
    hash=$(printf '%s' "$ADMIN_PASSWORD" | sha256sum | cut -d' ' -f1)
    printf '%s\n%s\n' "$ADMIN_EMAIL" "$hash" > /app/db/admin.new
    mv /app/db/admin.new /app/db/admin
    echo "$(date -u +%FT%TZ) created admin user $ADMIN_EMAIL" >> /app/logs/boot.log
fi
printf '%s\n' "${SITE_NAME:-eBuilder store}" > /www/index.html
# Uploaded files are served under /media/, as the real image does.
ln -sfn /app/media /www/media
# /app/db/unhealthy (one store) or STANDIN_UNHEALTHY=1 (a whole image) make
# the health check fail on purpose, for the tests of health and upgrade.
if [ -e /app/db/unhealthy ] || [ "${STANDIN_UNHEALTHY:-0}" = 1 ]; then
    rm -f /www/health/index.html
    echo "unhealthy on purpose" >> /app/logs/boot.log
else
    echo ok > /www/health/index.html
fi
echo "$(date -u +%FT%TZ) started for $ALLOWED_HOSTS" >> /app/logs/boot.log
# PID 1 ignores SIGTERM unless it handles it: stop promptly, as a real app does.
httpd -f -p 8000 -h /www &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid"; exit 0' TERM INT
wait "$pid"
