#!/bin/sh
# POST /cgi-bin/login with body "email=<e>&password=<p>": 200 when they match
# the admin created on first boot, 403 otherwise. Lets tests prove the
# welcome email's login details work.
body=$(head -c "${CONTENT_LENGTH:-0}")
email=$(printf '%s' "$body" | tr '&' '\n' | sed -n 's/^email=//p' | sed 's/%40/@/g')
password=$(printf '%s' "$body" | tr '&' '\n' | sed -n 's/^password=//p')
want_email=$(sed -n 1p /app/db/admin)
want_hash=$(sed -n 2p /app/db/admin)
got_hash=$(printf '%s' "$password" | sha256sum | cut -d' ' -f1)
if [ -n "$password" ] && [ "$email" = "$want_email" ] && [ "$got_hash" = "$want_hash" ]; then
    printf 'Status: 200 OK\r\nContent-Type: text/plain\r\n\r\nwelcome\n'
else
    printf 'Status: 403 Forbidden\r\nContent-Type: text/plain\r\n\r\ndenied\n'
fi
