"""What installing the package brings: every `ckpt` command works without extras."""

from importlib.metadata import requires


def test_safetensors_is_a_main_dependency_not_only_an_extra() -> None:
    required = requires("ckpt-ledger") or []

    main = [r for r in required if "extra ==" not in r]

    assert any(r.startswith("safetensors") for r in main)
    assert any(r.replace(" ", "").startswith("torch>=2.4") for r in main)
