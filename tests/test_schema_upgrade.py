"""A database made by an older version gains the columns added since, keeping its rows."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys

from provisioner.models import ADDED_COLUMNS


def provisioner(data_dir, *args) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PROVISIONER_DATA_DIR": str(data_dir),
           "STRIPE_WEBHOOK_SECRET": "whsec_x", "BASE_DOMAIN": "x.test",
           "PROVISIONER_ENV_FILE": str(data_dir / "none.env")}
    return subprocess.run([sys.executable, "-m", "provisioner.cli", *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_an_older_database_gains_the_new_columns_and_keeps_its_rows(tmp_path):
    assert provisioner(tmp_path, "stats").returncode == 0
    path = tmp_path / "provisioner.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute('INSERT INTO "Subscription" ("stripe_id", "status", "payment_confirmed", '
                   '"created_at", "updated_at") VALUES (\'sub_old\', \'active\', 1, '
                   'datetime(\'now\'), datetime(\'now\'))')
        db.execute('DROP INDEX IF EXISTS "stripeevent_customer"')
        for table, column, _, _ in ADDED_COLUMNS:  # as the previous version made them
            db.execute(f'ALTER TABLE "{table}" DROP COLUMN "{column}"')
        db.commit()

    upgraded = provisioner(tmp_path, "stats", "--json")
    assert upgraded.returncode == 0, upgraded.stderr
    assert '"paying_subscriptions": 1' in upgraded.stdout
    assert "added column Instance.plan_price_id" in upgraded.stderr
    with contextlib.closing(sqlite3.connect(path)) as db:
        for table, column, _, _ in ADDED_COLUMNS:
            names = {row[1] for row in db.execute(f'PRAGMA table_info("{table}")')}
            assert column in names, (table, column)
    again = provisioner(tmp_path, "stats")
    assert again.returncode == 0 and "added column" not in again.stderr
