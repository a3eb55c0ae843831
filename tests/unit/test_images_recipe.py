"""Pure parts of the image recipe: apt output parsing, dependency closure, kernel config checks, hashes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exec_sandbox.images.recipe import (
    EXCLUDED_PACKAGES,
    KERNEL_PATCHES,
    AptRecord,
    KernelPatch,
    apply_kernel_patch,
    check_kernel_config,
    dependency_closure,
    digest_files,
    kernel_fragment_text,
    kernel_recipe_hash,
    parse_apt_depends,
    parse_apt_show,
    parse_kernel_config,
    pick_downloadable,
    rootfs_recipe_hash,
)

DEPENDS = """\
python3
  PreDepends: python3-minimal
  Depends: python3.11
 |Depends: media-types
  Depends: mime-support
  Depends: <debconf-2.0>
    cdebconf
    debconf
  Depends: <libgcc1>
    libgcc-s1
python3-minimal
  Depends: dpkg
python3.11
  Depends: libc6
media-types
mime-support
  Depends: perl
cdebconf
debconf
  PreDepends: perl-base
libgcc-s1
  Depends: libc6
dpkg
  PreDepends: tar
libc6
  Depends: libgcc-s1
perl
perl-base
tar
<debconf-2.0>
<libgcc1>
"""


def test_parse_apt_depends_groups_alternatives_and_virtuals() -> None:
    graph = parse_apt_depends(DEPENDS)
    assert graph.depends["python3"] == [
        ["python3-minimal"], ["python3.11"], ["media-types", "mime-support"], ["debconf-2.0"], ["libgcc1"]
    ]
    assert graph.providers["debconf-2.0"] == ["cdebconf", "debconf"]
    assert graph.providers["libgcc1"] == ["libgcc-s1"]
    assert "debconf-2.0" not in graph.depends


def test_closure_skips_excluded_and_resolves_virtuals() -> None:
    closure = dependency_closure(parse_apt_depends(DEPENDS), ["python3"])
    # dpkg/perl/debconf are excluded (not needed at run time) and so is everything only they pull in.
    assert closure == ["libc6", "libgcc-s1", "media-types", "python3", "python3-minimal", "python3.11"]


def test_closure_takes_next_alternative_when_first_is_excluded() -> None:
    closure = dependency_closure(parse_apt_depends(DEPENDS), ["python3"], EXCLUDED_PACKAGES | {"media-types"})
    assert "media-types" not in closure
    assert "mime-support" not in closure  # excluded as well, so the group resolves to nothing


def test_closure_without_exclusions_reaches_everything() -> None:
    closure = dependency_closure(parse_apt_depends(DEPENDS), ["python3"], excluded=())
    assert {"dpkg", "tar", "cdebconf", "libgcc-s1"} <= set(closure)
    assert "debconf-2.0" not in closure and "libgcc1" not in closure


SHOW = """\
Package: nodejs
Version: 20.1.0-1vendor
Architecture: amd64
Depends: libc6

Package: nodejs
Version: 18.20.4+dfsg-1~deb12u3
Architecture: amd64
Filename: pool/updates/main/n/nodejs/nodejs_18.20.4+dfsg-1~deb12u3_amd64.deb
Size: 123
SHA256: {}
Description: evented I/O
 multi-line description

