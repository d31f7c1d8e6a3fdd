"""One frozen Settings object from TOML + environment, validated, with every default built in.

Unknown keys and bad values stop the start with a message naming the key and the file: a typo in a
relay's config must never silently fall back to a default (an open relay or a lost queue).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_CONFIG = "RELAY_CONFIG"


class ConfigError(Exception):
    """A configuration problem, always naming the file and the key."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key = source, key
        super().__init__(f"{source}: {key}: {message}")


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsSettings:
    cert: Path
    key: Path
    implicit_listen: HostPort | None = None  # a second listener speaking TLS from the first byte (465)


@dataclass(frozen=True)
class UserSettings:
    """An AUTH user: one source tool (the shop, the logistics platform...)."""

    name: str
    password_hash: str
    source: str
    allowed_senders: tuple[str, ...] = ()  # "@shop.example" (a domain) or "orders@shop.example"; () = any
    max_recipients: int | None = None
    messages_per_minute: int | None = None
    max_sessions: int | None = None

    def sender_allowed(self, address: str) -> bool:
        if not self.allowed_senders:
            return True
        address = address.lower()
        return any(address.endswith(p) if p.startswith("@") else address == p for p in self.allowed_senders)


@dataclass(frozen=True)
class SmtpSettings:
    listen: HostPort = HostPort("127.0.0.1", 2525)
    hostname: str = "relay.localdomain"
    max_message_size: int = 26_214_400
    max_recipients: int = 1000
    max_sessions: int = 200
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    tls: TlsSettings | None = None
    users: tuple[UserSettings, ...] = ()
    proxy_protocol: bool = False  # expect a PROXY v1/v2 header (HAProxy, cloud TCP load balancers)
    proxy_timeout: float = 5.0

    def user(self, name: str) -> UserSettings | None:
        return next((u for u in self.users if u.name == name), None)


@dataclass(frozen=True)
class ReplyRule:
    """Overrides the class of an upstream reply (some providers answer 421 or 550 for a rate limit)."""

    action: str  # sent | defer | fail
    code: int | None = None
    match: re.Pattern[str] | None = None

    def applies(self, code: int, text: str) -> bool:
        if self.code is not None and self.code != code:
            return False
        return self.match is None or bool(self.match.search(text))


@dataclass(frozen=True)
class UpstreamSettings:
    host: str | None = None  # None: outbox delivery to paths.outbox
    port: int = 25
    tls: str = "none"  # none | starttls | implicit
    username: str | None = None
    password: str | None = None
    verify_tls: bool = True
    ca_file: Path | None = None  # CA bundle for a private upstream CA (default: the system's)
    connect_timeout: float = 30.0
    command_timeout: float = 300.0  # RFC 5321 4.5.3.2: MAIL/RCPT 5 minutes
    data_timeout: float = 600.0  # RFC 5321 4.5.3.2.6: 10 minutes for the final dot
    max_connections: int = 10
    idle_timeout: float = 30.0


@dataclass(frozen=True)
class DeliverySettings:
    workers: int = 2
    concurrency: int = 20  # in-flight deliveries per worker
    batch_size: int = 50
    poll_interval: float = 0.5
    retry_base: float = 300.0  # first retry after 5 minutes (Postfix minimal_backoff)
    retry_factor: float = 2.0
    retry_max: float = 4 * 3600.0
    queue_lifetime: float = 5 * 86400.0  # RFC 5321 4.5.4.1: give up after 4-5 days
    lease: float = 60.0  # a claim not renewed for this long is taken as a crashed worker
    max_crashes: int = 3  # claims lost this many times: the recipient is quarantined
    transform_time_limit: float = 2.0
    reply_rules: tuple[ReplyRule, ...] = ()


@dataclass(frozen=True)
class DkimKeySettings:
    domain: str
    selector: str
    key_file: Path


@dataclass(frozen=True)
class RewrapSettings:
    default_skin: str = "default"  # "" = forward unwrapped unless a rule names a skin
    html_budget: int = 102_000  # Gmail clips HTML over ~102 KB, and the unsubscribe link with it
    verify_dkim: bool = True  # check the original signature (before the rewrap breaks it) and log it
    dmarc_strict_domains: tuple[str, ...] = ()  # From domains with p=quarantine|reject and no key here
    dkim: tuple[DkimKeySettings, ...] = ()


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite:///var/relay.db"


@dataclass(frozen=True)
class PathSettings:
    skins: Path = Path("skins")
    rules: Path = Path("rules")
    outbox: Path = Path("var/outbox")
    state: Path = Path("var")
    secret: Path = Path("var/relay.secret")  # HMAC key of unsubscribe tokens; made on first start


