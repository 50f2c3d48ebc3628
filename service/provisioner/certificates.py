"""Certificates for customers' own domains, from an ACME server (HTTP-01), through the
`acme` library (certbot's).

The account key is made once and kept under the data dir (0600). During an order the
key authorization of each HTTP-01 challenge is a file under the data dir, which the web
service answers `/.well-known/acme-challenge/<token>` from (web/domains.py) and every
nginx host passes those requests to (role nginx_site): any process of this installation
can answer, whichever nginx host the CA reaches. A certificate and its key are written
as `<data dir>/certificates/<name>/<name>.<serial>.{crt,key}` (dir 0700, key 0600):
a renewal gets new file names, so the vhost that names them changes and nginx reloads.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from provisioner.config import Config

USER_AGENT = "ebuilder-provisioner"
ORDER_TIMEOUT = datetime.timedelta(minutes=3)
NETWORK_TIMEOUT = 30
# What an ACME server may call a token (RFC 8555: base64url); nothing else is looked up.
TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")


class IssueFailed(Exception):
    """The ACME server would not issue (validation failed, refused, unreachable)."""


@dataclass(frozen=True)
class Issued:
    cert_path: str
    key_path: str
    expires_at: datetime.datetime  # naive UTC, as the models keep times
    serial: str


def acme_dir(config: Config) -> Path:
    return config.data_dir / "acme"


def challenge_dir(config: Config) -> Path:
    return acme_dir(config) / "challenges"


def certificates_dir(config: Config) -> Path:
    return config.data_dir / "certificates"


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Written whole under a temporary name with its mode from the start, then renamed."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def account_key(config: Config) -> jose.JWKRSA:
    """The ACME account's key: made once, kept 0600 under the data dir, never shown."""
    path = _private_dir(acme_dir(config)) / "account-key.pem"
    if not path.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return jose.JWKRSA(key=key)


def _client(config: Config) -> client.ClientV2:
    """A client logged in to our account (registered the first time, found after)."""
    net = client.ClientNetwork(account_key(config), user_agent=USER_AGENT,
                               timeout=NETWORK_TIMEOUT,
                               # requests takes a CA bundle's path where a bool goes.
                               verify_ssl=config.acme_ca_bundle or True)  # type: ignore[arg-type]
    directory = client.ClientV2.get_directory(config.acme_directory_url, net)
    acme = client.ClientV2(directory, net)
    registration = messages.NewRegistration.from_data(
        email=config.acme_email or None, terms_of_service_agreed=True)
    try:
        acme.new_account(registration)
    except errors.ConflictError as exc:  # the key has an account already: use it
        net.account = messages.RegistrationResource(uri=exc.location,
                                                    body=messages.Registration())
    return acme


def challenge_answer(config: Config, token: str) -> str | None:
    """The key authorization for a token of an order in progress, or None."""
    if not TOKEN.fullmatch(token):
        return None
    try:
        return (challenge_dir(config) / token).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _problems(exc: errors.ValidationError) -> str:
    said = []
    for authz in exc.failed_authzrs:
        for challb in authz.body.challenges:
            if challb.error is not None:
                said.append(f"{authz.body.identifier.value}: {challb.error.detail or challb.error}")
    return "; ".join(said) or str(exc)


def issue(config: Config, name: str) -> Issued:
    """A certificate for `name` (already checked: DNS points here, the vhost passes the
    challenge path on), by HTTP-01. Raises IssueFailed with the CA's words."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    csr = crypto_util.make_csr(key_pem, [name])
    answered: list[Path] = []
    try:
        acme = _client(config)
        order = acme.new_order(csr)
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue
            challenge = next((c for c in authz.body.challenges
                              if isinstance(c.chall, challenges.HTTP01)), None)
            if challenge is None:
                raise IssueFailed(f"the ACME server offers no HTTP-01 challenge for {name}")
            response, validation = challenge.response_and_validation(acme.net.key)
            token = challenge.chall.encode("token")
            if not TOKEN.fullmatch(token):
                raise IssueFailed("the ACME server sent a malformed challenge token")
            path = _private_dir(challenge_dir(config)) / token
            _write_private(path, validation.encode(), mode=0o644)
            answered.append(path)
            acme.answer_challenge(challenge, response)
        deadline = datetime.datetime.now() + ORDER_TIMEOUT
        order = acme.poll_and_finalize(order, deadline)
    except errors.ValidationError as exc:
        raise IssueFailed(f"the ACME server could not validate {name}: {_problems(exc)}") \
            from None
    except errors.TimeoutError:
        raise IssueFailed(f"the ACME server did not finish the order for {name} within "
                          f"{ORDER_TIMEOUT.seconds} s") from None
    except (errors.Error, messages.Error) as exc:
        raise IssueFailed(f"the ACME server refused {name}: {exc}") from None
    except OSError as exc:  # requests' connection errors are OSErrors
        raise IssueFailed(f"the ACME server could not be reached: {type(exc).__name__}: "
                          f"{exc}") from None
    finally:
        for path in answered:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return _store(config, name, order.fullchain_pem.encode(), key_pem)


def _store(config: Config, name: str, chain_pem: bytes, key_pem: bytes) -> Issued:
    leaf = x509.load_pem_x509_certificate(chain_pem)
    serial = f"{leaf.serial_number:x}"
    where = _private_dir(_private_dir(certificates_dir(config)) / name)
    key_path, cert_path = where / f"{name}.{serial}.key", where / f"{name}.{serial}.crt"
    _write_private(key_path, key_pem)
    _write_private(cert_path, chain_pem, mode=0o644)
    return Issued(str(cert_path), str(key_path), expires_of(chain_pem), serial)


def expires_of(chain_pem: bytes) -> datetime.datetime:
    """When the chain's first certificate (the leaf) expires, naive UTC."""
    leaf = x509.load_pem_x509_certificate(chain_pem)
    return leaf.not_valid_after_utc.replace(tzinfo=None)


def remove_files(config: Config, *paths: str | None) -> None:
    """Delete certificate and key files, only ever under our certificates dir."""
    root = certificates_dir(config).resolve()
    for raw in paths:
        if not raw:
            continue
        path = Path(raw).resolve()
        if root in path.parents:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def remove_name(config: Config, name: str) -> None:
    """Every certificate and key of `name`."""
    where = certificates_dir(config) / name
    if where.resolve().parent == certificates_dir(config).resolve() and where.is_dir():
        shutil.rmtree(where)