Package: nodejs
Version: 18.20.4+dfsg-1~deb12u2
Architecture: amd64
Filename: pool/main/n/nodejs/nodejs_18.20.4+dfsg-1~deb12u2_amd64.deb
SHA256: {}
""".format("a" * 64, "b" * 64)


def test_parse_apt_show_and_pick_downloadable() -> None:
    records = parse_apt_show(SHOW)
    versions = [r.version for r in records]
    assert versions == ["20.1.0-1vendor", "18.20.4+dfsg-1~deb12u3", "18.20.4+dfsg-1~deb12u2"]
    assert not records[0].downloadable
    assert records[1].size == 123
    assert records[1].fields["Description"].endswith("multi-line description")
    chosen = pick_downloadable(records, "nodejs")
    assert chosen is not None and chosen.version == "18.20.4+dfsg-1~deb12u3"
    pinned = pick_downloadable(records, "nodejs", "18.20.4+dfsg-1~deb12u2")
    assert pinned is not None and pinned.sha256 == "b" * 64
    assert pick_downloadable(records, "nodejs", "20.1.0-1vendor") is None
    assert pick_downloadable(records, "python3") is None


def test_pin_round_trip() -> None:
    record = parse_apt_show(SHOW)[1]
    again = AptRecord.from_pin(record.pin())
    assert again.pin() == record.pin()
    assert again.downloadable


def test_kernel_fragment_is_shipped_and_parsed() -> None:
    options = parse_kernel_config(kernel_fragment_text())
    assert options["CONFIG_PVH"] == "y"
    assert options["CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"] == "y"
    assert options["CONFIG_IPV6"] == "n"
    assert options["CONFIG_NR_CPUS"] == "8"


def test_check_kernel_config_names_dropped_options() -> None:
    fragment = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_N=4\n"
    final = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_N=4\n"
    assert check_kernel_config(fragment, final) == ["CONFIG_B: want y, got n", "CONFIG_C: want n, got y"]
    assert check_kernel_config(fragment, "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=4\n") == []
    assert check_kernel_config("CONFIG_X=y\n", "") == ["CONFIG_X: want y, got n"]


def _kernel(**overrides: Any) -> str:
    args: dict[str, Any] = {
        "flavor": "compiled",
        "source_id": {"tarball": "linux-source-6.1.tar.xz", "size": 1, "mtime_ns": 2},
        "fragment": "CONFIG_A=y\n",
        "scripts": {"kernel.py": "0" * 64},
    }
    args.update(overrides)
    return kernel_recipe_hash(**args)


def _bundle(**overrides: Any) -> str:
    args: dict[str, Any] = {
        "language": "python",
        "packages": [{"name": "python3", "version": "3.11.2-1", "arch": "amd64", "sha256": "1" * 64}],
        "scripts": {"rootfs.py": "2" * 64},
        "guest_files": {"init": "3" * 64},
        "kernel_hash": "4" * 64,
    }
    args.update(overrides)
    return rootfs_recipe_hash(**args)


def test_kernel_hash_is_stable_and_changes_with_every_input() -> None:
    base = _kernel()
    assert base == _kernel()
    variants = [
        _kernel(flavor="debian-cloud"),
        _kernel(source_id={"tarball": "linux-source-6.1.tar.xz", "size": 1, "mtime_ns": 3}),
        _kernel(fragment="CONFIG_A=n\n"),
        _kernel(scripts={"kernel.py": "9" * 64}),
        _kernel(patches=(KernelPatch("a.c", "x", "y", "why"),)),
        _kernel(patches=(KernelPatch("a.c", "x", "z", "why"),)),
        _kernel(patches=(KernelPatch("b.c", "x", "y", "why"),)),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_kernel_hash_without_patches_is_unchanged_and_ignores_the_explanation() -> None:
    assert _kernel(patches=()) == _kernel()
    one = _kernel(patches=(KernelPatch("a.c", "x", "y", "why"),))
    assert one == _kernel(patches=(KernelPatch("a.c", "x", "y", "another explanation"),))
    # a cloud kernel is not compiled here: source patches cannot change it
    cloud = _kernel(flavor="debian-cloud")
    assert cloud == _kernel(flavor="debian-cloud", patches=(KernelPatch("a.c", "x", "y", "why"),))


def test_apply_kernel_patch_needs_exactly_one_match() -> None:
    patch = KernelPatch("init.c", "POISON, what);", "-1, what);", "why")
    assert apply_kernel_patch("a(b,\n   POISON, what);\n", patch) == "a(b,\n   -1, what);\n"
    with pytest.raises(ValueError, match=r"init\.c: .* 0 times"):
        apply_kernel_patch("nothing here", patch)
    with pytest.raises(ValueError, match="2 times"):
        apply_kernel_patch("POISON, what); POISON, what);", patch)


def test_shipped_kernel_patches_are_distinct_edits() -> None:
    assert KERNEL_PATCHES
    for patch in KERNEL_PATCHES:
        assert patch.old and patch.old != patch.new and patch.path and patch.why
    assert len({(p.path, p.old) for p in KERNEL_PATCHES}) == len(KERNEL_PATCHES)


def test_bundle_hash_changes_with_every_input() -> None:
    base = _bundle()
    assert base == _bundle()
    pkg = {"name": "python3", "version": "3.11.2-2", "arch": "amd64", "sha256": "1" * 64}
    variants = [
        _bundle(language="raw"),
        _bundle(packages=[pkg]),
        _bundle(scripts={"rootfs.py": "5" * 64}),
        _bundle(guest_files={"init": "3" * 64, "agent.py": "6" * 64}),
        _bundle(kernel_hash="7" * 64),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_bundle_hash_ignores_package_order() -> None:
    a = {"name": "a", "version": "1", "arch": "all", "sha256": None}
    b = {"name": "b", "version": "1", "arch": "all", "sha256": None}
    assert _bundle(packages=[a, b]) == _bundle(packages=[b, a])


def test_digest_files_relative_names(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x").write_text("x")
    (tmp_path / "y").write_text("y")
    digests = digest_files([tmp_path / "y", tmp_path / "sub" / "x"], root=tmp_path)
    assert set(digests) == {"sub/x", "y"}
    (tmp_path / "y").write_text("changed")
    assert digest_files([tmp_path / "y"], root=tmp_path)["y"] != digests["y"]


@pytest.mark.parametrize("name", ["python", "javascript", "raw"])
def test_every_language_has_python_and_busybox(name: str) -> None:
    from exec_sandbox.images.recipe import LANGUAGES

    packages = LANGUAGES[name].packages
    assert "busybox-static" in packages
    assert any(p.startswith("python3") for p in packages)
