"""Secrets: TLS terminated for the secret's hosts only, placeholder swapped in request headers only."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.integration.egress_support import (
    SECRET_VALUE,
    LocalServer,
    TestCA,
    gateway,
    http_server,
    https_server,
    proxy_url,
    run_curl,
    settled,
    test_ca,
)

__all__ = ["http_server", "https_server", "test_ca"]

pytestmark = pytest.mark.timeout(60)


async def test_secret_reaches_only_its_host(test_ca: TestCA, tmp_path: Path,
                                            https_server: LocalServer) -> None:
    async with gateway(test_ca, tmp_path) as (gw, bundle):
        env = gw.guest_env()
        placeholder = env["TOKEN"]
        # what the guest holds: placeholders and proxy settings, never the value
        assert placeholder.startswith("sbx-secret-") and SECRET_VALUE not in repr(env)
        assert gw.ca_pem is not None and SECRET_VALUE.encode() not in gw.ca_pem
        ctx = ssl.create_default_context(cafile=str(bundle))
        async with httpx.AsyncClient(proxy=proxy_url(gw), verify=ctx, trust_env=False) as client:
            # 1. the secret's host: the server sees the real value in the header
            r = await client.get(https_server.url("api.test", f"/say/echo-{placeholder}"),
                                 headers={"Authorization": f"Bearer {placeholder}", "X-Other": "keep"})
            assert r.status_code == 200
            # the response is relayed as is: the placeholder the server echoed is not rewritten
            assert r.text == f"echo-{placeholder}" and SECRET_VALUE not in r.text
            cert = r.extensions["network_stream"].get_extra_info("ssl_object").getpeercert(binary_form=True)
            issuer = x509.load_der_x509_certificate(cert).issuer.rfc4514_string()
            assert "exec-sandbox egress CA" in issuer  # terminated by the sandbox CA
            path, headers = https_server.seen[-1]
            assert headers["authorization"] == f"Bearer {SECRET_VALUE}" and headers["x-other"] == "keep"
            assert path == f"/say/echo-{placeholder}"  # only headers are rewritten
            # 2. another allowlisted host: end-to-end TLS, the placeholder goes out unchanged
            r = await client.get(https_server.url("other.test", "/leak"),
                                 headers={"Authorization": f"Bearer {placeholder}"})
            assert r.status_code == 200
            cert = r.extensions["network_stream"].get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert "egress test CA" in x509.load_der_x509_certificate(cert).issuer.rfc4514_string()
            assert https_server.seen[-1][1]["authorization"] == f"Bearer {placeholder}"
        # curl, too
        rc, out, err = await run_curl("--proxy", proxy_url(gw), "--cacert", str(bundle),
                                      "-H", f"X-Api-Key: {placeholder}",
                                      https_server.url("api.test", "/curl"))
        assert rc == 0 and out.startswith("hello api.test"), err
        assert https_server.seen[-1][1]["x-api-key"] == SECRET_VALUE
        await settled(gw, 3)
        log = gw.egress_log()
        assert [(e.name, e.intercepted) for e in log] == [("api.test", True), ("other.test", False),
                                                          ("api.test", True)]
        assert all(SECRET_VALUE not in e.model_dump_json() for e in log)


async def test_transparent_sni_to_secret_host(test_ca: TestCA, tmp_path: Path,
                                              https_server: LocalServer) -> None:
    async with gateway(test_ca, tmp_path, transparent_tls_port=https_server.port) as (gw, bundle):
        assert gw.proxy_addresses is not None
        port = gw.proxy_addresses.tls[1]
        placeholder = gw.guest_env()["TOKEN"]
        rc, out, err = await run_curl("--resolve", f"api.test:{port}:127.0.0.1", "--cacert", str(bundle),
                                      "-H", f"Authorization: token {placeholder}", f"https://api.test:{port}/t")
        assert rc == 0 and out.startswith("hello api.test"), err
        assert https_server.seen[-1][1]["authorization"] == f"token {SECRET_VALUE}"


async def test_upstream_certificate_is_verified(tmp_path: Path, https_server: LocalServer) -> None:
    # a gateway that does not trust the test CA: the real server's certificate fails verification,
    # the placeholder is never swapped in, the guest gets a 502 naming the failure
    other_ca = TestCA(tmp_path, ["api.test"])
    async with gateway(other_ca, tmp_path) as (gw, bundle):
        before = len(https_server.seen)
        ctx = ssl.create_default_context(cafile=str(bundle))
        async with httpx.AsyncClient(proxy=proxy_url(gw), verify=ctx, trust_env=False) as client:
            r = await client.get(https_server.url("api.test", "/x"),
                                 headers={"Authorization": gw.guest_env()["TOKEN"]})
        assert r.status_code == 502 and r.headers["x-sbx-egress-rule"] == "connect_failed"
        assert "CERTIFICATE_VERIFY_FAILED" in r.text
        assert len(https_server.seen) == before


async def test_guest_trusting_the_sandbox_ca_cannot_be_fooled_for_other_names(
        test_ca: TestCA, tmp_path: Path) -> None:
    async with gateway(test_ca, tmp_path) as (gw, _bundle):
        assert gw.ca is not None and gw.ca_pem is not None
        ca = x509.load_pem_x509_certificate(gw.ca_pem)
        constraints = ca.extensions.get_extension_for_class(x509.NameConstraints)
        assert constraints.critical
        assert [n.value for n in constraints.value.permitted_subtrees or []] == ["api.test"]
        with pytest.raises(ValueError, match="not a host of this CA"):
            gw.ca.leaf_pem("other.test")


async def test_secrets_never_go_out_in_cleartext_or_to_other_hosts(
        test_ca: TestCA, tmp_path: Path, http_server: LocalServer) -> None:
    async with gateway(test_ca, tmp_path) as (gw, _bundle):
        placeholder = gw.guest_env()["TOKEN"]
        async with httpx.AsyncClient(proxy=proxy_url(gw), trust_env=False) as client:
            for name in ("web.test", "api.test"):  # plain HTTP: even the secret's own host gets no value
                r = await client.get(http_server.url(name, "/plain"), headers={"Authorization": placeholder})
                assert r.status_code == 200
                assert http_server.seen[-1][1]["authorization"] == placeholder
