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


def test_installation_id_is_generated_once_and_kept(config):
    import dataclasses

    from provisioner import models

    unset = dataclasses.replace(config, installation_id="")
    first = models.installation_id(unset)
    assert first.startswith("eb-") and models.installation_id(unset) == first
    models.reset()  # emptying the tables between tests keeps it too
    assert models.installation_id(unset) == first
    # A configured one wins.
    assert models.installation_id(config) == config.installation_id != first
