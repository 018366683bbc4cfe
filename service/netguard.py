"""Where webhooks may go: the guard against server-side request forgery (SSRF).

A webhook URL is chosen by the caller, but the POST comes from inside our network, so an
unchecked URL would let any tenant reach Redis, the S3 endpoint, a cloud metadata service
(and its credentials) or anything else only the service can reach. The rules:

- ``https://`` only; ``http://`` only to loopback, and only when the operator turns on
  ``webhook_allow_http_loopback`` (a local receiver in development and tests);
- every address the host resolves to must be public, unless it lies in an
  operator-allowed network (``webhook_allowed_networks``; loopback too when
  ``webhook_allow_http_loopback`` is on); IPv4 hidden in IPv6 (mapped, translated,
  IPv4-compatible, 6to4, Teredo, NAT64) is unwrapped and judged as IPv4. "Public" for
  IPv6 is decided by an explicit rule, not by ``ipaddress.is_global`` alone (which calls
  e.g. ``::1:a9fe:a9fe`` and ``0:0:1::a00:1`` global): the address must be global
  unicast (``2000::/3``, the only range IANA allocates for the public internet) and
  outside the special-purpose blocks inside it (``NON_GLOBAL_IPV6``);
- cloud metadata addresses are refused whatever the operator allows;
- the check runs at submit (a clear 422) and again right before each delivery, and the
  delivery connects to the very address that was checked (``PinnedTarget``): a DNS
  answer that changes in between (DNS rebinding) cannot redirect the POST.

Resolution goes through ``resolve`` so tests can give a host two different answers.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

MAX_URL_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Instance metadata services: refused even inside an allowed network.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
    "169.254.170.2",    # AWS ECS task metadata and credentials
    "169.254.170.23",   # AWS EKS pod identity agent
    "fd00:ec2::254",    # AWS IMDS over IPv6
    "fd00:ec2::23",     # AWS EKS pod identity agent over IPv6
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",      # Oracle Cloud (classic)
))
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT (RFC 2765): ::ffff:0:a.b.c.d
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
# Special-purpose blocks inside 2000::/3 that are not reachable public hosts (IANA IPv6
# Special-Purpose Address Registry). Teredo (2001::/32) and 6to4 (2002::/16) are unwrapped
# to their IPv4 address before this list is consulted.
NON_GLOBAL_IPV6 = tuple(ipaddress.ip_network(n) for n in (
    "2001::/23",      # IETF protocol assignments (benchmarking, ORCHID, ...)
    "2001:db8::/32",  # documentation
    "3fff::/20",      # documentation (RFC 9637)
    "2002::/16",      # 6to4 relays without a valid embedded address
))
_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (system resolver). Replaced in tests."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def embedded_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it stands for one."""
    if addr.version != 6:
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _IPV4_TRANSLATED:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if any(addr in net for net in _NAT64):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if int(addr) >> 32 == 0 and int(addr) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(addr))
    return None


def parse_networks(text: str | None) -> tuple:
    return tuple(ipaddress.ip_network(x.strip(), strict=False) for x in (text or "").split(",") if x.strip())


def _public_ipv6(addr: ipaddress.IPv6Address) -> bool:
    return addr in _GLOBAL_UNICAST and not any(addr in net for net in NON_GLOBAL_IPV6)


@dataclass(frozen=True)
class Policy:
    allow_http_loopback: bool = False
    allowed_networks: tuple = ()

    @classmethod
    def from_settings(cls, settings) -> "Policy":
        return cls(bool(getattr(settings, "webhook_allow_http_loopback", False)),
                   parse_networks(getattr(settings, "webhook_allowed_networks", None)))

    def address_problem(self, addr: IPAddress) -> str | None:
        """Why a webhook may not connect to ``addr``, or None."""
        inner = embedded_ipv4(addr)
        if inner is not None:
            problem = self.address_problem(inner)
            return problem and f"{problem} (as {addr})"
        if addr in METADATA_ADDRESSES:
            return f"{addr} (a cloud metadata address)"
        if self.allow_http_loopback and any(addr in net for net in _LOOPBACK):
            return None
        if any(addr.version == net.version and addr in net for net in self.allowed_networks):
            return None
        if addr.is_global and not addr.is_multicast and (addr.version == 4 or _public_ipv6(addr)):
            return None
        kind = ("loopback" if addr.is_loopback else "link-local" if addr.is_link_local
                else "multicast" if addr.is_multicast else "unspecified" if addr.is_unspecified
                else "private" if addr.is_private else "reserved or non-public")
        return f"{addr} (a {kind} address)"


