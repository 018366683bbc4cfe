"""Webhook SSRF guard (service.netguard): which addresses a webhook may reach, checked
at submit (and again at delivery, connecting to the address that was checked:
tests/integration/test_netguard.py). There is no DNS here, so a test that needs a host
name to resolve gives the resolver its answers.
"""

from __future__ import annotations

import ipaddress

import pytest

from service.netguard import Policy, WebhookURLError, check_webhook_url, embedded_ipv4
from service.settings import Settings
from service.webhooks import check_url

PUBLIC = "93.184.215.14"


def answer(*addresses):
    calls = []

    def resolver(host, port):
        calls.append((host, port))
        return list(addresses)

    resolver.calls = calls
    return resolver


STRICT = Policy()
LOOPBACK_OK = Policy(allow_http_loopback=True)


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1", "fe80::1",
    "fc00::1", "fd12:3456::1", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255", "100.64.0.1",
    "192.0.2.1", "198.18.0.1", "240.0.0.1",
    # cloud metadata services
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192",
    # IPv4 dressed as IPv6: mapped, IPv4-compatible, 6to4, NAT64
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::7f00:1", "2002:7f00:1::1", "64:ff9b::a00:1",
    "64:ff9b::a9fe:a9fe",
    # IPv4-translated (::ffff:0:a.b.c.d) and other ::/8 forms ipaddress calls global
    "::ffff:0:7f00:1", "::ffff:0:a9fe:a9fe", "::1:a9fe:a9fe", "0:0:1::a00:1", "::2:7f00:1",
    # outside 2000::/3, or special-purpose inside it
    "4000::1", "5f00::1", "2001:2::1", "2001:10::1", "2001:20::1", "2001:db8::1", "3fff::1", "100::1",
])
def test_non_public_addresses_are_refused(address):
    with pytest.raises(WebhookURLError, match="does not call"):
        check_webhook_url("https://hooks.example.com/h", STRICT, answer(address))


def test_public_ipv6_addresses_are_accepted():
    for address in ("2606:4700:4700::1111", "2a00:1450:4001:81c::200e", "2001:4860:4860::8888"):
        assert check_webhook_url("https://hooks.example.com/h", STRICT, answer(address)).address == address


def test_public_addresses_are_accepted_and_pinned():
    resolver = answer(PUBLIC)
    target = check_webhook_url("https://Hooks.Example.com/h?x=1#frag", STRICT, resolver)
    assert resolver.calls == [("hooks.example.com", 443)]
    assert target.url == f"https://{PUBLIC}:443/h?x=1" and target.address == PUBLIC
    assert target.hostname == "hooks.example.com" and target.host_header == "hooks.example.com"
    v6 = check_webhook_url("https://hooks.example.com:8443/", STRICT, answer("2606:4700::1111"))
    assert v6.url == "https://[2606:4700::1111]:8443/" and v6.host_header == "hooks.example.com:8443"
    assert embedded_ipv4(ipaddress.ip_address("2002:0808:0808::1")) == ipaddress.ip_address("8.8.8.8")
    assert check_webhook_url("https://hooks.example.com/", STRICT, answer("2002:808:808::1")).address


def test_one_bad_address_among_good_ones_is_enough_to_refuse():
    with pytest.raises(WebhookURLError, match="10.0.0.7"):
        check_webhook_url("https://hooks.example.com/h", STRICT, answer(PUBLIC, "10.0.0.7"))


@pytest.mark.parametrize("url", [
    # the system resolver reads all of these as 127.0.0.1 (or this host)
    "https://localhost/h", "https://127.1/h", "https://2130706433/h", "https://0x7f.0.0.1/h", "https://0177.0.0.1/h",
    "https://[::ffff:127.0.0.1]/h", "https://[::1]/h", "https://0.0.0.0/h", "https://[::]:8443/h",
    "https://169.254.169.254/latest/meta-data/", "https://[fd00:ec2::254]/latest/meta-data/",
])
def test_loopback_and_metadata_in_any_spelling_are_refused(url):
    with pytest.raises(WebhookURLError):
        check_webhook_url(url, STRICT)


@pytest.mark.parametrize("url, why", [
    ("http://hooks.example.com/h", "https://"),
    ("ftp://hooks.example.com/h", "https://"),
    ("file:///etc/passwd", "https://"),
    ("gopher://127.0.0.1:6379/_FLUSHALL", "https://"),
    ("https://user:pw@hooks.example.com/h", "credentials"),
    ("https://hooks.example.com:99999/h", "valid URL"),
    ("https://hooks.example.com:0/h", "port 0"),
    ("https://[fe80::1%25eth0]/h", "zone"),
    ("https://hooks.example.com/a b", "spaces"),
    ("https://hooks.example.com/\r\nX-Injected: 1", "control"),
    ("https:///h", "https://"),
    ("https://" + "a" * 3000 + ".example.com/", "at most"),
])
def test_malformed_or_unsafe_urls_are_refused(url, why):
    with pytest.raises(WebhookURLError, match=why):
        check_webhook_url(url, LOOPBACK_OK, answer(PUBLIC))


def test_http_is_only_for_loopback_and_only_when_the_operator_allows_it():
    with pytest.raises(WebhookURLError, match="https"):
        check_webhook_url("http://127.0.0.1:9/h", STRICT)
    assert check_webhook_url("http://127.0.0.1:9/h", LOOPBACK_OK).url == "http://127.0.0.1:9/h"
    assert check_webhook_url("http://localhost:9/h", LOOPBACK_OK).host_header == "localhost:9"
    with pytest.raises(WebhookURLError, match="https"):  # a public host still needs TLS
        check_webhook_url("http://hooks.example.com/h", LOOPBACK_OK, answer(PUBLIC))
    with pytest.raises(WebhookURLError, match="private"):  # the flag opens loopback, nothing else
        check_webhook_url("https://10.0.0.1/h", LOOPBACK_OK)


def test_allowed_networks_open_private_ranges_but_never_metadata():
    policy = Policy.from_settings(Settings(webhook_allowed_networks="10.20.0.0/16, 169.254.0.0/16, fd00::/8"))
    assert check_webhook_url("https://10.20.3.4/h", policy).address == "10.20.3.4"
    with pytest.raises(WebhookURLError):
        check_webhook_url("https://10.21.0.1/h", policy)
    with pytest.raises(WebhookURLError, match="metadata"):
        check_webhook_url("https://169.254.169.254/h", policy)
    with pytest.raises(WebhookURLError, match="metadata"):
        check_webhook_url("https://[fd00:ec2::254]/h", policy)
    with pytest.raises(WebhookURLError, match="https"):  # allowed, but still not over plain http
        check_webhook_url("http://10.20.3.4/h", policy)


def test_unresolvable_hosts_are_refused_at_submit():
    with pytest.raises(WebhookURLError, match="does not resolve") as e:
        check_webhook_url("https://no-such-host.invalid/h", STRICT)
    assert e.value.unresolved
    assert "does not resolve" in check_url("https://no-such-host.invalid/h", Settings())
