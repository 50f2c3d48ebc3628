import subprocess
import sys

import pytest

from provisioner.config import ConfigError, load_config

BASE = {"STRIPE_WEBHOOK_SECRET": "whsec_abc", "BASE_DOMAIN": "Stores.Example.com"}


def load(tmp_path, **env):
    return load_config({**BASE, **env}, env_file=tmp_path / ".env")


def test_defaults_and_normalisation(tmp_path):
    config = load(tmp_path, PROVISIONER_DATA_DIR=str(tmp_path))
    assert config.base_domain == "stores.example.com"
    assert (config.port_range_start, config.port_range_end) == (9000, 9999)
    assert config.database_path == tmp_path / "provisioner.sqlite3"
    assert config.store_url("janes-shop") == "https://janes-shop.stores.example.com/"
    assert load(tmp_path, NGINX_HTTPS_LISTEN="127.0.0.1:8443").store_url("a1b") == \
        "https://a1b.stores.example.com:8443/"


def test_env_file_is_read_and_environment_wins(tmp_path):
    (tmp_path / ".env").write_text('# comment\nexport EMAIL_PORT=2525\nEBUILDER_IMAGE="img:1"\n')
    config = load(tmp_path, EBUILDER_IMAGE="img:2")
    assert (config.email_port, config.ebuilder_image) == (2525, "img:2")


@pytest.mark.parametrize("env, name", [
    ({"BASE_DOMAIN": ""}, "BASE_DOMAIN"),
    ({"STRIPE_WEBHOOK_SECRET": ""}, "STRIPE_WEBHOOK_SECRET"),
    ({"STRIPE_WEBHOOK_SECRET": "nope"}, "STRIPE_WEBHOOK_SECRET"),
    ({"STRIPE_SECRET_KEY": "pk_live_x"}, "STRIPE_SECRET_KEY"),
    ({"PORT_RANGE_START": "abc"}, "PORT_RANGE_START"),
    ({"PORT_RANGE_START": "9500", "PORT_RANGE_END": "9400"}, "PORT_RANGE_END"),
    ({"EMAIL_USE_TLS": "maybe"}, "EMAIL_USE_TLS"),
    ({"INSTALLATION_ID": "Has Spaces"}, "INSTALLATION_ID"),
    ({"INSTALLATION_ID": "{{ 7*7 }}"}, "INSTALLATION_ID"),
    ({"TRUSTED_PROXIES": "10.0.0.1, not-an-ip"}, "TRUSTED_PROXIES"),
])
def test_bad_settings_name_themselves(tmp_path, env, name):
    with pytest.raises(ConfigError, match=name):
        load(tmp_path, **env)


def test_serve_stops_with_one_line_naming_the_setting(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "provisioner.cli", "serve"], capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "BASE_DOMAIN": "x.test",
             "PROVISIONER_ENV_FILE": str(tmp_path / ".env")}, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "provisioner: configuration error: STRIPE_WEBHOOK_SECRET is required but not set"]


def test_security_settings(tmp_path):
    config = load(tmp_path, INSTALLATION_ID="prod-eu1", TRUSTED_PROXIES="10.0.0.1, 192.168.0.0/24")
    assert config.installation_id == "prod-eu1"
    assert config.trusted_proxies == ("10.0.0.1/32", "192.168.0.0/24")


def test_installation_id_is_kept_and_a_different_one_refused(config):
    import dataclasses

    from provisioner import models

    # The test database took INSTALLATION_ID on first use; unset, it is still that one.
    unset = dataclasses.replace(config, installation_id="")
    assert models.installation_id(unset) == config.installation_id
    models.reset()  # emptying the tables between tests keeps it
    assert models.installation_id(config) == config.installation_id
    with pytest.raises(ConfigError, match="belongs to installation"):
        models.installation_id(dataclasses.replace(config, installation_id="someone-else"))


def test_readme_settings_table_is_the_settings_table():
    import dataclasses
    from pathlib import Path

    from provisioner.config import Config
    from provisioner.settings import SETTINGS, settings_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("| setting | default | meaning |")
    end = readme.index("<!-- /settings -->")
    assert readme[start:end] == settings_table()
    # One row per Config field that a variable sets; each variable once.
    fields = {f.name for f in dataclasses.fields(Config)} - {
        "project_dir", "worker_poll_seconds"}
    assert {s.field for s in SETTINGS} == fields
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)


def test_readme_and_architecture_list_every_module():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    package = root / "service" / "provisioner"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py")
               if p.name != "__init__.py" and "testing" not in p.parts}
    modules.add("web/__init__.py")
    for doc in (root / "README.md", root / "docs" / "architecture.md"):
        text = doc.read_text()
        missing = sorted(m for m in modules if f"`{m}`" not in text)
        assert not missing, f"{doc.name} does not list {missing}"


def test_settings_command_prints_the_table_and_checks(tmp_path):
    from provisioner.settings import settings_table

    env = {"PATH": "/usr/bin:/bin", "PROVISIONER_ENV_FILE": str(tmp_path / ".env")}
    printed = subprocess.run([sys.executable, "-m", "provisioner.cli", "settings"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert printed.returncode == 0 and printed.stdout == settings_table()
    (tmp_path / ".env").write_text("STRIPE_WEBHOOK_SECRET=whsec_x\nBASE_DOMAIN=x.test\n"
                                   "TRUSTED_PROXIES=not-an-address\n")
    checked = subprocess.run([sys.executable, "-m", "provisioner.cli", "settings", "--check"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert checked.returncode == 2
    assert checked.stderr.strip().splitlines() == [
        "provisioner: configuration error: TRUSTED_PROXIES: 'not-an-address' is not an IP "
        "address or network"]



def test_a_database_url_of_another_kind_is_refused_without_its_password(base_env, tmp_path):
    env = {**base_env, "PROVISIONER_ENV_FILE": str(tmp_path / "none.env"),
           "DATABASE_URL": "mysql://shop:hunter2@db/shop"}
    # Start-up in a process of its own (this one's database is bound already).
    done = subprocess.run([sys.executable, "-m", "provisioner.cli", "stats"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0
    assert "mysql://..." in done.stderr and "hunter2" not in done.stderr + done.stdout
