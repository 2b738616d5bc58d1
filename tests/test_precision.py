"""trainer.precision=auto: the decision table (probes mocked) and what a real run records."""

from __future__ import annotations

import pytest

from pretrain.core.run import precision
from pretrain.core.run.precision import choose, cpu_has_native_bf16

YES, NO = (lambda: True), (lambda: False)


@pytest.mark.parametrize(
    ("accelerator", "cuda_bf16", "cpu_bf16", "expected"),
    [
        ("cuda", YES, NO, "bf16-mixed"),   # A100, H100
        ("gpu", NO, YES, "16-mixed"),      # V100, T4: fp16 with loss scaling
        ("cpu", YES, YES, "bf16-mixed"),   # Zen 4/5, Sapphire Rapids
        ("cpu", YES, NO, "32"),            # Skylake-SP: bf16 would be emulated
    ],
)
def test_auto_follows_the_hardware(accelerator, cuda_bf16, cpu_bf16, expected) -> None:
    choice = choose({"accelerator": accelerator, "precision": "auto"}, cuda_bf16=cuda_bf16, cpu_bf16=cpu_bf16)
    assert choice.precision == expected
    assert choice.reason and choice.reason != "set explicitly"


def test_a_cpu_without_native_bf16_resolves_to_32(monkeypatch: pytest.MonkeyPatch) -> None:
    # Intel Xeon Skylake-SP: AVX-512 but no AVX512_BF16 (the flags as lscpu shows them there).
    monkeypatch.delenv("FEWLABEL_CPU_BF16", raising=False)
    skylake = frozenset(["fpu", "sse", "sse2", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512cd", "avx512bw",
                         "avx512vl"])
    monkeypatch.setattr(precision, "cpu_flags", lambda: skylake)
    assert choose({"accelerator": "cpu", "precision": "auto"}).precision == "32"
    zen5 = skylake | {"avx512_bf16", "avx512_vnni"}
    monkeypatch.setattr(precision, "cpu_flags", lambda: zen5)
    assert choose({"accelerator": "cpu", "precision": "auto"}).precision == "bf16-mixed"


def test_the_environment_overrides_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEWLABEL_CPU_BF16", "0")
    assert choose({"accelerator": "cpu", "precision": "auto"}).precision == "32"
    monkeypatch.setenv("FEWLABEL_CPU_BF16", "1")
    assert choose({"accelerator": "cpu", "precision": "auto"}).precision == "bf16-mixed"


def test_flag_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEWLABEL_CPU_BF16", raising=False)
    assert cpu_has_native_bf16(frozenset({"avx512f", "amx_bf16"}))
    assert cpu_has_native_bf16(frozenset({"avx512_bf16"}))
    assert not cpu_has_native_bf16(frozenset({"avx512f", "avx512bw"}))


def test_an_explicit_value_wins_and_a_bad_one_is_refused() -> None:
    assert choose({"accelerator": "cpu", "precision": "bf16-mixed"}, cpu_bf16=NO).precision == "bf16-mixed"
    assert choose({"accelerator": "cpu", "precision": "32"}, cpu_bf16=YES).reason == "set explicitly"
    with pytest.raises(ValueError, match="trainer.precision='bf17'"):
        choose({"accelerator": "cpu", "precision": "bf17"})


def test_channels_last_auto_and_explicit() -> None:
    assert choose({"accelerator": "cpu"}, "auto", cpu_bf16=NO).channels_last is True
    assert choose({"accelerator": "cpu"}, False, cpu_bf16=NO).channels_last is False
    assert choose({"accelerator": "mps", "precision": "auto"}, "auto").channels_last is False


def test_apply_resolves_in_place() -> None:
    cfg = {"accelerator": "cpu", "precision": "auto"}
    choice = precision.apply(cfg)
    assert cfg["precision"] == choice.precision == choose({"accelerator": "cpu"}).precision