@dataclass(frozen=True)
class HttpSettings:
    listen: HostPort | None = HostPort("127.0.0.1", 9101)
    # How customers reach /unsubscribe (List-Unsubscribe links): the public https URL of this listener,
    # e.g. behind a reverse proxy. Default: http://<listen>, fine for tests and a local trial only.
    public_url: str | None = None
    # /admin users (name -> hash from `relay hash-password`); none: the console answers loopback only
    admin_users: tuple[tuple[str, str], ...] = ()

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.listen}").rstrip("/")


@dataclass(frozen=True)
class Settings:
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    rewrap: RewrapSettings = field(default_factory=RewrapSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    source: str = "<built-in defaults>"

    def replace(self, **sections: Any) -> Settings:
        """A copy with some sections changed (tests and the CLI use it)."""
        return dataclasses.replace(self, **sections)


def _parse_hostport(source: str, key: str, value: Any, default_port: int) -> HostPort:
    if not isinstance(value, str) or not value:
        raise ConfigError(source, key, f"expected 'host:port', got {value!r}")
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)|([^:\[\]]+)", value)
    if not m:
        raise ConfigError(source, key, f"expected 'host:port' or '[v6]:port', got {value!r}")
    host = m.group(1) or m.group(3) or m.group(5)
    port = int(m.group(2) or m.group(4) or default_port)
    if not 0 <= port <= 65535:
        raise ConfigError(source, key, f"port {port} out of range")
    return HostPort(host, port)


class _Section:
    """Reads one TOML table, converting and checking each key, then refuses any key left unread."""

    def __init__(self, source: str, name: str, table: Any):
        if not isinstance(table, dict):
            raise ConfigError(source, name, "expected a table")
        self.source, self.name, self.table, self.read = source, name, table, set()

    def key(self, k: str) -> str:
        return f"{self.name}.{k}"

    def get(self, k: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.read.add(k)
        if k not in self.table:
            return default
        v = self.table[k]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
            raise ConfigError(self.source, self.key(k), f"expected {_kind_name(kind)}, got {v!r}")
        return v

    def positive(self, k: str, kind: type, default: Any) -> Any:
        v = self.get(k, kind, default)
        if v <= 0:
            raise ConfigError(self.source, self.key(k), f"must be positive, got {v!r}")
        return v

    def choice(self, k: str, choices: tuple[str, ...], default: str) -> str:
        v = self.get(k, str, default)
        if v not in choices:
            raise ConfigError(self.source, self.key(k), f"must be one of {', '.join(choices)}; got {v!r}")
        return v

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.read)
        if unknown:
            raise ConfigError(self.source, self.key(unknown[0]), "unknown key")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _networks(source: str, key: str, values: list[Any]) -> tuple:
    nets = []
    for v in values:
        try:
            nets.append(ipaddress.ip_network(v, strict=False))
        except (ValueError, TypeError) as e:
            raise ConfigError(source, key, f"not a network: {v!r} ({e})") from None
    return tuple(nets)


def _tls(source: str, table: dict | None, base: Path) -> TlsSettings | None:
    if table is None:
        return None
    t = _Section(source, "smtp.tls", table)
    cert, key = t.get("cert", str, ""), t.get("key", str, "")
    implicit = t.get("implicit_listen", str, "")
    t.done()
    if not cert or not key:
        raise ConfigError(source, "smtp.tls", "needs both cert and key")
    paths = {}
    for k, v in (("cert", cert), ("key", key)):
        paths[k] = (base / v).resolve()
        if not paths[k].is_file():
            raise ConfigError(source, f"smtp.tls.{k}", f"no such file: {paths[k]}")
    listen = _parse_hostport(source, "smtp.tls.implicit_listen", implicit, 465) if implicit else None
    return TlsSettings(cert=paths["cert"], key=paths["key"], implicit_listen=listen)


def _users(source: str, items: list[Any]) -> tuple[UserSettings, ...]:
    users = []
    for i, item in enumerate(items):
        u = _Section(source, f"smtp.users[{i}]", item)
        name = u.get("name", str, "")
        password_hash = u.get("password_hash", str, "")
        senders = u.get("allowed_senders", list, [])
        user = UserSettings(
            name=name,
            password_hash=password_hash,
            source=u.get("source", str, name),
            allowed_senders=tuple(str(x).strip().lower() for x in senders),
            max_recipients=u.positive("max_recipients", int, None) if "max_recipients" in item else None,
            messages_per_minute=u.positive("messages_per_minute", int, None)
            if "messages_per_minute" in item
            else None,
            max_sessions=u.positive("max_sessions", int, None) if "max_sessions" in item else None,
        )
        u.done()
        if not name:
            raise ConfigError(source, u.key("name"), "missing")
        if not password_hash.startswith("scrypt$"):
            raise ConfigError(source, u.key("password_hash"), "expected a hash from `relay hash-password`")
        if any(x.name == name for x in users):
            raise ConfigError(source, u.key("name"), f"user {name!r} defined twice")
        users.append(user)
    return tuple(users)


