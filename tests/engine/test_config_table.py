"""docs/CONFIG.md is the table generated from the TrainConfig declarations, and it is current."""

from __future__ import annotations

from pathlib import Path

from sphereconv.engine.config import CONFIG_TABLE_COMMAND, config_table, key_specs

CONFIG_DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"


def test_docs_config_table_is_current():
    assert CONFIG_DOC.read_text() == config_table(), f"docs/CONFIG.md is stale; regenerate with {CONFIG_TABLE_COMMAND}"


def test_the_table_has_one_row_per_key_with_its_flag():
    rows = [line for line in config_table().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [key.name for key in key_specs()]
    for row, key in zip(rows, key_specs()):
        assert f"`{key.flag}`" in row and key.type_name() in row
