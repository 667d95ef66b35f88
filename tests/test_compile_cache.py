"""The CLIs' persistent compilation cache: on by default in a per-user folder, never over a configured one."""

from __future__ import annotations

import jax
import pytest

from tmp_jax import compile_cache as cc


@pytest.fixture(autouse=True)
def _keep_xla_flags(monkeypatch):
    """enable_default() appends to XLA_FLAGS (gpu_compile_flags): put the suite's value back afterwards."""
    monkeypatch.setenv("XLA_FLAGS", __import__("os").environ.get("XLA_FLAGS", ""))


def test_gpu_compile_flags_turn_triton_gemm_off_once_unless_set(monkeypatch):
    monkeypatch.delenv(cc.TRITON_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    want = "--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=false"
    assert cc.gpu_compile_flags() == want and cc.gpu_compile_flags() == want  # added once
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")  # the user's choice stays
    assert cc.gpu_compile_flags() == "--xla_gpu_enable_triton_gemm=true"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(cc.TRITON_ENV, "1")  # XLA's default kept
    assert cc.gpu_compile_flags() == ""


@pytest.fixture
def no_cache_dir(monkeypatch):
    """Run with no cache folder configured; the suite's own (conftest) is put back afterwards."""
    before = jax.config.jax_compilation_cache_dir
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", before)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)


def test_default_folder_under_xdg_cache(no_cache_dir, monkeypatch, tmp_path):
    monkeypatch.delenv(cc.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    got = cc.enable_default()
    assert got == str(tmp_path / "tmp_jax" / "xla") and (tmp_path / "tmp_jax" / "xla").is_dir()
    assert jax.config.jax_compilation_cache_dir == got


def test_env_folder_and_off(no_cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(cc.ENV, "off")
    assert cc.enable_default() is None and not jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(cc.ENV, str(tmp_path / "c"))
    assert cc.enable_default() == str(tmp_path / "c")


def test_configured_folder_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv(cc.ENV, str(tmp_path / "ignored"))
    before = jax.config.jax_compilation_cache_dir
    assert before  # conftest configures one for the suite
    assert cc.enable_default() == str(before) and not (tmp_path / "ignored").exists()
