import pytest
from pony.orm import db_session

from provisioner import subdomains
from provisioner.models import Instance


@pytest.mark.parametrize("name", ["janes-shop", "abc", "a1b2", "x" * 63, "shop-2024"])
def test_valid_names(name):
    assert subdomains.validate_format(name) == name


@pytest.mark.parametrize("name, reason", [
    ("", "required"),
    ("ab", "at least 3"),
    ("x" * 64, "at most 63"),
    ("a;b", "only a-z"),
    ("a\nb", "only a-z"),
    ("..", "at least 3"),
    ("...", "only a-z"),
    ("a.b.c", "only a-z"),
    ("-abc", "only a-z"),
    ("abc-", "only a-z"),
    ("bücher", "only a-z"),
    ("shop_1", "only a-z"),
    ("xn--bcher-kva", "3rd and 4th"),
    ("www", "reserved"),
    ("admin", "reserved"),
    ("provisioner", "reserved"),
    ("a b c", "only a-z"),
    ("$(id)", "only a-z"),
])
def test_invalid_names_say_why(name, reason):
    with pytest.raises(subdomains.InvalidSubdomain, match=reason):
        subdomains.validate_format(name)


def test_normalise_lowercases_and_rejects_non_strings():
    assert subdomains.normalise("  Janes-Shop ") == "janes-shop"
    with pytest.raises(subdomains.InvalidSubdomain):
        subdomains.normalise(42)


def test_taken_only_among_live_stores(config):
    with db_session:
        Instance(subdomain="janes-shop", site_name="J", admin_email="j@e.com", port=19100,
                 live=False)
        assert subdomains.check_available("janes-shop") == "janes-shop"
        Instance(subdomain="janes-shop", site_name="J", admin_email="j@e.com", port=19101)
        with pytest.raises(subdomains.SubdomainTaken):
            subdomains.check_available("janes-shop")
