from __future__ import annotations

from pathlib import Path

import pytest

from collectors.profile import (
    PROFILE_DIR,
    ProfileError,
    load_profile,
    load_profile_file,
    load_profiles,
)

EXPECTED = {"eastron_sdm120", "eastron_sdm630", "chint_dtsu666", "acrel_ddsy1352", "acrel_adl400"}


def test_bundled_profiles_load() -> None:
    profiles = load_profiles()
    assert set(profiles) >= EXPECTED
    for name, p in profiles.items():
        assert p.model == name
        assert p.field("import_kwh").is_counter


def test_domain_register_map_facts() -> None:
    sdm630 = load_profile("eastron_sdm630")
    assert sdm630.field("power_w").address == 0x0034
    assert sdm630.field("import_kwh").table == "input"
    dtsu = load_profile("chint_dtsu666")
    assert (dtsu.field("power_w").address, dtsu.field("power_w").table) == (0x2012, "holding")
    assert dtsu.field("import_kwh").address == 0x401E
    ddsy = load_profile("acrel_ddsy1352")
    assert [ddsy.field(n).address for n in ("import_kwh", "tou_sharp_kwh", "tou_peak_kwh",
                                            "tou_flat_kwh", "tou_valley_kwh")] == [0, 2, 4, 6, 8]
    assert ddsy.field("power_w").type == "int16"
    assert ddsy.relay is not None and (ddsy.relay.closed, ddsy.relay.open) == (1, 0)
    adl = load_profile("acrel_adl400")
    assert (adl.field("import_kwh").type, adl.field("import_kwh").scale) == ("int32", 0.01)


def _write(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(body)
    return p


def test_error_names_file_and_field(tmp_path: Path) -> None:
    p = _write(tmp_path, "bad_meter", """
model: bad_meter
fields:
  - {name: import_kwh, table: input, address: 0x48, type: float32, unit: kWh}
  - {name: power_w, table: input, address: 0x0C, type: float33, unit: W}
""")
    with pytest.raises(ProfileError) as exc:
        load_profile_file(p)
    msg = str(exc.value)
    assert "bad_meter.yaml" in msg and "fields[1] (power_w)" in msg and "float33" in msg


@pytest.mark.parametrize("field_yaml,needle", [
    ("{name: power_w, table: input, address: 0x0C, unit: kW}", "unit"),
    ("{name: watts, table: input, address: 0x0C, unit: W}", "unknown canonical name"),
    ("{name: power_w, table: input, address: 0x0C, unit: W, order: ACBD}", "order"),
    ("{name: power_w, function_code: 1, address: 0x0C, unit: W}", "function_code"),
    ("{name: power_w, table: input, address: 0x0C, unit: W, scale: 0}", "scale"),
    ("{name: power_w, table: input, address: 0x0C, unit: W, colour: red}", "colour"),
    ("{name: export_kwh, table: input, address: 0x49, unit: kWh}", "overlaps"),
])
def test_invalid_fields_rejected(tmp_path: Path, field_yaml: str, needle: str) -> None:
    p = _write(tmp_path, "m", f"""
model: m
fields:
  - {{name: import_kwh, table: input, address: 0x48, unit: kWh}}
  - {field_yaml}
""")
    with pytest.raises(ProfileError) as exc:
        load_profile_file(p)
    assert needle in str(exc.value)
    assert "m.yaml" in str(exc.value)


def test_function_code_spelling_and_model_name(tmp_path: Path) -> None:
    p = _write(tmp_path, "fc_meter", """
model: fc_meter
fields:
  - {name: import_kwh, function_code: 4, address: 0x48, unit: kWh}
relay: {table: holding, address: 0x10, closed: 0x55, open: 0xAA}
""")
    prof = load_profile_file(p)
    assert prof.field("import_kwh").table == "input"
    assert prof.relay is not None and prof.relay.closed == 0x55
    wrong = _write(tmp_path, "other_name", p.read_text())
    with pytest.raises(ProfileError, match="file name"):
        load_profile_file(wrong)


def test_unknown_profile_lists_known() -> None:
    with pytest.raises(ProfileError, match="eastron_sdm120"):
        load_profile("no_such_meter")
    assert PROFILE_DIR.is_dir()
