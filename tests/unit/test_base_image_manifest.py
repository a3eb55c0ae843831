"""Pure validation: hosted manifests, cached bundle manifests, the CI bucket listing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from smartvm.errors import SmartVMError
from smartvm.images import lts
from smartvm.images.manifest import (
    BaseImageBundle,
    format_timestamp,
    normalize_arch,
    parse_bundle_manifest,
    parse_hosted_manifest,
)

SHA = "a" * 64


def manifest(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "schema_version": 1,
        "bundle_id": "bundle-1",
        "arch": "x86_64",
        "firecracker_version": "v1.15.1",
        "rootfs_type": "ext4",
        "kernel": {"url": "http://127.0.0.1/vmlinux", "sha256": SHA, "size_bytes": 3},
        "rootfs": {"path": "rootfs.ext4"},
    }
    data.update(overrides)
    return data


def parse(data: Any, **kwargs: Any) -> Any:
    return parse_hosted_manifest(json.dumps(data), origin="test-manifest.json", **kwargs)


def expect_invalid(data: Any, fragment: str, **kwargs: Any) -> SmartVMError:
    with pytest.raises(SmartVMError) as info:
        parse(data, **kwargs)
    assert info.value.code == "INVALID_BASE_IMAGE_MANIFEST"
    assert fragment in info.value.message
    assert "test-manifest.json" in info.value.message
    return info.value


def test_valid_manifest_defaults() -> None:
    parsed = parse(manifest())
    assert parsed.bundle_id == "bundle-1"
    assert parsed.kernel_file_name == "vmlinux"
    assert parsed.rootfs_file_name == "rootfs.ext4"
    assert parsed.rootfs_is_read_only is False
    assert parsed.boot_args == "console=ttyS0 reboot=k panic=1 pci=off"


def test_unknown_top_level_keys_are_ignored_but_artifact_keys_are_not() -> None:
    assert parse(manifest(recipe_hash="abc")).bundle_id == "bundle-1"
    expect_invalid(manifest(rootfs={"path": "x", "sha_256": SHA}), "rootfs.sha_256")


def test_sha256_is_normalised_to_lowercase() -> None:
    parsed = parse(manifest(kernel={"url": "http://127.0.0.1/k", "sha256": "AB" * 32}))
    assert parsed.kernel.sha256 == "ab" * 32


@pytest.mark.parametrize(
    "field", ["schema_version", "bundle_id", "arch", "firecracker_version", "rootfs_type", "kernel", "rootfs"]
)
def test_missing_required_field_is_named(field: str) -> None:
    data = manifest()
    del data[field]
    expect_invalid(data, field)


@pytest.mark.parametrize("bundle_id", ["../escape", "a/b", ".hidden", "..", "", "x" * 200, "a..b", "a\\b"])
def test_bundle_id_traversal_rejected(bundle_id: str) -> None:
    expect_invalid(manifest(bundle_id=bundle_id), "bundle_id")


@pytest.mark.parametrize(
    "file_name", ["../vmlinux", "a/b", "..", ".", ".hidden", "manifest.json", "", "a\\b"]
)
def test_file_name_traversal_rejected(file_name: str) -> None:
    expect_invalid(manifest(rootfs={"path": "r", "file_name": file_name}), "rootfs.file_name")


def test_arch_mismatch_and_unknown_arch() -> None:
    err = expect_invalid(manifest(arch="aarch64"), "arch", expected_arch="x86_64")
    assert err.details["arch"] == "aarch64"
    expect_invalid(manifest(arch="riscv64"), "arch")


@pytest.mark.parametrize(
    ("artifact", "fragment"),
    [
        ({"url": "http://127.0.0.1/vmlinux"}, "requires 'sha256'"),
        ({"path": "k", "url": "http://127.0.0.1/k", "sha256": SHA}, "exactly one"),
        ({"file_name": "vmlinux"}, "exactly one"),
        ({"url": "ftp://127.0.0.1/k", "sha256": SHA}, "http(s)"),
        ({"url": "/relative/k", "sha256": SHA}, "http(s)"),
        ({"path": "k", "sha256": "not-hex"}, "64 hexadecimal"),
        ({"path": "k", "size_bytes": -1}, "size_bytes"),
    ],
)
def test_bad_artifacts(artifact: dict[str, Any], fragment: str) -> None:
    expect_invalid(manifest(kernel=artifact), fragment)


def test_kernel_and_rootfs_must_not_share_a_file_name() -> None:
    expect_invalid(manifest(rootfs={"path": "r", "file_name": "vmlinux"}), "same file_name")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"schema_version": 2}, "schema_version"),
        ({"rootfs_type": "zip"}, "rootfs_type"),
        ({"firecracker_version": "latest"}, "firecracker_version"),
        ({"rootfs_is_read_only": "perhaps"}, "rootfs_is_read_only"),
    ],
)
def test_bad_top_level_values(overrides: dict[str, Any], fragment: str) -> None:
    expect_invalid(manifest(**overrides), fragment)


@pytest.mark.parametrize("raw", ["{not json", "", "\xff"])
def test_malformed_json(raw: str) -> None:
    with pytest.raises(SmartVMError) as info:
        parse_hosted_manifest(raw, origin="m.json")
    assert info.value.code == "INVALID_BASE_IMAGE_MANIFEST"
    assert "not valid JSON" in info.value.message


def test_json_that_is_not_an_object() -> None:
    expect_invalid([manifest()], "must be a JSON object")


def test_normalize_arch() -> None:
    assert normalize_arch("AMD64") == "x86_64"
    assert normalize_arch("arm64") == "aarch64"
    with pytest.raises(SmartVMError) as info:
        normalize_arch("sparc")
    assert info.value.code == "INVALID_ARGUMENT"


def bundle_json(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "preset": "lts",
        "arch": "x86_64",
        "ci_version": "v1.7",
        "firecracker_version": "v1.7.0",
        "bundle_id": "old",
        "bundle_dir": "/cache/old",
        "kernel_image_path": "/cache/old/vmlinux",
        "rootfs_path": "/cache/old/rootfs.ext4",
        "rootfs_type": "ext4",
        "rootfs_is_read_only": False,
        "boot_args": "console=ttyS0",
        "source": {"type": "firecracker-ci", "bucket_url": "https://example.invalid", "kernel_key": "k",
                   "rootfs_key": "r"},
        "created_at": "2024-01-01T00:00:00.000Z",
        "last_accessed_at": "2024-01-02T03:04:05.678Z",
    }
    data.update(overrides)
    return data


def test_bundle_manifest_round_trip_keeps_the_timestamp_format() -> None:
    bundle = parse_bundle_manifest(json.dumps(bundle_json()), origin="m")
    assert bundle.last_accessed_at == datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert bundle.source.type == "firecracker-ci"
    assert bundle.checksums.kernel_sha256 is None
    dumped = json.loads(bundle.to_json())
    assert dumped["last_accessed_at"] == "2024-01-02T03:04:05.678Z"
    assert BaseImageBundle.model_validate(dumped) == bundle
    assert format_timestamp(datetime(2024, 1, 1, tzinfo=UTC)) == "2024-01-01T00:00:00.000Z"


def test_bundle_manifest_hosted_source_and_bad_input() -> None:
    hosted = parse_bundle_manifest(
        json.dumps(
            bundle_json(preset="hosted", source={"type": "hosted-manifest", "manifest_path": "/m.json"})
        ),
        origin="m",
    )
    assert hosted.source.type == "hosted-manifest"
    for bad in (bundle_json(bundle_id="../x"), bundle_json(source={"type": "ftp"}),
                bundle_json(last_accessed_at="yesterday")):
        with pytest.raises(SmartVMError) as info:
            parse_bundle_manifest(json.dumps(bad), origin="m")
        assert info.value.code == "INVALID_BASE_IMAGE_MANIFEST"


# -- the Firecracker CI bucket listing ------------------------------------------------

NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def listing_xml(keys: list[tuple[str, int, str]], *, token: str | None = None, prefixes: tuple[str, ...] = (),
                namespace: bool = True) -> str:
    contents = "".join(
        f"<Contents><Key>{k}</Key><Size>{s}</Size><ETag>&quot;{e}&quot;</ETag></Contents>" for k, s, e in keys
    )
    common = "".join(f"<CommonPrefixes><Prefix>{p}</Prefix></CommonPrefixes>" for p in prefixes)
    if token:
        trunc = f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}</NextContinuationToken>"
    else:
        trunc = "<IsTruncated>false</IsTruncated>"
    xmlns = f' xmlns="{NS}"' if namespace else ""
    body = f"{trunc}{contents}{common}"
    return f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult{xmlns}>{body}</ListBucketResult>'


def test_parse_listing_namespaced_and_plain() -> None:
    md5 = "0123456789abcdef0123456789abcdef"
    for namespace in (True, False):
        page = lts.parse_listing(
            listing_xml([("a/vmlinux-6.1.1", 10, md5), ("a/x", 1, md5 + "-2")], token="t1",
                        prefixes=("firecracker-ci/v1.9/",), namespace=namespace),
            origin="u",
        )
        assert [o.key for o in page.objects] == ["a/vmlinux-6.1.1", "a/x"]
        assert page.objects[0].size == 10
        assert page.objects[0].md5 == md5
        assert page.objects[1].md5 is None  # multipart ETag is not an MD5
        assert page.is_truncated and page.next_continuation_token == "t1"
        assert page.common_prefixes == ["firecracker-ci/v1.9/"]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("<ListBucketResult><oops", "not valid XML"),
        ("<Error><Code>AccessDenied</Code></Error>", "not a ListBucketResult"),
        ("<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>", "NextContinuationToken"),
    ],
)
def test_parse_listing_rejects(raw: str, fragment: str) -> None:
    with pytest.raises(SmartVMError) as info:
        lts.parse_listing(raw, origin="http://127.0.0.1/list")
    assert info.value.code == "BASE_IMAGE_MANIFEST_FAILED"
    assert fragment in info.value.message


def objs(*keys: str) -> list[lts.S3Object]:
    return [lts.S3Object(key=k, size=1) for k in keys]


def test_select_artifacts_numeric_newest_and_ext4_preferred() -> None:
    p = "firecracker-ci/v1.10/x86_64/"
    selection = lts.select_artifacts(
        objs(p + "vmlinux-6.1.9", p + "vmlinux-6.1.10", p + "vmlinux-5.10.239", p + "vmlinux-6.1.99.config",
             p + "vmlinux-6.2.0-no-acpi", p + "ubuntu-24.04.squashfs", p + "ubuntu-22.04.ext4",
             p + "ubuntu-22.04.id_rsa", "firecracker-ci/v1.10/aarch64/vmlinux-9.9.9",
             p + "sub/vmlinux-7.0.0"),
        ci_version="v1.10", arch="x86_64",
    )
    assert selection.kernel.key == p + "vmlinux-6.1.10"
    assert selection.kernel_version == "6.1.10"
    assert selection.rootfs.key == p + "ubuntu-22.04.ext4"
    assert selection.rootfs_type == "ext4"
    assert lts.lts_bundle_id(selection) == "lts-v1.10-x86_64-vmlinux-6.1.10-ubuntu-22.04-ext4"


def test_select_artifacts_squashfs_fallback_and_newest_ubuntu() -> None:
    p = "firecracker-ci/v1.12/aarch64/"
    selection = lts.select_artifacts(
        objs(p + "vmlinux-6.1.1", p + "ubuntu-22.04.squashfs", p + "ubuntu-24.04.squashfs"),
        ci_version="v1.12", arch="aarch64",
    )
    assert selection.rootfs.key == p + "ubuntu-24.04.squashfs"
    assert selection.rootfs_type == "squashfs"


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [(("ubuntu-24.04.ext4",), "no vmlinux"), (("vmlinux-6.1.1",), "no ubuntu-X.Y.ext4")],
)
def test_select_artifacts_missing(keys: tuple[str, ...], fragment: str) -> None:
    p = "firecracker-ci/v1.1/x86_64/"
    with pytest.raises(SmartVMError) as info:
        lts.select_artifacts(objs(*(p + k for k in keys)), ci_version="v1.1", arch="x86_64")
    assert info.value.code == "BASE_IMAGE_NOT_FOUND"
    assert fragment in info.value.message


def test_select_ci_version() -> None:
    assert lts.select_ci_version(
        ["firecracker-ci/v1.9/", "firecracker-ci/v1.10/", "firecracker-ci/20240101/", "other/v9.9/"]
    ) == "v1.10"
    with pytest.raises(SmartVMError) as info:
        lts.select_ci_version(["firecracker-ci/nightly/"])
    assert info.value.code == "BASE_IMAGE_NOT_FOUND"


def test_ci_version_format_and_urls() -> None:
    assert lts.parse_ci_version("v1.16") == (1, 16)
    for bad in ("1.16", "v1", "v1.16.1", "v1.x"):
        with pytest.raises(SmartVMError) as info:
            lts.parse_ci_version(bad)
        assert info.value.code == "INVALID_ARGUMENT"
    assert lts.listing_url("http://h/b/", "firecracker-ci/v1.1/x86_64/", continuation_token="a+b/c=") == (
        "http://h/b/?list-type=2&prefix=firecracker-ci%2Fv1.1%2Fx86_64%2F&continuation-token=a%2Bb%2Fc%3D"
    )
    assert lts.artifact_url("http://h/b", "firecracker-ci/v1.1/x86_64/vmlinux-6.1.1") == (
        "http://h/b/firecracker-ci/v1.1/x86_64/vmlinux-6.1.1"
    )