def _reply_rules(source: str, values: list[Any]) -> tuple[ReplyRule, ...]:
    rules = []
    for i, item in enumerate(values):
        sec = _Section(source, f"delivery.reply_rules[{i}]", item)
        action = sec.choice("action", ("sent", "defer", "fail"), "")
        code = sec.get("code", int, None)
        pattern = sec.get("match", str, None)
        sec.done()
        if code is None and pattern is None:
            raise ConfigError(source, sec.name, "needs 'code' or 'match'")
        try:
            compiled = re.compile(pattern, re.IGNORECASE) if pattern else None
        except re.error as e:
            raise ConfigError(source, sec.key("match"), f"bad regular expression: {e}") from None
        rules.append(ReplyRule(action=action, code=code, match=compiled))
    return tuple(rules)


def from_mapping(data: dict[str, Any], source: str = "<config>", base: Path | None = None) -> Settings:
    """Builds Settings from a parsed TOML document; relative paths resolve against ``base``."""
    base = base or Path.cwd()
    top = _Section(source, "", data)
    top.key = lambda k: k  # type: ignore[method-assign]

    def section(name: str) -> _Section:
        top.read.add(name)
        return _Section(source, name, data.get(name, {}))

    d = Settings()
    s = section("smtp")
    smtp = SmtpSettings(
        listen=_parse_hostport(source, "smtp.listen", s.get("listen", str, str(d.smtp.listen)), 2525),
        hostname=s.get("hostname", str, d.smtp.hostname),
        max_message_size=s.positive("max_message_size", int, d.smtp.max_message_size),
        max_recipients=s.positive("max_recipients", int, d.smtp.max_recipients),
        max_sessions=s.positive("max_sessions", int, d.smtp.max_sessions),
        trusted_networks=_networks(source, "smtp.trusted_networks", s.get("trusted_networks", list, None))
        if "trusted_networks" in s.table
        else d.smtp.trusted_networks,
        command_timeout=s.positive("command_timeout", float, d.smtp.command_timeout),
        data_timeout=s.positive("data_timeout", float, d.smtp.data_timeout),
        tls=_tls(source, s.get("tls", dict, None), base),
        users=_users(source, s.get("users", list, [])),
        proxy_protocol=s.get("proxy_protocol", bool, False),
        proxy_timeout=s.positive("proxy_timeout", float, d.smtp.proxy_timeout),
    )
    s.done()

    u = section("upstream")
    upstream = UpstreamSettings(
        host=u.get("host", str, None) or None,
        port=u.get("port", int, d.upstream.port),
        tls=u.choice("tls", ("none", "starttls", "implicit"), d.upstream.tls),
        username=u.get("username", str, None),
        password=u.get("password", str, None),
        verify_tls=u.get("verify_tls", bool, True),
        ca_file=(base / u.get("ca_file", str, "")).resolve() if u.table.get("ca_file") else None,
        connect_timeout=u.positive("connect_timeout", float, d.upstream.connect_timeout),
        command_timeout=u.positive("command_timeout", float, d.upstream.command_timeout),
        data_timeout=u.positive("data_timeout", float, d.upstream.data_timeout),
        max_connections=u.positive("max_connections", int, d.upstream.max_connections),
        idle_timeout=u.positive("idle_timeout", float, d.upstream.idle_timeout),
    )
    if not 0 < upstream.port <= 65535:
        raise ConfigError(source, "upstream.port", f"port {upstream.port} out of range")
    if (upstream.username is None) != (upstream.password is None):
        raise ConfigError(source, "upstream.username", "username and password go together")
    u.done()

    dl = section("delivery")
    delivery = DeliverySettings(
        workers=dl.get("workers", int, d.delivery.workers),
        concurrency=dl.positive("concurrency", int, d.delivery.concurrency),
        batch_size=dl.positive("batch_size", int, d.delivery.batch_size),
        poll_interval=dl.positive("poll_interval", float, d.delivery.poll_interval),
        retry_base=dl.positive("retry_base", float, d.delivery.retry_base),
        retry_factor=dl.positive("retry_factor", float, d.delivery.retry_factor),
        retry_max=dl.positive("retry_max", float, d.delivery.retry_max),
        queue_lifetime=dl.positive("queue_lifetime", float, d.delivery.queue_lifetime),
        lease=dl.positive("lease", float, d.delivery.lease),
        max_crashes=dl.positive("max_crashes", int, d.delivery.max_crashes),
        transform_time_limit=dl.positive("transform_time_limit", float, d.delivery.transform_time_limit),
        reply_rules=_reply_rules(source, dl.get("reply_rules", list, [])),
    )
    if delivery.workers < 0:
        raise ConfigError(source, "delivery.workers", "must be 0 (in-process) or more")
    dl.done()

    rw = section("rewrap")
    keys = []
    for i, item in enumerate(rw.get("dkim", list, [])):
        k = _Section(source, f"rewrap.dkim[{i}]", item)
        domain = k.get("domain", str, "").strip().lower()
        selector = k.get("selector", str, "").strip()
        key_file = k.get("key_file", str, "")
        k.done()
        if not (domain and selector and key_file):
            raise ConfigError(source, k.name, "needs domain, selector and key_file")
        keys.append(DkimKeySettings(domain, selector, (base / key_file).resolve()))
    strict = rw.get("dmarc_strict_domains", list, [])
    if not all(isinstance(d, str) for d in strict):
        raise ConfigError(source, "rewrap.dmarc_strict_domains", "expected a list of domain names")
    rewrap = RewrapSettings(
        default_skin=rw.get("default_skin", str, d.rewrap.default_skin),
        html_budget=rw.positive("html_budget", int, d.rewrap.html_budget),
        verify_dkim=rw.get("verify_dkim", bool, d.rewrap.verify_dkim),
        dmarc_strict_domains=tuple(x.strip().lower() for x in strict),
        dkim=tuple(keys),
    )
    rw.done()

    db = section("database")
    url = db.get("url", str, d.database.url)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        url = "sqlite:///" + str((base / url[len("sqlite:///") :]).resolve())
    database = DatabaseSettings(url=url)
    db.done()

    p = section("paths")

    def path(k: str, default: Path) -> Path:
        return (base / p.get(k, str, str(default))).resolve()

    paths = PathSettings(
        skins=path("skins", d.paths.skins),
        rules=path("rules", d.paths.rules),
        outbox=path("outbox", d.paths.outbox),
        state=path("state", d.paths.state),
        secret=path("secret", d.paths.secret),
    )
    p.done()

    h = section("http")
    listen = h.get("listen", str, str(d.http.listen))
    public_url = h.get("public_url", str, None)
    if public_url is not None and not re.match(r"https?://[^/\s]+", public_url):
        raise ConfigError(source, "http.public_url", f"expected an http(s) URL, got {public_url!r}")
    admins = h.get("admin_users", dict, {})
    for name, value in admins.items():
        if not isinstance(value, str) or not value.startswith("scrypt$"):
            raise ConfigError(
                source, f"http.admin_users.{name}", "expected a hash from `relay hash-password`"
            )
    http = HttpSettings(
        listen=_parse_hostport(source, "http.listen", listen, 9101) if listen else None,
        public_url=public_url,
        admin_users=tuple(admins.items()),
    )
    h.done()

    top.done()
    return Settings(
        smtp=smtp,
        upstream=upstream,
        delivery=delivery,
        rewrap=rewrap,
        database=database,
        paths=paths,
        http=http,
        source=source,
    )


def read_dkim_keys(settings: Settings) -> list[tuple[DkimKeySettings, bytes]]:
    """Each signing key's settings with its PEM. Read at start too, so a missing file stops the start
    (naming the key), not the first signing."""
    out = []
    for i, k in enumerate(settings.rewrap.dkim):
        try:
            out.append((k, Path(k.key_file).read_bytes()))
        except OSError as e:
            raise ConfigError(
                settings.source, f"rewrap.dkim[{i}].key_file", f"{k.key_file}: {e.strerror}"
            ) from None
    return out


def load(path: str | os.PathLike[str] | None = None) -> Settings:
    """``--config FILE``, else ``$RELAY_CONFIG``, else the built-in defaults (relative to the cwd)."""
    path = path or os.environ.get(ENV_CONFIG) or None
    if path is None:
        return from_mapping({}, "<built-in defaults>", Path.cwd())
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(file), "-", f"cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(file), "-", f"invalid TOML: {e}") from None
    return from_mapping(data, str(file), file.resolve().parent)
