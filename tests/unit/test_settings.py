from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from exec_sandbox.settings import Settings


def test_defaults_follow_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("EXEC_SANDBOX_CACHE_DIR", "EXEC_SANDBOX_IMAGES_DIR", "EXEC_SANDBOX_FORCE_EMULATION"):
        monkeypatch.delenv(var, raising=False)
    settings = Settings()
    assert settings.cache_dir.name == "exec-sandbox"
    assert settings.images_dir == settings.cache_dir / "images"
    assert settings.force_emulation is False
    assert settings.kernel_flavor == "compiled"
    assert settings.build_jobs >= 1


def test_env_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("EXEC_SANDBOX_FORCE_EMULATION", "true")
    monkeypatch.setenv("EXEC_SANDBOX_KERNEL_FLAVOR", "debian-cloud")
    settings = Settings()
    assert settings.cache_dir == tmp_path
    assert settings.images_dir == tmp_path / "images"
    assert settings.force_emulation is True
    assert settings.kernel_flavor == "debian-cloud"


def test_explicit_images_dir_wins(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "c", images_dir=tmp_path / "i")
    assert settings.images_dir == tmp_path / "i"


def test_invalid_values_are_rejected() -> None:
    with pytest.raises(ValidationError, match="kernel_flavor"):
        Settings(kernel_flavor="vendor")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="build_jobs"):
        Settings(build_jobs=0)