@dataclass(frozen=True)
class PinnedTarget:
    """A checked URL and the address to connect to. ``url`` has the address in place of
    the host; send ``host_header`` as Host and ``hostname`` as TLS SNI (httpx's
    ``sni_hostname`` extension), so the receiver and certificate checks see the name."""
    url: str
    hostname: str
    host_header: str
    address: str


class WebhookURLError(ValueError):
    """A webhook URL the service will not call. ``unresolved``: its host did not resolve
    (worth retrying at delivery); ``transient``: the resolver itself failed for now."""

    def __init__(self, message: str, unresolved: bool = False, transient: bool = False):
        super().__init__(message)
        self.unresolved, self.transient = unresolved, transient


def check_webhook_url(url: str, policy: Policy, resolver=None) -> PinnedTarget:
    """Resolve and check ``url``; returns where to connect. Raises WebhookURLError."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookURLError(f"must be at most {MAX_URL_LENGTH} characters")
    if any(ord(c) < 0x21 or c == "\x7f" for c in url):
        raise WebhookURLError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise WebhookURLError(f"is not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in ("http", "https") or not host:
        raise WebhookURLError("must be an absolute https:// URL")
    if parts.username is not None or parts.password is not None:
        raise WebhookURLError("must not carry credentials; use webhook.secret to authenticate deliveries")
    if port is None:
        port = 443 if scheme == "https" else 80
    elif port == 0:
        raise WebhookURLError("must not use port 0")
    try:
        literal = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        literal = None
    if literal is not None and "%" in host:
        raise WebhookURLError("must not use an IPv6 zone id")
    if scheme == "http" and not policy.allow_http_loopback:
        raise WebhookURLError("must use https:// (http:// is allowed only for loopback receivers, when the "
                              "operator enables DRMERGE_WEBHOOK_ALLOW_HTTP_LOOPBACK)")
    try:
        addresses = [literal.compressed] if literal is not None else (resolver or resolve)(host, port)
    except UnicodeError:
        raise WebhookURLError(f"host {host!r} is not a valid host name") from None
    except OSError as e:
        transient = isinstance(e, socket.gaierror) and e.errno == socket.EAI_AGAIN
        raise WebhookURLError(f"host {host!r} does not resolve", unresolved=True, transient=transient) from None
    if not addresses:
        raise WebhookURLError(f"host {host!r} does not resolve", unresolved=True)
    checked = []
    for a in addresses:
        addr = ipaddress.ip_address(a.split("%", 1)[0])
        problem = policy.address_problem(addr)
        if problem:
            raise WebhookURLError(f"host {host!r} resolves to {problem}, which this service does not call")
        checked.append(addr)
    if scheme == "http" and not all(any(a in net for net in _LOOPBACK) for a in checked):
        raise WebhookURLError("must use https:// (http:// is allowed only for loopback receivers)")
    pinned = checked[0]
    netloc_ip = f"[{pinned.compressed}]" if pinned.version == 6 else pinned.compressed
    default_port = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
    host_header = host if ":" not in host else f"[{host}]"
    if not default_port:
        host_header += f":{port}"
    pinned_url = urlunsplit((scheme, f"{netloc_ip}:{port}", parts.path or "/", parts.query, ""))
    return PinnedTarget(pinned_url, host, host_header, pinned.compressed)
